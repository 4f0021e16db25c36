"""Continuous batching against the static generator: same tokens, mask, lengths and log-probs whatever the slots."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import sharding
from llm_jax.configs_common import DEFAULT_RULES
from llm_jax.continuous_batching import generate_continuous
from llm_jax.generate import SamplingConfig, generate
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer

# init_std 0.5: a random model whose greedy answers vary from token to token (at 0.02 they repeat one token)
CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=61,
                  init_std=0.5)
N_PROMPTS, PROMPT_LEN, NEW = 11, 9, 12
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def setup():
    model = Transformer(CFG)
    params = model.init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))
    prompts = np.asarray(jax.random.randint(jax.random.key(0), (N_PROMPTS, PROMPT_LEN), 4, CFG.vocab_size), np.int32)
    lengths = np.array([9, 3, 6, 1, 5, 8, 2, 9, 4, 7, 3], np.int32)
    # Stop ids taken from the free-running greedy answers, so that answers end at mixed lengths.
    free = generate(model, params, prompts, lengths, jax.random.key(0), SamplingConfig(NEW, temperature=0))
    stop_ids = (int(free.tokens[0, 2]), int(free.tokens[4, 6]))
    return model, params, prompts, lengths, stop_ids


def _assert_same(got, want):
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_allclose(np.asarray(got.log_probs), np.asarray(want.log_probs), atol=1e-4)


@pytest.mark.parametrize("slots", [1, 4, N_PROMPTS, 16])  # one, not dividing 11, exactly 11, more than 11
def test_greedy_continuous_equals_static(setup, slots):
    model, params, prompts, lengths, stop_ids = setup
    sampling = SamplingConfig(NEW, temperature=0, stop_ids=stop_ids)
    want = generate(model, params, prompts, lengths, jax.random.key(0), sampling)
    answer_lengths = set(np.asarray(want.lengths).tolist())
    assert len(answer_lengths) >= 3 and NEW in answer_lengths, answer_lengths  # the test's premise: mixed lengths
    got = generate_continuous(model, params, prompts, lengths, jax.random.key(0), sampling, slots=slots)
    assert got.tokens.shape == (N_PROMPTS, NEW) and got.lengths.shape == (N_PROMPTS,)
    _assert_same(got, want)
    assert not np.asarray(got.tokens)[np.asarray(got.mask) == 0].any()


@pytest.mark.parametrize("slots", [3, 5])
def test_sampled_continuous_equals_static_with_row_keys(setup, slots):
    model, params, prompts, lengths, stop_ids = setup
    sampling = SamplingConfig(NEW, temperature=0.9, top_k=20, top_p=0.95, stop_ids=stop_ids)
    want = generate(model, params, prompts, lengths, jax.random.key(3), sampling, row_keys=True)
    assert len(set(np.asarray(want.lengths).tolist())) >= 3
    got = generate_continuous(model, params, prompts, lengths, jax.random.key(3), sampling, slots=slots)
    _assert_same(got, want)
    # the default static keys (one per step) draw other tokens: the per-row keys are what makes them agree
    default = generate(model, params, prompts, lengths, jax.random.key(3), sampling)
    assert not np.array_equal(np.asarray(default.tokens), np.asarray(want.tokens))


@pytest.mark.parametrize("axes", [dict(data=8), dict(fsdp=8)])
def test_sharded_continuous_equals_one_device(setup, axes):
    model, params, prompts, lengths, stop_ids = setup
    mesh = sharding.make_mesh({**dict(data=1, fsdp=1, tensor=1, sequence=1), **axes})
    sampling = SamplingConfig(NEW, temperature=1.0, stop_ids=stop_ids)
    want = generate_continuous(model, params, prompts, lengths, jax.random.key(5), sampling, slots=8)
    got = generate_continuous(Transformer(CFG, mesh, DEFAULT_RULES), params, prompts, lengths, jax.random.key(5),
                              sampling, slots=8)
    _assert_same(got, want)


def test_a_second_call_of_the_same_shapes_does_not_recompile(setup):
    model, params, prompts, lengths, stop_ids = setup
    sampling = SamplingConfig(NEW, temperature=1.0, stop_ids=stop_ids)
    compiled = []

    def listen(event, duration, **kwargs):
        if event == COMPILE_EVENT and kwargs.get("fun_name") == "jit(continuous_generate_fn)":
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        first = generate_continuous(model, params, prompts[:7, :5], np.minimum(lengths[:7], 5), jax.random.key(0),
                                    sampling, slots=2)
        assert len(compiled) == 1
        other_prompts = (prompts[4:, :5] + 1) % CFG.vocab_size
        second = generate_continuous(model, params, other_prompts, np.minimum(lengths[4:], 5)[::-1],
                                     jax.random.key(1), sampling, slots=2)
        assert len(compiled) == 1
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert not np.array_equal(np.asarray(first.tokens), np.asarray(second.tokens))


def test_bad_input_is_named(setup):
    model, params, prompts, lengths, _ = setup
    sampling = SamplingConfig(4)
    for slots in (0, -2, 1.5):
        with pytest.raises(ValueError, match=rf"slots must be an integer ≥ 1, got {slots}"):
            generate_continuous(model, params, prompts, lengths, jax.random.key(0), sampling, slots=slots)
    with pytest.raises(ValueError, match=r"no prompts to generate from: prompt tokens have shape \(0, 9\)"):
        generate_continuous(model, params, prompts[:0], lengths[:0], jax.random.key(0), sampling, slots=2)
    with pytest.raises(ValueError, match=r"prompt lengths must be in \[1, 9\], got 0..9"):
        generate_continuous(model, params, prompts, np.where(lengths == 1, 0, lengths), jax.random.key(0), sampling,
                            slots=2)
    with pytest.raises(ValueError, match=r"prompt lengths must be in \[1, 9\], got 1..10"):
        generate_continuous(model, params, prompts, np.where(lengths == 9, 10, lengths), jax.random.key(0), sampling,
                            slots=2)
