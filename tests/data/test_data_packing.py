"""Packing: exact arrays on hand-made documents, and speed-independent invariants on random ones."""
import numpy as np
import pytest

from llm_jax.data.packing import pack_documents


def test_exact_rows_with_a_split_document_and_padding():
    docs = [np.array([2, 10, 11, 3]), np.array([2, 20, 21, 22, 23, 3]), np.array([2, 3]), np.array([2])]
    out = pack_documents(docs, seq_len=4)
    np.testing.assert_array_equal(out["inputs"], [[2, 10, 11, 2], [20, 21, 22, 23], [2, 0, 0, 0]])
    np.testing.assert_array_equal(out["targets"], [[10, 11, 3, 20], [21, 22, 23, 3], [3, 0, 0, 0]])
    # The second document spans rows 0-1: a new segment in row 1, positions continuing at 1.
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1, 2], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 1, 2, 0], [1, 2, 3, 4], [0, 0, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert {k: v.dtype for k, v in out.items()} == dict(
        inputs=np.int32, targets=np.int32, segment_ids=np.int32, positions=np.int32, loss_mask=np.float32)


def test_loss_masks_follow_targets():
    docs = [np.array([2, 5, 6, 3]), np.array([2, 7, 3])]
    masks = [np.array([0, 1, 1]), np.array([0, 1])]
    out = pack_documents(docs, seq_len=3, loss_masks=masks)
    np.testing.assert_array_equal(out["loss_mask"], [[0, 1, 1], [0, 1, 0]])
    np.testing.assert_array_equal(out["segment_ids"], [[1, 1, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match=r"loss_masks\[1\] has length 1, but document 1 has 3 tokens"):
        pack_documents(docs, seq_len=3, loss_masks=[masks[0], np.array([1])])


def test_exact_fit_has_no_padding_row_and_empty_input():
    out = pack_documents([np.array([2, 4, 5, 3])], seq_len=3)
    assert out["inputs"].shape == (1, 3) and out["loss_mask"].all()
    empty = pack_documents([], seq_len=8)
    assert all(v.shape == (0, 8) for v in empty.values())


def test_random_documents_round_trip():
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[2], rng.integers(4, 100, size=n), [3]]) for n in rng.integers(0, 50, size=300)]
    out = pack_documents(docs, seq_len=16)
    real = out["loss_mask"] > 0
    assert real.sum() == sum(len(d) - 1 for d in docs)
    # Reassemble each document from its segments and positions.
    flat_in, flat_tgt, flat_pos = (out[k][real] for k in ("inputs", "targets", "positions"))
    starts = np.flatnonzero(flat_pos == 0)
    rebuilt = [np.append(flat_in[a:b], flat_tgt[b - 1]) for a, b in zip(starts, list(starts[1:]) + [len(flat_in)])]
    assert all(np.array_equal(r, d) for r, d in zip(rebuilt, docs, strict=True))
    # Inside a row, a segment change happens exactly where positions restart or a row begins.
    seg = out["segment_ids"]
    assert (seg[:, 0][real[:, 0]] == 1).all()
    changes = (seg[:, 1:] != seg[:, :-1]) & real[:, 1:]
    np.testing.assert_array_equal(changes, (out["positions"][:, 1:] == 0) & real[:, 1:])
