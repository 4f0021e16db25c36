"""Generation with the KV cache against argmax decoding by full forward passes, and the sampler's contracts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import sharding
from llm_jax.configs_common import DEFAULT_RULES
from llm_jax.generate import SamplingConfig, generate, sample
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer

CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=61)


def _model_and_prompts(cfg=CFG, mesh=None, rules=()):
    model = Transformer(cfg, mesh, rules)
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    prompts = np.asarray(jax.random.randint(jax.random.key(0), (4, 9), 4, cfg.vocab_size), np.int32)
    lengths = np.array([9, 3, 6, 1], np.int32)
    return model, params, prompts, lengths


def _argmax_by_full_forward(model, params, prompt, n):
    """Token by token: run the whole sequence so far (in a fixed-size buffer, so one compilation serves every
    step; causal attention keeps the unused tail from mattering), take the argmax at its last position."""
    logits_fn = jax.jit(lambda seq: model.apply(params, seq[None], method=Transformer.logits)[0])
    seq = np.zeros(len(prompt) + n, np.int32)
    seq[:len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        seq[t] = int(jnp.argmax(logits_fn(jnp.asarray(seq))[t - 1]))
    return seq[len(prompt):].tolist()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_with_the_cache_equals_argmax_of_full_forward_passes(scan_layers):
    cfg = ModelConfig(**{**CFG.__dict__, "scan_layers": scan_layers})
    model, params, prompts, lengths = _model_and_prompts(cfg)
    out = generate(model, params, prompts, lengths, jax.random.key(0), SamplingConfig(max_new_tokens=10, temperature=0))
    for row, n in enumerate(lengths):
        assert out.tokens[row].tolist() == _argmax_by_full_forward(model, params, prompts[row, :n], 10), row
    np.testing.assert_array_equal(out.mask, 1.0)
    # greedy log-probs are the model's own (temperature 1)
    logits = model.apply(params, jnp.asarray(prompts[:1]), method=Transformer.logits)
    np.testing.assert_allclose(out.log_probs[0, 0], jax.nn.log_softmax(logits[0, -1])[out.tokens[0, 0]], rtol=1e-5)


def test_cache_and_full_forward_samplers_agree_when_sampling():
    model, params, prompts, lengths = _model_and_prompts()
    sampling = SamplingConfig(max_new_tokens=8, temperature=0.8, top_k=10, top_p=0.9)
    cached = generate(model, params, prompts, lengths, jax.random.key(7), sampling)
    full = generate(model, params, prompts, lengths, jax.random.key(7), sampling, use_cache=False)
    np.testing.assert_array_equal(cached.tokens, full.tokens)
    np.testing.assert_allclose(cached.log_probs, full.log_probs, atol=1e-5)


def test_sampling_is_reproducible_from_the_seed():
    model, params, prompts, lengths = _model_and_prompts()
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    a = generate(model, params, prompts, lengths, jax.random.key(3), sampling)
    b = generate(model, params, prompts, lengths, jax.random.key(3), sampling)
    c = generate(model, params, prompts, lengths, jax.random.key(4), sampling)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


def test_rows_stop_at_a_stop_token_and_pad_after_it():
    model, params, prompts, lengths = _model_and_prompts()
    free = generate(model, params, prompts, lengths, jax.random.key(0), SamplingConfig(max_new_tokens=10, temperature=0))
    stop = int(free.tokens[1, 3])  # make row 1's fourth token a stop token
    out = generate(model, params, prompts, lengths, jax.random.key(0),
                   SamplingConfig(max_new_tokens=10, temperature=0, stop_ids=(stop,)))
    for row in range(len(lengths)):
        tokens = free.tokens[row].tolist()
        n = tokens.index(stop) + 1 if stop in tokens else 10
        assert out.lengths[row] == n
        assert out.tokens[row, :n].tolist() == tokens[:n]
        assert not out.tokens[row, n:].any() and not out.mask[row, n:].any() and not out.log_probs[row, n:].any()
        assert out.mask[row, :n].all()
    assert out.lengths[1] <= 4


def test_sampler_frequencies_follow_the_tempered_softmax_and_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    rows = jnp.repeat(logits, 20000, axis=0)
    tokens, log_probs = sample(rows, jax.random.key(0), SamplingConfig(temperature=1.0))
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / 20000, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    np.testing.assert_allclose(log_probs, jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))[tokens], rtol=1e-5)
    top2, _ = sample(rows, jax.random.key(1), SamplingConfig(temperature=1.0, top_k=2))
    np.testing.assert_allclose(np.bincount(top2, minlength=4) / 20000, [0.625, 0.375, 0, 0], atol=0.015)
    nucleus, _ = sample(rows, jax.random.key(2), SamplingConfig(temperature=1.0, top_p=0.7))  # 0.5 + 0.3 crosses
    np.testing.assert_allclose(np.bincount(nucleus, minlength=4) / 20000, [0.625, 0.375, 0, 0], atol=0.015)
    hot, _ = sample(rows, jax.random.key(3), SamplingConfig(temperature=0.5))  # p² renormalised
    p2 = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(np.bincount(hot, minlength=4) / 20000, p2 / p2.sum(), atol=0.015)


def test_sharded_generation_matches_one_device():
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2, sequence=1))
    model, params, prompts, lengths = _model_and_prompts()
    sharded_model = Transformer(CFG, mesh, DEFAULT_RULES)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7)
    want = generate(model, params, prompts, lengths, jax.random.key(5), sampling)
    got = generate(sharded_model, params, prompts, lengths, jax.random.key(5), sampling)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.log_probs, want.log_probs, atol=1e-5)


def test_bad_prompts_and_settings_are_named():
    model, params, prompts, lengths = _model_and_prompts()
    with pytest.raises(ValueError, match=r"prompt lengths must be in \[1, 9\], got 0..9"):
        generate(model, params, prompts, np.array([9, 0, 1, 1]), jax.random.key(0), SamplingConfig())
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 61\)"):
        generate(model, params, prompts + 100, lengths, jax.random.key(0), SamplingConfig())
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=0.0)
