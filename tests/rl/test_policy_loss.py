"""The policy loss's options against hand-computed numbers: PPO as the special case of losses.policy_loss,
clip-higher, the GSPO sequence ratio and its gradient, the three aggregations and their micro-batch
additivity, the KL loss term for k1/k2/k3, the entropy bonus, truncated importance sampling, validation and
the sampler/trainer mismatch statistic."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.rl import losses
from llm_jax.rl.policy_loss import PolicyLossOptions, aggregate, logprob_mismatch, policy_loss


def _mask(lengths, t):
    return jnp.asarray((np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32))


def _random_batch(seed, lengths, t):
    rng = np.random.default_rng(seed)
    mask = _mask(lengths, t)
    old = rng.normal(-2.0, 0.5, size=mask.shape).astype(np.float32)
    logp = old + rng.normal(0.0, 0.3, size=mask.shape).astype(np.float32)
    adv = rng.normal(size=mask.shape).astype(np.float32)
    return jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv), mask


def test_ppo_is_the_token_ratio_with_a_symmetric_clip():
    logp, old, adv, mask = _random_batch(0, [5, 0, 3, 1, 5], 5)
    options = PolicyLossOptions(clip_eps_low=0.2, clip_eps_high=0.2, ratio="token", aggregation="token")
    loss_sum, weight, stats = policy_loss(logp, old, adv, mask, options)
    want_sum, want_stats = losses.policy_loss(logp, old, adv, mask, 0.2)
    np.testing.assert_array_equal(loss_sum, want_sum)
    assert float(weight) == 14.0
    for name in ("clip_fraction", "approx_kl", "ratio"):
        np.testing.assert_array_equal(stats[name], want_stats[name])
    assert float(stats["clip_fraction"]) > 0  # the example does clip
    np.testing.assert_array_equal(jax.grad(lambda lp: policy_loss(lp, old, adv, mask, options)[0])(logp),
                                  jax.grad(lambda lp: losses.policy_loss(lp, old, adv, mask, 0.2)[0])(logp))


def test_clip_higher_is_asymmetric():
    ratio = np.array([1.25, 0.75, 1.3, 0.7], np.float32)
    adv = jnp.array([[1.0, -1.0, 1.0, 1.0]])
    old = jnp.full((1, 4), -1.0)
    logp = old + jnp.log(jnp.asarray(ratio))[None]
    mask = jnp.ones((1, 4))
    options = PolicyLossOptions(clip_eps_low=0.2, clip_eps_high=0.28)
    loss_sum, weight, stats = policy_loss(logp, old, adv, mask, options)
    # max(−A·ρ, −A·clip(ρ, 0.8, 1.28)): ρ = 1.25, A > 0 → −1.25 (inside [0.8, 1.28]); ρ = 0.75, A < 0 → 0.8
    # (clipped low); ρ = 1.3, A > 0 → −1.28 (clipped high); ρ = 0.7, A > 0 → −0.7 (the pessimistic side)
    np.testing.assert_allclose(loss_sum, -1.25 + 0.8 - 1.28 - 0.7, rtol=1e-6)
    assert float(weight) == 4.0
    assert float(stats["clip_fraction_low"]) == 2.0 and float(stats["clip_fraction_high"]) == 1.0
    assert float(stats["clip_fraction"]) == 3.0
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, options)[0])(logp)[0]
    np.testing.assert_allclose(grad, [-1.25, 0.0, 0.0, -0.7], rtol=1e-5)
    # with ε_high = ε_low = 0.2 the ρ = 1.25 token is clipped too: −1.2, and no gradient
    symmetric = PolicyLossOptions(clip_eps_low=0.2, clip_eps_high=0.2)
    np.testing.assert_allclose(policy_loss(logp, old, adv, mask, symmetric)[0], -1.2 + 0.8 - 1.2 - 0.7, rtol=1e-6)
    assert float(jax.grad(lambda lp: policy_loss(lp, old, adv, mask, symmetric)[0])(logp)[0, 0]) == 0.0


def test_gspo_sequence_ratio_values_and_gradient():
    mask = _mask([2, 3], 3)
    old = jnp.full((2, 3), -1.0)
    log_ratio = jnp.array([[0.1, 0.3, 5.0], [-0.3, 0.0, 0.0]])  # 5.0 on padding, never read
    logp = old + log_ratio
    adv = jnp.array([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    s0, s1 = np.exp(0.2), np.exp(-0.1)  # exp of each response's mean log-ratio: 1.221403, 0.904837
    # response 0: A > 0, s0 > 1.2 → every token −1.2 (clipped together); response 1: inside → every token 2·s1
    seq = PolicyLossOptions(ratio="sequence", aggregation="sequence")
    loss_sum, weight, stats = policy_loss(logp, old, adv, mask, seq)
    np.testing.assert_allclose(loss_sum, -1.2 + 2 * s1, rtol=1e-5)
    assert float(weight) == 2.0
    np.testing.assert_allclose(stats["ratio"], s0 + s1, rtol=1e-5)
    assert float(stats["clip_fraction_high"]) == 1.0 and float(stats["clip_fraction_low"]) == 0.0
    tok = PolicyLossOptions(ratio="sequence", aggregation="token")
    np.testing.assert_allclose(policy_loss(logp, old, adv, mask, tok)[0], 2 * -1.2 + 3 * 2 * s1, rtol=1e-5)
    # GSPO's gradient, s_i·A_i·(1/|y_i|)·Σ_t ∇log π_t: −A·s1/3 on each of response 1's tokens, 0 on the clipped
    # response and on padding
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, seq)[0])(logp)
    np.testing.assert_allclose(grad, [[0.0, 0.0, 0.0], [2 * s1 / 3] * 3], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_gspo_and_token_ratios_agree_on_one_token_responses(aggregation):
    logp, old, adv, mask = _random_batch(1, [1, 1, 0, 1, 1, 1], 1)
    grads = []
    for ratio in ("token", "sequence"):
        options = PolicyLossOptions(ratio=ratio, aggregation=aggregation, max_tokens=1, clip_eps_high=0.25)
        value, grad = jax.value_and_grad(lambda lp, o=options: policy_loss(lp, old, adv, mask, o)[0])(logp)
        grads.append((value, grad))
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-6)
    np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-8)
    assert float(jnp.max(jnp.abs(grads[0][1]))) > 0


def test_the_three_aggregations_hand_computed():
    mask = _mask([2, 1, 0, 3], 3)
    adv = jnp.array([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0], [50.0, 50.0, 50.0], [-1.0, -1.0, 4.0]])
    logp = jnp.zeros((4, 3))  # ρ = 1: the per-token loss is −A
    want = {"token": (-8.0, 6.0),                              # −(1 + 2 + 3 − 1 − 1 + 4) over 6 tokens
            "sequence": (-1.5 - 3.0 - 2.0 / 3.0, 3.0),          # per response −1.5, −3, −2/3; the empty row nowhere
            "constant": (-8.0 / 4.0, 4.0)}                      # Σ / max_tokens = 4, weight B = 4
    for aggregation, (loss_sum, weight) in want.items():
        options = PolicyLossOptions(aggregation=aggregation, max_tokens=4)
        got_sum, got_weight, stats = policy_loss(logp, logp, adv, mask, options)
        np.testing.assert_allclose(got_sum, loss_sum, rtol=1e-6, err_msg=aggregation)
        assert float(got_weight) == weight, aggregation
        np.testing.assert_allclose(stats["ratio"], weight if aggregation != "constant" else 6.0 / 4.0, rtol=1e-6)
        np.testing.assert_allclose(aggregate(-adv, mask, aggregation, 4)[0], loss_sum, rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_micro_batches_add_up_to_the_whole_batch(aggregation):
    logp, old, adv, mask = _random_batch(2, [4, 0, 2, 1, 4, 3], 4)
    ref = old - 0.3
    entropy = jnp.abs(adv) + 0.5
    sampler = old + 0.2 * adv
    options = PolicyLossOptions(clip_eps_low=0.1, clip_eps_high=0.15, aggregation=aggregation, max_tokens=4,
                                kl_in_loss_coef=0.1, entropy_coef=0.01, tis_cap=1.1)

    def run(rows):
        return policy_loss(logp[rows], old[rows], adv[rows], mask[rows], options, ref_logp_bt=ref[rows],
                           entropy_bt=entropy[rows], sampler_logp_bt=sampler[rows])

    whole = run(slice(0, 6))
    first, second = run(slice(0, 3)), run(slice(3, 6))
    np.testing.assert_allclose(first[0] + second[0], whole[0], rtol=1e-5)
    assert float(first[1] + second[1]) == float(whole[1])
    assert set(whole[2]) == {"policy_loss", "clip_fraction", "clip_fraction_low", "clip_fraction_high",
                             "approx_kl", "ratio", "kl", "entropy", "tis_weight", "tis_capped"}
    for name in whole[2]:
        np.testing.assert_allclose(first[2][name] + second[2][name], whole[2][name], rtol=1e-5, err_msg=name)
    # the gradient of the summed loss is additive too: accumulation divides it once by the summed weight
    grad = lambda rows: jax.grad(lambda lp: policy_loss(lp, old[rows], adv[rows], mask[rows], options,  # noqa: E731
                                                        ref_logp_bt=ref[rows], entropy_bt=entropy[rows],
                                                        sampler_logp_bt=sampler[rows])[0])(logp[rows])
    np.testing.assert_allclose(jnp.concatenate([grad(slice(0, 3)), grad(slice(3, 6))]), grad(slice(0, 6)),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator,kl,dkl", [
    # r = log π_ref − log π = −0.5, 1.0 on the two tokens
    ("k1", [0.5, -1.0], [1.0, 1.0]),                                   # log π − log π_ref; d/dlog π = 1
    ("k2", [0.125, 0.5], [0.5, -1.0]),                                 # r²/2; d/dlog π = −r
    ("k3", [np.exp(-0.5) - 0.5, np.e - 2.0], [1 - np.exp(-0.5), 1 - np.e]),  # e^r − 1 − r; d/dlog π = 1 − e^r
])
def test_kl_loss_term_for_each_estimator(estimator, kl, dkl):
    logp = jnp.array([[-1.0, -2.0, 0.0]])
    ref = jnp.array([[-1.5, -1.0, jnp.inf]])  # inf on padding: nothing reaches the loss or the gradient
    mask = jnp.array([[1.0, 1.0, 0.0]])
    adv = jnp.zeros((1, 3))  # no surrogate: the loss is the KL term alone
    options = PolicyLossOptions(kl_in_loss_coef=0.1, kl_estimator=estimator)
    loss_sum, weight, stats = policy_loss(logp, logp, adv, mask, options, ref_logp_bt=ref)
    np.testing.assert_allclose(loss_sum, 0.1 * sum(kl), rtol=1e-5)
    np.testing.assert_allclose(stats["kl"], sum(kl), rtol=1e-5)
    assert float(weight) == 2.0
    # the gradient goes through log π only (old_logp = logp held fixed; A = 0)
    grad = jax.grad(lambda lp: policy_loss(lp, logp, adv, mask, options, ref_logp_bt=ref)[0])(logp)
    np.testing.assert_allclose(grad, [[0.1 * dkl[0], 0.1 * dkl[1], 0.0]], rtol=1e-5)
    # given a reference but no coefficient: the kl stat only
    plain_sum, _, plain_stats = policy_loss(logp, logp, adv, mask, PolicyLossOptions(kl_estimator=estimator),
                                            ref_logp_bt=ref)
    assert float(plain_sum) == 0.0
    np.testing.assert_allclose(plain_stats["kl"], sum(kl), rtol=1e-5)


def test_entropy_bonus():
    logp = jnp.zeros((1, 3))
    mask = jnp.array([[1.0, 1.0, 0.0]])
    entropy = jnp.array([[0.5, 1.5, jnp.nan]])
    options = PolicyLossOptions(entropy_coef=0.1, aggregation="sequence")
    loss_sum, weight, stats = policy_loss(logp, logp, jnp.zeros((1, 3)), mask, options, entropy_bt=entropy)
    np.testing.assert_allclose(loss_sum, -0.1 * 1.0, rtol=1e-6)  # − c_e · (the response's mean entropy, 1.0)
    assert float(weight) == 1.0
    np.testing.assert_allclose(stats["entropy"], 1.0, rtol=1e-6)
    grad = jax.grad(lambda h: policy_loss(logp, logp, jnp.zeros((1, 3)), mask, options, entropy_bt=h)[0])(entropy)
    np.testing.assert_allclose(grad, [[-0.05, -0.05, 0.0]], rtol=1e-6)


def test_truncated_importance_sampling_weights_and_capping():
    old = jnp.full((1, 4), -1.0)
    # π_old / π_sampler = 0.5, 1.5, 3.0 on the tokens (and 9 on padding); the cap C = 2 takes 3.0 to 2.0
    sampler = old - jnp.log(jnp.array([[0.5, 1.5, 3.0, 9.0]]))
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    adv = jnp.ones((1, 4))
    options = PolicyLossOptions(tis_cap=2.0)
    loss_sum, weight, stats = policy_loss(old, old, adv, mask, options, sampler_logp_bt=sampler)
    np.testing.assert_allclose(loss_sum, -(0.5 + 1.5 + 2.0), rtol=1e-5)  # ρ = 1: −A·w per token
    np.testing.assert_allclose(stats["tis_weight"], 4.0, rtol=1e-5)
    assert float(stats["tis_capped"]) == 1.0 and float(weight) == 3.0
    grads = jax.grad(lambda lp, sp: policy_loss(lp, old, adv, mask, options, sampler_logp_bt=sp)[0],
                     argnums=(0, 1))(old, sampler)
    np.testing.assert_allclose(grads[0], [[-0.5, -1.5, -2.0, 0.0]], rtol=1e-5)
    assert np.all(np.asarray(grads[1]) == 0.0)  # w is a constant of the loss
    assert "tis_weight" not in policy_loss(old, old, adv, mask, PolicyLossOptions(), sampler_logp_bt=sampler)[2]


def test_options_are_checked_and_name_the_field():
    for kwargs, match in [(dict(ratio="seq"), "ratio='seq'"), (dict(aggregation="mean"), "aggregation='mean'"),
                          (dict(kl_estimator="k4"), "kl_estimator='k4'"), (dict(clip_eps_low=0.0), "clip_eps_low=0.0"),
                          (dict(clip_eps_high=-0.1), "clip_eps_high=-0.1"),
                          (dict(kl_in_loss_coef=-1.0), "kl_in_loss_coef=-1.0"),
                          (dict(entropy_coef=-0.01), "entropy_coef=-0.01"), (dict(tis_cap=-2.0), "tis_cap=-2.0"),
                          (dict(aggregation="constant"), "max_tokens=None"),
                          (dict(aggregation="constant", max_tokens=0), "max_tokens=0")]:
        with pytest.raises(ValueError, match=match):
            PolicyLossOptions(**kwargs)
    x, mask = jnp.zeros((1, 2)), jnp.ones((1, 2))
    for kwargs, match in [(dict(kl_in_loss_coef=0.1), "kl_in_loss_coef=0.1 needs ref_logp_bt"),
                          (dict(entropy_coef=0.1), "entropy_coef=0.1 needs entropy_bt"),
                          (dict(tis_cap=2.0), "tis_cap=2.0 needs sampler_logp_bt")]:
        with pytest.raises(ValueError, match=match):
            policy_loss(x, x, x, mask, PolicyLossOptions(**kwargs))


def test_padding_garbage_reaches_neither_loss_nor_gradient():
    logp = jnp.array([[-1.0, jnp.inf], [-0.5, -jnp.inf]])
    old = jnp.array([[-1.2, jnp.nan], [-0.4, 3.0]])
    adv = jnp.array([[1.0, jnp.nan], [-1.0, jnp.inf]])
    mask = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    options = PolicyLossOptions(ratio="sequence", aggregation="sequence", kl_in_loss_coef=0.1, tis_cap=2.0)
    extra = dict(ref_logp_bt=jnp.array([[-1.0, jnp.nan], [-1.0, jnp.inf]]),
                 sampler_logp_bt=jnp.array([[-1.0, -jnp.inf], [-1.0, jnp.nan]]))
    loss_sum, weight, stats = policy_loss(logp, old, adv, mask, options, **extra)
    grad = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, options, **extra)[0])(logp)
    assert np.isfinite(float(loss_sum)) and all(np.isfinite(float(v)) for v in stats.values())
    assert np.all(np.isfinite(np.asarray(grad))) and float(grad[0, 1]) == 0.0 and float(grad[1, 1]) == 0.0


def test_logprob_mismatch():
    sampler = jnp.array([[-1.0, -2.0, 5.0], [-0.3, 0.0, 0.0]])
    trainer = jnp.array([[-1.1, -1.5, 0.0], [-0.3, 0.0, 0.0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = logprob_mismatch(sampler, trainer, mask)
    np.testing.assert_allclose(out["mean_abs"], (0.1 + 0.5 + 0.0) / 3, rtol=1e-5)
    np.testing.assert_allclose(out["max_abs"], 0.5, rtol=1e-5)  # the 5.0 on padding is not counted
    empty = logprob_mismatch(sampler, trainer, jnp.zeros_like(mask))
    assert float(empty["mean_abs"]) == 0.0 and float(empty["max_abs"]) == 0.0
