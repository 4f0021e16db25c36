"""Every attention implementation on this platform, through the dispatch, against the reference: forward and the
three gradients. (The Pallas kernel families are covered shape by shape in test_flash_attention.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.kernels.attention import IMPLEMENTATIONS, attention, reference_attention, resolve_impl

# cudnn needs an NVIDIA GPU; on CPU "pallas" runs the TPU kernels in interpret mode.
RUNNABLE = [i for i in IMPLEMENTATIONS if i != "cudnn" or jax.default_backend() == "gpu"]

CASES = [  # (batch, length, heads, kv heads, head dim, causal, packed)
    (2, 16, 4, 4, 16, True, False),
    (2, 32, 6, 2, 16, True, True),
    (1, 256, 4, 1, 64, True, True),
    (2, 24, 4, 2, 32, False, True),
    (1, 128, 2, 2, 128, False, False),
]


def _inputs(b, t, h, kv, d, packed, seed=0):
    kq, kk, kv_, kd = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, kv, d))
    v = jax.random.normal(kv_, (b, t, kv, d))
    dout = jax.random.normal(kd, (b, t, h, d))
    segments = None
    if packed:  # three documents of uneven length, then padding (segment 0)
        cuts = np.array([t // 5, t // 2, t - t // 8])
        segments = jnp.asarray(np.broadcast_to(np.searchsorted(cuts, np.arange(t), side="right") + 1, (b, t)))
        segments = segments.at[:, cuts[-1]:].set(0)
    return q, k, v, dout, segments


@pytest.mark.parametrize("impl", [i for i in RUNNABLE if i not in ("reference", "cudnn")])
@pytest.mark.parametrize("b, t, h, kv, d, causal, packed", CASES)
def test_matches_the_reference_forward_and_gradients(impl, b, t, h, kv, d, causal, packed):
    q, k, v, dout, segments = _inputs(b, t, h, kv, d, packed)

    def loss(fn):
        return lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_, segment_ids_bt=segments, causal=causal) * dout)

    impl_fn = lambda *a, **kw: attention(*a, impl=impl, **kw)  # noqa: E731
    np.testing.assert_allclose(impl_fn(q, k, v, segment_ids_bt=segments, causal=causal),
                               reference_attention(q, k, v, segment_ids_bt=segments, causal=causal),
                               atol=2e-5, rtol=2e-5)
    grads = jax.grad(loss(impl_fn), argnums=(0, 1, 2))(q, k, v)
    ref_grads = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=5e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", RUNNABLE)
def test_bfloat16_inputs_stay_close_to_float32(impl):
    q, k, v, _, segments = _inputs(2, 64, 4, 2, 32, packed=True)
    want = reference_attention(q, k, v, segment_ids_bt=segments)
    got = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                    segment_ids_bt=segments, impl=impl)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=5e-2, rtol=5e-2)


def test_auto_picks_per_platform_and_bad_names_are_refused():
    assert resolve_impl("auto", "tpu", jnp.float32) == "pallas"
    assert resolve_impl("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert resolve_impl("auto", "gpu", jnp.float32) == "xla"  # cuDNN's fused attention is half precision only
    assert resolve_impl("auto", "cpu", jnp.bfloat16) == "xla"
    assert resolve_impl("reference", "tpu", jnp.float32) == "reference"
    with pytest.raises(ValueError, match="attention impl 'flash' is not one of"):
        resolve_impl("flash", "cpu", jnp.float32)
