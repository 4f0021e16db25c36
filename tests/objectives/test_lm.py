"""The LM objective's accuracy: a hit only where the target's logit is strictly the largest."""
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.objectives.lm import argmax_hits, token_log_probs


@pytest.mark.parametrize("logits,target,hit", [
    ([1.0, 1.0, 1.0, 1.0], 0, False),   # all equal: a collapsed model predicts nothing
    ([1.0, 1.0, 1.0, 1.0], 3, False),
    ([0.0, 2.0, 1.0, -1.0], 1, True),   # unique max on the target
    ([0.0, 2.0, 1.0, -1.0], 2, False),  # another token is larger
    ([2.0, 2.0, 1.0, -1.0], 0, False),  # tie with a later token
    ([2.0, 2.0, 1.0, -1.0], 1, False),  # tie with an earlier token
    ([-jnp.inf, 0.5, -jnp.inf], 1, True),
])
def test_argmax_hits_counts_only_a_strict_maximum(logits, target, hit):
    for dtype in (jnp.float32, jnp.bfloat16):
        got = argmax_hits(jnp.asarray([[logits]], dtype), jnp.asarray([[target]], jnp.int32))
        assert got.shape == (1, 1) and bool(got[0, 0]) is hit, dtype


def test_argmax_hits_over_a_batch_and_a_one_token_vocabulary():
    logits = jnp.asarray([[[3.0, 1.0], [1.0, 1.0], [0.0, 5.0]]])
    np.testing.assert_array_equal(argmax_hits(logits, jnp.asarray([[0, 1, 0]])), [[True, False, False]])
    assert bool(argmax_hits(jnp.zeros((1, 1, 1)), jnp.zeros((1, 1), jnp.int32))[0, 0])  # nothing to tie with


def test_log_probs_are_unchanged_by_ties():
    # the loss's softmax shift now comes from the same max-over-the-others pass: equal logits still give −log V
    logp = token_log_probs(jnp.ones((1, 2, 4)), jnp.asarray([[0, 3]]))
    np.testing.assert_allclose(logp, np.full((1, 2), -np.log(4.0)), rtol=1e-6)
    logits = jnp.asarray([[[0.0, 2.0, 1.0, -1.0]]])
    np.testing.assert_allclose(token_log_probs(logits, jnp.asarray([[2]])),
                               [[1.0 - np.log(np.exp(logits[0, 0]).sum())]], rtol=1e-6)
