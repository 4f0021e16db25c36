"""`attention_weights`: the softmax weights the model's own forward attends with, masks and head groups included."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax.kernels.attention import reference_attention
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Attention, RMSNorm, Transformer, attention_weights

# Grouped-query attention: 4 query heads share 2 K/V heads, so query head h reads K/V head h // 2.
CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=97,
                  attention_impl="reference")
T = 12


def _model(**changes):
    cfg = dataclasses.replace(CFG, **changes)
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfg.vocab_size)
    return Transformer(cfg), _params(dataclasses.replace(cfg, attention_impl="reference")), tokens


@functools.cache
def _params(cfg):
    """Params depend on the shape only (not on `attention_impl`): initialised once per shape, jitted."""
    model, tokens = Transformer(cfg), jnp.zeros((1, T), jnp.int32)
    return nn.unbox(jax.jit(lambda key: model.init(key, tokens, method=Transformer.logits))(jax.random.key(0)))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_rows_are_causal_distributions(scan_layers):
    model, params, tokens = _model(scan_layers=scan_layers)
    w = np.asarray(attention_weights(model, params, tokens))
    assert w.shape == (CFG.n_layers, 2, CFG.n_heads, T, T) and w.dtype == np.float32
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert (w[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()  # no weight on the future
    assert (w[..., np.tril_indices(T)[0], np.tril_indices(T)[1]] > 0).all()
    jitted = jax.jit(attention_weights, static_argnums=0)(model, params, tokens)
    np.testing.assert_allclose(jitted, w, atol=1e-6)


def test_weights_times_values_are_the_layer_output():
    """Rebuild each layer's attention output from its weights, its V heads (repeated over their query-head group)
    and W_o; a weight on the wrong key, or a query head read against the wrong K/V head, would not add up."""
    model, params, tokens = _model(scan_layers=False)
    captured = (lambda mdl, _: isinstance(mdl, (Attention, RMSNorm)))
    _, state = model.apply(params, tokens, mutable=["intermediates"], capture_intermediates=captured)
    found = state["intermediates"]
    group = CFG.n_heads // CFG.n_kv_heads
    for i in range(CFG.n_layers):
        layer, block = found[f"block_{i}"], params["params"][f"block_{i}"]["attn"]
        (w_bhts,) = layer["attn"]["attention_weights"]
        (x_btd,) = layer["attn_norm"]["__call__"]
        (out_btd,) = layer["attn"]["__call__"]
        v_btkd = jnp.einsum("btd,dkh->btkh", x_btd, block["wv"])
        v_bthd = jnp.repeat(v_btkd, group, axis=2)
        rebuilt_btd = jnp.einsum("bhts,bshd,hde->bte", w_bhts, v_bthd, block["wo"])
        np.testing.assert_allclose(rebuilt_btd, out_btd, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_the_forward_is_unchanged_with_weights_on(impl):
    model, params, tokens = _model(attention_impl=impl)
    plain = jax.jit(lambda p: model.apply(p, tokens, method=Transformer.logits))(params)
    with_weights, state = jax.jit(lambda p: model.apply(p, tokens, method=Transformer.logits,
                                                        mutable=["intermediates"]))(params)
    assert state["intermediates"]["blocks"]["attn"]["attention_weights"][0].shape == (2, 2, 4, T, T)
    if impl == "reference":
        np.testing.assert_array_equal(with_weights, plain)
    else:  # the weights come from the reference path; the xla path's logits agree up to rounding
        np.testing.assert_allclose(with_weights, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "xla", "pallas"])
def test_kernel_models_fall_back_to_the_reference(impl):
    model, params, tokens = _model(attention_impl=impl)
    reference, _, _ = _model()
    np.testing.assert_array_equal(attention_weights(model, params, tokens),
                                  attention_weights(reference, params, tokens))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_local_layers_see_only_their_window(scan_layers):
    """Gemma-3-style alternation: layers 0 and 2 are local (window 4), layer 1 global."""
    model, params, tokens = _model(n_layers=3, sliding_window=4, global_every=2, scan_layers=scan_layers)
    w = np.asarray(attention_weights(model, params, tokens))
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    outside = s <= t - 4
    for layer, local in enumerate([True, False, True]):
        np.testing.assert_allclose(w[layer].sum(-1), 1.0, atol=1e-6)
        if local:
            assert (w[layer][..., outside] == 0).all() and (w[layer][..., (s <= t) & ~outside] > 0).all()
        else:
            assert (w[layer][..., outside] > 0).all()


def test_packed_documents_weigh_only_their_own_tokens():
    model, params, _ = _model()
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, CFG.vocab_size, 5), rng.integers(0, CFG.vocab_size, 7)
    packed = jnp.asarray(np.concatenate([doc_a, doc_b])[None])
    segments = jnp.asarray([[1] * 5 + [2] * 7])
    positions = jnp.asarray([list(range(5)) + list(range(7))])
    w = np.asarray(attention_weights(model, params, packed, positions, segments))[:, 0]
    assert (w[..., 5:, :5] == 0).all()
    alone_a = attention_weights(model, params, jnp.asarray(doc_a[None]))[:, 0]
    alone_b = attention_weights(model, params, jnp.asarray(doc_b[None]))[:, 0]
    np.testing.assert_allclose(w[..., :5, :5], alone_a, atol=1e-5)
    np.testing.assert_allclose(w[..., 5:, 5:], alone_b, atol=1e-5)


def test_reference_attention_returns_the_weights_it_used():
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(kq, (2, 8, 6, 16))
    k, v = jax.random.normal(kk, (2, 8, 2, 16)), jax.random.normal(kv, (2, 8, 2, 16))
    out, w_bhts = reference_attention(q, k, v, window=3, return_probs=True)
    np.testing.assert_array_equal(out, reference_attention(q, k, v, window=3))
    np.testing.assert_allclose(jnp.einsum("bhts,bshd->bthd", w_bhts, jnp.repeat(v, 3, axis=2)), out, atol=1e-5)
