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
    pairs_d = np.maximum(lengths_d - 1, 0)
    keep = pairs_d > 0
    if loss_masks is not None:
        for i, (doc, mask) in enumerate(zip(docs, loss_masks)):
            if len(mask) != max(len(doc) - 1, 0):
                raise ValueError(f"loss_masks[{i}] has length {len(mask)}, but document {i} has "
                                 f"{len(doc)} tokens, so {max(len(doc) - 1, 0)} targets")
    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        empty = np.zeros((0, seq_len), np.int32)
        return dict(inputs=empty, targets=empty.copy(), segment_ids=empty.copy(), positions=empty.copy(),
                    loss_mask=np.zeros((0, seq_len), np.float32))

    tokens = np.concatenate([np.asarray(docs[i]) for i in kept]).astype(np.int32)
    n_pairs_d = pairs_d[kept]
    doc_start = np.concatenate([[0], np.cumsum(lengths_d[kept])[:-1]])  # in `tokens`
    n_pairs = int(n_pairs_d.sum())
    pair_doc = np.repeat(np.arange(len(kept)), n_pairs_d)                # (n_pairs,) which kept doc
    pair_first = np.concatenate([[0], np.cumsum(n_pairs_d)[:-1]])
    pair_pos = np.arange(n_pairs) - pair_first[pair_doc]                 # position inside its document
    input_idx = doc_start[pair_doc] + pair_pos

    n_rows = -(-n_pairs // seq_len)
    total = n_rows * seq_len
    pad = total - n_pairs

    def padded(x: np.ndarray, dtype) -> np.ndarray:
        return np.concatenate([x.astype(dtype), np.zeros(pad, dtype)]).reshape(n_rows, seq_len)

    inputs = padded(tokens[input_idx], np.int32)
    targets = padded(tokens[input_idx + 1], np.int32)
    positions = padded(pair_pos, np.int32)
    if loss_masks is None:
        mask = np.ones(n_pairs, np.float32)
    else:
        mask = np.concatenate([np.asarray(loss_masks[i], np.float32) for i in kept])
    loss_mask = padded(mask, np.float32)

    # A new segment starts at a document's first pair and at the first column of every row.
    starts = np.zeros(n_pairs, bool)
    starts[pair_first] = True
    starts[::seq_len] = True
    starts_rt = padded(starts, np.int32)
    segment_ids = np.cumsum(starts_rt, axis=1, dtype=np.int32)
    segment_ids[padded(np.ones(n_pairs, bool), bool) == 0] = 0
    return dict(inputs=inputs, targets=targets, segment_ids=segment_ids, positions=positions,
                loss_mask=loss_mask)
