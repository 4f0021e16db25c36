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
    _check_against_reference(impl, q, k, v, dout, segment_ids_bt=segments, causal=causal)


def _check_against_reference(impl, q, k, v, dout, **options):
    """`attention(impl=impl, **options)` against the reference: the output and the three gradients."""
    def loss(fn):
        return lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_, **options) * dout)

    impl_fn = lambda *a, **kw: attention(*a, impl=impl, **kw)  # noqa: E731
    np.testing.assert_allclose(impl_fn(q, k, v, **options), reference_attention(q, k, v, **options),
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


WINDOW_CASES = [  # (batch, length, heads, kv heads, head dim, window, packed)
    (2, 32, 4, 2, 16, 5, False),
    (1, 64, 4, 1, 32, 16, True),
    (2, 24, 2, 2, 16, 1, False),   # a window of one: each query sees only itself
    (1, 16, 2, 1, 16, 64, True),   # a window longer than the sequence: plain causal attention
]


def test_the_reference_window_hides_exactly_the_keys_w_or_more_behind():
    q, k, v, _, _ = _inputs(1, 12, 2, 1, 16, packed=False)
    got = reference_attention(q, k, v, window=3)
    for t in range(12):  # query t sees keys t-2..t and nothing else
        lo = max(0, t - 2)
        scores = jnp.einsum("hd,sd->hs", q[0, t], k[0, lo:t + 1, 0]) / 4.0
        want = jnp.einsum("hs,sd->hd", jax.nn.softmax(scores, axis=-1), v[0, lo:t + 1, 0])
        np.testing.assert_allclose(got[0, t], want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(reference_attention(q, k, v, window=64), reference_attention(q, k, v), atol=1e-6)
    with pytest.raises(ValueError, match="needs causal attention"):
        reference_attention(q, k, v, causal=False, window=3)


@pytest.mark.parametrize("impl", [i for i in RUNNABLE if i not in ("reference", "cudnn")])
@pytest.mark.parametrize("b, t, h, kv, d, window, packed", WINDOW_CASES)
def test_a_sliding_window_matches_the_reference_forward_and_gradients(impl, b, t, h, kv, d, window, packed):
    q, k, v, dout, segments = _inputs(b, t, h, kv, d, packed)
    _check_against_reference(impl, q, k, v, dout, segment_ids_bt=segments, window=window)
