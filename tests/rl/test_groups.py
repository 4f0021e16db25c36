"""DAPO's host-side choices against hand-computed numbers: informative groups, taking and refilling groups,
the soft overlong penalty and the overlong filter."""
import numpy as np
import pytest

from llm_jax.rl.groups import (fill_groups, group_rows, informative_groups, overlong_filter, overlong_penalty,
                               take_groups)


def test_informative_groups():
    scores = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.5, 0.5, 0.25])
    np.testing.assert_array_equal(informative_groups(scores, 3), [False, True, False, True])
    np.testing.assert_array_equal(informative_groups(scores, 6), [True, True])
    np.testing.assert_array_equal(informative_groups(scores[:2], 1), [False, False])  # k = 1: nothing to compare
    with pytest.raises(ValueError, match="12 rows are not whole groups of k=5"):
        informative_groups(scores, 5)


def test_group_rows_and_take_groups():
    np.testing.assert_array_equal(group_rows([True, False, True], 2), [0, 1, 4, 5])
    np.testing.assert_array_equal(group_rows([2, 0], 2), [4, 5, 0, 1])
    np.testing.assert_array_equal(group_rows(np.zeros(3, bool), 2), np.zeros(0, int))
    batch = dict(tokens=np.arange(12).reshape(6, 2), score=np.arange(6, dtype=np.float32))
    taken = take_groups(batch, np.array([False, True, True]), 2)
    np.testing.assert_array_equal(taken["tokens"], [[4, 5], [6, 7], [8, 9], [10, 11]])
    np.testing.assert_array_equal(taken["score"], [2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(take_groups(batch["score"], [0], 2), [0.0, 1.0])
    with pytest.raises(ValueError, match="different numbers of rows"):
        take_groups(dict(a=np.zeros(4), b=np.zeros(6)), [0], 2)


def test_fill_groups_keeps_whole_groups_in_order():
    first = dict(x=np.array([0, 1, 2, 3]), m=np.ones((4, 3)))       # 2 groups of k = 2
    second = dict(x=np.array([10, 11, 12, 13, 14, 15]), m=np.zeros((6, 3)))  # 3 groups
    batch, taken = fill_groups([first, second], 4, 2)
    assert taken == 4
    np.testing.assert_array_equal(batch["x"], [0, 1, 2, 3, 10, 11, 12, 13])
    assert batch["m"].shape == (8, 3) and batch["m"][:4].sum() == 12 and batch["m"][4:].sum() == 0
    batch, taken = fill_groups([first, second], 10, 2)  # not enough: all 5, and the count says so
    assert taken == 5 and batch["x"].shape == (10,)
    with pytest.raises(ValueError, match="pad them to one length"):
        fill_groups([first, dict(x=np.zeros(2), m=np.zeros((2, 4)))], 2, 2)
    with pytest.raises(ValueError, match="keys"):
        fill_groups([first, dict(x=np.zeros(2))], 2, 2)


def test_overlong_penalty():
    # L = 10, cache 4: free up to 6, then (6 − |y|)/4 down to −1 at 10, −1 beyond
    lengths = np.array([0, 6, 7, 8, 9, 10, 11])
    np.testing.assert_allclose(overlong_penalty(lengths, 10, 4), [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0])
    assert overlong_penalty(lengths, 10, 4).dtype == np.float32
    np.testing.assert_allclose(overlong_penalty(lengths, 10, 0), [0, 0, 0, 0, 0, 0, -1.0])  # no ramp
    np.testing.assert_allclose(overlong_penalty([0, 5, 10], 10, 10), [0.0, -0.5, -1.0])  # all ramp
    for max_new, cache in [(10, 11), (10, -1), (0, 0)]:
        with pytest.raises(ValueError, match=f"max_new_tokens={max_new}, cache={cache}"):
            overlong_penalty(lengths, max_new, cache)


def test_overlong_filter_zeroes_the_rows_that_did_not_stop():
    mask = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]], np.float32)
    out = overlong_filter(mask, np.array([True, False, True]))
    np.testing.assert_array_equal(out, [[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="one flag per row"):
        overlong_filter(mask, np.array([True, False]))
