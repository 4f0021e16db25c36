"""Bradley–Terry and DPO losses against hand-computed values, DPO's closed-form optimum on a bandit, and the
reward model reading the last real token."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from llm_jax.model.config import ModelConfig
from llm_jax.objectives.dpo import dpo_loss
from llm_jax.objectives.reward import RewardModel, bradley_terry_loss


def test_bradley_terry_loss_values():
    # −log σ(x) = log(1 + e^−x)
    np.testing.assert_allclose(bradley_terry_loss(jnp.array([2.0, 0.0, -1.0]), jnp.array([0.0, 0.0, 1.0])),
                               [np.log1p(np.exp(-2.0)), np.log(2.0), np.log1p(np.exp(2.0))], rtol=1e-6)
    np.testing.assert_allclose(bradley_terry_loss(jnp.array([2.0]), jnp.array([0.0]), margin=1.0),
                               [np.log1p(np.exp(-1.0))], rtol=1e-6)


def test_dpo_loss_values():
    pi_c, pi_r, ref_c, ref_r = map(jnp.array, ([-3.0], [-5.0], [-4.0], [-4.0]))  # h = 1 − (−1) = 2
    beta = 0.5
    np.testing.assert_allclose(dpo_loss(pi_c, pi_r, ref_c, ref_r, beta), [np.log1p(np.exp(-1.0))], rtol=1e-6)
    smoothed = 0.8 * np.log1p(np.exp(-1.0)) + 0.2 * np.log1p(np.exp(1.0))
    np.testing.assert_allclose(dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing=0.2), [smoothed], rtol=1e-6)
    np.testing.assert_allclose(dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss="ipo"), [(2.0 - 1.0) ** 2], rtol=1e-6)
    with pytest.raises(ValueError, match="dpo.loss='kto' is not one of"):
        dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss="kto")


def test_dpo_on_a_bandit_reaches_the_closed_form_optimum():
    """One prompt, K answers, Bradley–Terry preferences from a known reward r: minimising the expected DPO loss
    over all ordered pairs must give π*(y) ∝ π_ref(y)·exp(r(y)/β)."""
    beta = 0.5
    reward = jnp.array([1.0, 0.0, -0.5, 0.7])
    ref_logits = jnp.array([0.3, 1.0, 0.0, -0.4])
    ref_logp = jax.nn.log_softmax(ref_logits)
    k = len(reward)
    i, j = np.triu_indices(k, 1)
    pair_weight = jax.nn.sigmoid(reward[i] - reward[j])  # P(i ≻ j): the pair appears as (chosen=i, rejected=j)

    def expected_loss(theta):
        logp = jax.nn.log_softmax(theta)
        forward = dpo_loss(logp[i], logp[j], ref_logp[i], ref_logp[j], beta)
        backward = dpo_loss(logp[j], logp[i], ref_logp[j], ref_logp[i], beta)
        return jnp.sum(pair_weight * forward + (1 - pair_weight) * backward)

    opt = optax.adam(0.05)

    def step(carry, _):
        theta, state = carry
        updates, state = opt.update(jax.grad(expected_loss)(theta), state)
        return (optax.apply_updates(theta, updates), state), None
    (theta, _), _ = jax.lax.scan(step, (ref_logits, opt.init(ref_logits)), None, length=3000)
    optimum = jax.nn.softmax(ref_logp + reward / beta)
    np.testing.assert_allclose(jax.nn.softmax(theta), optimum, atol=2e-3)
    assert not np.allclose(jax.nn.softmax(ref_logits), optimum, atol=0.05)  # it really moved


def test_reward_model_reads_the_last_real_token():
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, vocab_size=40)
    model = RewardModel(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 4, 40)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    segments = jnp.array([[1] * 5 + [0] * 3, [1] * 8])
    params = nn.unbox(model.init(jax.random.key(1), tokens, positions, segments, method=RewardModel.score))
    assert not params["params"]["reward_head"].any()  # starts at zero: every reward 0
    params["params"]["reward_head"] = jax.random.normal(jax.random.key(2), (32,))
    rewards = model.apply(params, tokens, positions, segments, method=RewardModel.score)
    hidden = model.apply(params, tokens, positions, segments)
    np.testing.assert_allclose(rewards, [hidden[0, 4] @ params["params"]["reward_head"],
                                         hidden[1, 7] @ params["params"]["reward_head"]], rtol=1e-5)
    # padding after the last real token changes nothing
    other = tokens.at[0, 5:].set(7)
    np.testing.assert_allclose(model.apply(params, other, positions, segments, method=RewardModel.score), rewards,
                               rtol=1e-5)


def test_likelihood_readout_adds_the_answers_log_likelihood():
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, vocab_size=40)
    model = RewardModel(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 4, 40)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    segments = jnp.array([[1] * 6 + [0] * 2, [1] * 8])
    answer = jnp.array([[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0]], jnp.float32)
    params = nn.unbox(model.init(jax.random.key(1), inputs, positions, segments, method=RewardModel.score))
    params["params"]["reward_head"] = jax.random.normal(jax.random.key(2), (32,))
    last = model.apply(params, inputs, positions, segments, method=RewardModel.score)
    got = model.apply(params, inputs, positions, segments, targets, answer, readout="likelihood",
                      method=RewardModel.score)
    log_probs = jax.nn.log_softmax(model.apply(params, inputs, positions, segments, method=RewardModel.logits))
    want = last + jnp.array([sum(float(log_probs[b, t, targets[b, t]]) for t in range(8) if answer[b, t])
                             for b in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="not one of"):
        model.apply(params, inputs, positions, segments, targets, answer, readout="mean", method=RewardModel.score)


def test_dpo_nll_term_adds_the_chosen_answers_per_token_nll():
    from llm_jax.model.transformer import Transformer
    from llm_jax.objectives.dpo import make_loss_fn, sequence_log_probs
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64, vocab_size=40)
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 2, 9), 4, 40)
    batch = {}
    for side, toks, mask in (("chosen", tokens[0], [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0, 0]]),
                             ("rejected", tokens[1], [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]])):
        batch.update({f"{side}_inputs": toks[:, :-1], f"{side}_targets": toks[:, 1:],
                      f"{side}_positions": jnp.broadcast_to(jnp.arange(8), (2, 8)),
                      f"{side}_segment_ids": jnp.ones((2, 8), jnp.int32),
                      f"{side}_loss_mask": jnp.array(mask, jnp.float32)})
    batch.update(ref_chosen_logp=jnp.array([-9.0, -3.0]), ref_rejected_logp=jnp.array([-7.0, -6.0]))
    params = nn.unbox(model.init(jax.random.key(1), batch["chosen_inputs"], method=Transformer.logits))
    plain, stats = make_loss_fn(model, 0.1, 0.0, "sigmoid")(params, batch, None)
    with_nll, _ = make_loss_fn(model, 0.1, 0.0, "sigmoid", nll_coef=0.5)(params, batch, None)
    chosen, _ = sequence_log_probs(model, params, batch)
    per_token_nll = -chosen / jnp.array([3.0, 1.0])  # the chosen answers have 3 and 1 tokens
    np.testing.assert_allclose(stats["chosen_nll"], per_token_nll.sum(), rtol=1e-5)
    np.testing.assert_allclose(with_nll - plain, 0.5 * per_token_nll.sum(), rtol=1e-5)
