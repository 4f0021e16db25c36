"""The model's masking contracts: causality, packed documents, grouped-query attention, remat and scan."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax.kernels.attention import attention, reference_attention
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer

CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=97)


def _init(cfg, tokens):
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.key(0), tokens, method=Transformer.logits))
    return model, params


def test_changing_a_token_never_changes_earlier_logits():
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    model, params = _init(CFG, tokens)
    base = model.apply(params, tokens, method=Transformer.logits)
    for t in (0, 5, 15):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
        out = model.apply(params, changed, method=Transformer.logits)
        np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))
        assert not np.allclose(out[:, t:], base[:, t:])  # and later logits do change


def test_packed_documents_see_only_themselves():
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, CFG.vocab_size, 7), rng.integers(0, CFG.vocab_size, 9)
    packed = np.concatenate([doc_a, doc_b])[None]
    segments = np.array([[1] * 7 + [2] * 9])
    positions = np.array([list(range(7)) + list(range(9))])
    model, params = _init(CFG, jnp.asarray(packed))
    out = model.apply(params, packed, positions, segments, method=Transformer.logits)
    alone_a = model.apply(params, doc_a[None], method=Transformer.logits)
    alone_b = model.apply(params, doc_b[None], method=Transformer.logits)
    np.testing.assert_allclose(out[0, :7], alone_a[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[0, 7:], alone_b[0], atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_repeated_heads():
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(kq, (2, 8, 6, 16))
    k = jax.random.normal(kk, (2, 8, 2, 16))
    v = jax.random.normal(kv, (2, 8, 2, 16))
    grouped = reference_attention(q, k, v, causal=True)
    # Naive: repeat each K/V head for its 3 query heads, then ordinary multi-head attention.
    k_rep, v_rep = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k_rep) / 4.0
    scores = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), scores, -jnp.inf)
    naive = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, -1), v_rep)
    np.testing.assert_allclose(grouped, naive, atol=1e-5)


def test_unknown_attention_impl_is_an_error():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="attention impl 'flash'"):
        attention(q, q, q, impl="flash")


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch", "dots_attention"])
def test_remat_changes_memory_not_values(remat):
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, CFG.vocab_size)
    model, params = _init(CFG, tokens)
    remat_model = Transformer(ModelConfig(**{**CFG.__dict__, "remat": remat}))

    def loss(m, p):
        return jnp.mean(m.apply(p, tokens, method=Transformer.logits) ** 2)

    base, base_grads = jax.value_and_grad(lambda p: loss(model, p))(params)
    other, other_grads = jax.value_and_grad(lambda p: loss(remat_model, p))(params)
    np.testing.assert_allclose(base, other, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), base_grads, other_grads)


def test_unscanned_layers_compute_the_same_function():
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 0, CFG.vocab_size)
    model, params = _init(CFG, tokens)
    loop_model = Transformer(ModelConfig(**{**CFG.__dict__, "scan_layers": False}))
    blocks = params["params"]["blocks"]
    loop_params = {"params": {k: v for k, v in params["params"].items() if k != "blocks"}}
    for i in range(CFG.n_layers):
        loop_params["params"][f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
    np.testing.assert_allclose(model.apply(params, tokens, method=Transformer.logits),
                               loop_model.apply(loop_params, tokens, method=Transformer.logits), atol=1e-5)


def test_untied_head_and_bfloat16_compute():
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": False, "dtype": "bfloat16"})
    tokens = jnp.zeros((1, 4), jnp.int32)
    model, params = _init(cfg, tokens)
    assert "lm_head" in params["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # f32 master weights
    assert model.apply(params, tokens, method=Transformer.logits).dtype == jnp.float32  # f32 logits


def test_invalid_model_config_names_the_field():
    with pytest.raises(ValueError, match="n_heads=6 is not a multiple of n_kv_heads=4"):
        ModelConfig(**{**CFG.__dict__, "n_heads": 6, "n_kv_heads": 4}).validate()
