"""Packing tokenized documents into fixed-length rows of (input, target) pairs, with no token wasted.

A document of L tokens (bos ... eos) gives L-1 next-token pairs. Pairs of all documents are laid end to
end and cut into rows of seq_len; a document cut at a row boundary continues in the next row as a new
segment whose positions carry on from where it stopped, so rotary positions match an unpacked document.
Attention must stay inside a segment (segment_ids), and padding (segment 0) has loss_mask 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

PACKED_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def pack_documents(docs: Sequence[np.ndarray], seq_len: int,
                   loss_masks: Sequence[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Packs `docs` (each a 1-D token array incl. bos/eos) into rows; every output array is (n_rows, seq_len).

    loss_masks, if given, holds one 0/1 array of length L-1 per document, over its targets (e.g. 1 only on
    response tokens for SFT). Documents of fewer than 2 tokens have no pairs and are skipped.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if loss_masks is not None and len(loss_masks) != len(docs):
        raise ValueError(f"got {len(loss_masks)} loss masks for {len(docs)} documents")
    lengths_d = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    if loss_masks is not None:
        for i, (doc, mask) in enumerate(zip(docs, loss_masks)):
            if len(mask) != max(len(doc) - 1, 0):
                raise ValueError(f"loss_masks[{i}] has length {len(mask)}, but document {i} has "
                                 f"{len(doc)} tokens, so {max(len(doc) - 1, 0)} targets")
    kept = np.flatnonzero(lengths_d >= 2)
    n_pairs_d = lengths_d[kept] - 1
    n_pairs = int(n_pairs_d.sum())
    n_rows = -(-n_pairs // seq_len)
    total = n_rows * seq_len
    out = dict(inputs=np.zeros(total, np.int32), targets=np.zeros(total, np.int32),
               segment_ids=np.zeros(total, np.int32), positions=np.zeros(total, np.int32),
               loss_mask=np.zeros(total, np.float32))
    if n_pairs:
        tokens = np.concatenate([np.asarray(docs[i], np.int32) for i in kept])
        doc_end = np.cumsum(lengths_d[kept])
        is_input = np.ones(len(tokens), bool)
        is_input[doc_end - 1] = False            # a document's last token is never an input
        is_target = np.roll(is_input, 1)         # ... and its first never a target
        out["inputs"][:n_pairs] = tokens[is_input]
        out["targets"][:n_pairs] = tokens[is_target]

        # Positions count up inside each document: a running sum of ones, pulled back at each document start.
        pair_first = np.concatenate([[0], np.cumsum(n_pairs_d)[:-1]])
        steps = np.ones(n_pairs, np.int32)
        steps[pair_first] = 0
        steps[pair_first[1:]] = 1 - n_pairs_d[:-1]
        out["positions"][:n_pairs] = np.cumsum(steps, dtype=np.int32)

        if loss_masks is None:
            out["loss_mask"][:n_pairs] = 1.0
        else:
            out["loss_mask"][:n_pairs] = np.concatenate([np.asarray(loss_masks[i], np.float32) for i in kept])

        # A new segment starts at each document's first pair and at the first column of every row.
        starts = np.zeros(total, np.int32)
        starts[pair_first] = 1
        starts[::seq_len] = 1
        segment_ids = np.cumsum(starts.reshape(n_rows, seq_len), axis=1, dtype=np.int32).reshape(-1)
        segment_ids[n_pairs:] = 0
        out["segment_ids"] = segment_ids
    return {k: v.reshape(n_rows, seq_len) for k, v in out.items()}
