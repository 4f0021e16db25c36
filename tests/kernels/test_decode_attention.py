"""Decode attention: the kernels (both families, interpret mode) against the reference, and the reference against
full causal attention, which is what decoding must reproduce."""
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


def test_reference_decode_equals_the_last_rows_of_causal_attention():
    b, h, kv, d, s, tq = 2, 4, 2, 16, 32, 3
    _, k_cache, v_cache = _cache(b, tq, h, kv, d, s)
    lengths = jnp.array([20, 32])
    q_full = jax.random.normal(jax.random.key(5), (b, s, h, d))
    full = reference_attention(q_full, jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2))
    for row, n in enumerate(np.asarray(lengths)):
        q_new = q_full[row:row + 1, n - tq:n]
        got = reference_decode_attention(q_new, k_cache[row:row + 1], v_cache[row:row + 1], lengths[row:row + 1])
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
def test_decode_lowers_for_accelerators(platform, marker):
    q = jax.ShapeDtypeStruct((8, 1, 32, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((8, 8, 4096, 128), jnp.bfloat16)
    lengths = jax.ShapeDtypeStruct((8,), jnp.int32)
    text = jax.jit(pallas_decode_attention).trace(q, cache, cache, lengths).lower(
        lowering_platforms=(platform,)).as_text()
    assert marker in text
