"""Decode attention: the kernels (both families, interpret mode) against the reference, with and without a sliding
window, the cache blocks they skip, and the reference against full causal attention, which is what decoding must
reproduce."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.kernels.attention import decode_attention, reference_attention, reference_decode_attention
from llm_jax.kernels.attention.decode import pallas_decode_attention


def _cache(b, tq, h, kv, d, s, seed=0):
    kq, kk, kv_ = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, tq, h, d)), jax.random.normal(kk, (b, kv, s, d)),
            jax.random.normal(kv_, (b, kv, s, d)))


@pytest.mark.parametrize("window", [0, 5])
def test_reference_decode_equals_the_last_rows_of_causal_attention(window):
    b, h, kv, d, s, tq = 2, 4, 2, 16, 32, 3
    _, k_cache, v_cache = _cache(b, tq, h, kv, d, s)
    lengths = jnp.array([20, 32])
    q_full = jax.random.normal(jax.random.key(5), (b, s, h, d))
    full = reference_attention(q_full, jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2), window=window)
    for row, n in enumerate(np.asarray(lengths)):
        q_new = q_full[row:row + 1, n - tq:n]
        got = reference_decode_attention(q_new, k_cache[row:row + 1], v_cache[row:row + 1], lengths[row:row + 1],
                                         window=window)
        np.testing.assert_allclose(got[0], full[row, n - tq:n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["tpu", "triton"])
@pytest.mark.parametrize("tq, h, kv, d", [(1, 8, 2, 64), (3, 4, 4, 128), (2, 6, 2, 64)])
def test_decode_kernel_matches_the_reference(family, tq, h, kv, d):
    b, s = 4, 128
    q, k_cache, v_cache = _cache(b, tq, h, kv, d, s)
    lengths = jnp.array([tq, 37, 128, 64])  # a fresh row, mid-block, full cache, exactly a block boundary
    got = pallas_decode_attention(q, k_cache, v_cache, lengths, block_kv=32, backend=family, interpret=True)
    want = reference_decode_attention(q, k_cache, v_cache, lengths)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["tpu", "triton"])
@pytest.mark.parametrize("tq, window", [(1, 1), (3, 5), (2, 16), (1, 40), (2, 200)])
def test_decode_kernel_with_a_window_matches_the_reference(family, tq, window):
    """Windows of one position, smaller than a block of 16, exactly one, several, and longer than the cache."""
    b, s = 4, 128
    q, k_cache, v_cache = _cache(b, tq, 4, 2, 64, s)
    lengths = jnp.array([tq, 37, 128, 64])
    got = pallas_decode_attention(q, k_cache, v_cache, lengths, window=window, block_kv=16, backend=family,
                                  interpret=True)
    np.testing.assert_allclose(got, reference_decode_attention(q, k_cache, v_cache, lengths, window=window),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["tpu", "triton"])
def test_decode_never_computes_the_blocks_before_the_window(family):
    """NaN in every cache block wholly before the window of a row's earliest new token cannot leak (a masked
    block would spread it: zero weights times NaN values are NaN); the window's edge block stays finite."""
    tq, window, block = 2, 20, 16
    q, k_cache, v_cache = _cache(3, tq, 4, 2, 64, 128)
    lengths = jnp.array([25, 70, 128])
    first_visible = lengths - tq - window + 1  # the earliest position any new token of the row sees
    pos = jnp.arange(128)[None, None, :, None]
    poison = jnp.where(pos < (first_visible // block * block)[:, None, None, None], jnp.nan, 0.0)
    got = pallas_decode_attention(q, k_cache + poison, v_cache + poison, lengths, window=window, block_kv=block,
                                  backend=family, interpret=True)
    np.testing.assert_allclose(got, reference_decode_attention(q, k_cache, v_cache, lengths, window=window),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("tq, window, steps", [(1, 0, 8), (2, 20, 3), (1, 16, 2), (1, 1, 1), (3, 200, 8)])
def test_the_tpu_decode_grid_iterates_only_the_blocks_a_window_can_see(tq, window, steps):
    """A 128-position cache in blocks of 16: Tq new tokens with a window W see Tq + W − 1 positions, which touch
    at most (Tq + W − 3) // 16 + 2 blocks however long the cache."""
    q, k_cache, v_cache = _cache(2, tq, 4, 2, 64, 128)
    jaxpr = jax.make_jaxpr(functools.partial(pallas_decode_attention, window=window, block_kv=16, backend="tpu",
                                             interpret=True))(q, k_cache, v_cache, jnp.array([5, 100]))
    grids = [eqn.params["grid_mapping"].grid for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call"]
    assert grids == [(2, 2, steps)]


def test_decode_ignores_the_cache_beyond_each_length():
    q, k_cache, v_cache = _cache(2, 1, 4, 2, 64, 64)
    lengths = jnp.array([10, 40])
    # Stale entries of the row's last block get zero weight; blocks wholly past the length are never read,
    # so even NaN there cannot leak.
    pos, length = jnp.arange(64)[None, None, :, None], lengths[:, None, None, None]
    garbage = jnp.where(pos >= -(-length // 16) * 16, jnp.nan, jnp.where(pos >= length, 1e6, 0.0))
    got = pallas_decode_attention(q, k_cache + garbage, v_cache + garbage, lengths, block_kv=16, backend="tpu",
                                  interpret=True)
    np.testing.assert_allclose(got, reference_decode_attention(q, k_cache, v_cache, lengths), atol=2e-5)


def test_decode_refuses_bad_shapes_and_names():
    q, k_cache, v_cache = _cache(2, 1, 4, 2, 64, 48)
    with pytest.raises(ValueError, match="cache length 48 is not a multiple of the block size 32"):
        pallas_decode_attention(q, k_cache, v_cache, jnp.array([1, 2]), block_kv=32, backend="tpu", interpret=True)
    with pytest.raises(ValueError, match=r"lengths of shape \(3,\) do not match the batch \(2,\)"):
        pallas_decode_attention(q, k_cache, v_cache, jnp.array([1, 2, 3]), backend="tpu", interpret=True)
    with pytest.raises(ValueError, match="decode attention impl 'xla' is not one of"):
        decode_attention(q, k_cache, v_cache, jnp.array([1, 2]), impl="xla")


@pytest.mark.parametrize("platform, marker", [("tpu", "tpu_custom_call"), ("cuda", "triton")])
@pytest.mark.parametrize("window", [0, 1000])
def test_decode_lowers_for_accelerators(platform, marker, window):
    q = jax.ShapeDtypeStruct((8, 1, 32, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((8, 8, 4096, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    decode = functools.partial(pallas_decode_attention, window=window)
    text = jax.jit(decode).trace(q, cache, cache, lengths).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text
