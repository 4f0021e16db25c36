"""PPO's losses against hand-computed numbers and plain Python loops: KL estimators, reward placement, GAE,
whitening, the clipped policy and value losses, entropy, explained variance and the KL controllers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.rl.losses import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, entropy_from_logits,
                               explained_variance, gae, kl_estimate, leave_one_out_mean, make_kl_controller,
                               masked_mean, masked_sum, masked_var, policy_loss, token_rewards, value_loss, whiten)


def _mask(lengths, t):
    return (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _gae_loop(rewards, values, lengths, gamma, lam):
    adv, ret = np.zeros_like(rewards), np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        for t in range(n):
            a = 0.0
            for k in range(t, n):  # A_t = Σ_k (γλ)^(k−t) δ_k, with V_n = 0
                next_value = values[b, k + 1] if k + 1 < n else 0.0
                a += (gamma * lam) ** (k - t) * (rewards[b, k] + gamma * next_value - values[b, k])
            adv[b, t], ret[b, t] = a, a + values[b, t]
    return adv, ret


def test_masked_statistics():
    x = jnp.array([[1.0, 2.0, 100.0], [3.0, jnp.inf, jnp.nan]])
    m = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(masked_sum(x, m)) == 6.0
    np.testing.assert_allclose(masked_sum(x, m, axis=1), [3.0, 3.0])
    assert float(masked_mean(x, m)) == 2.0
    np.testing.assert_allclose(masked_mean(x, m, axis=1), [1.5, 3.0])
    np.testing.assert_allclose(masked_var(x, m), 1.0)  # deviations −1, 0, 1: 2 / (3 − 1)
    np.testing.assert_allclose(masked_var(x, m, unbiased=False), 2.0 / 3.0, rtol=1e-6)
    assert float(masked_mean(x, jnp.zeros_like(m))) == 0.0
    assert float(masked_var(jnp.array([5.0]), jnp.array([1.0]))) == 0.0  # one entry: no Bessel correction


def test_kl_estimators_against_hand_numbers():
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    ref = jnp.array([[-1.5, -1.0, -0.5]])  # r = ref − logp = −0.5, 1.0, 0
    r = np.array([-0.5, 1.0, 0.0])
    np.testing.assert_allclose(kl_estimate(logp, ref, "k1")[0], [0.5, -1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(kl_estimate(logp, ref, "k2")[0], [0.125, 0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(kl_estimate(logp, ref, "k3")[0], np.exp(r) - 1 - r, rtol=1e-6)
    assert float(jnp.min(kl_estimate(logp, ref, "k1"))) < 0  # k1 can be negative on a token
    key = jax.random.PRNGKey(0)
    a, b = jax.random.normal(key, (2, 4, 16)) * 3
    assert float(jnp.min(kl_estimate(a, b, "k3"))) >= 0
    for estimator in KL_ESTIMATORS:
        assert float(jnp.max(jnp.abs(kl_estimate(a, a, estimator)))) == 0.0
    with pytest.raises(ValueError, match=r"'k4' is not one of \('k1', 'k2', 'k3'\)"):
        kl_estimate(logp, ref, "k4")


def test_token_rewards_placement_with_uneven_lengths_and_an_empty_row():
    mask = _mask([3, 1, 0, 4], 4)
    kl = np.arange(16, dtype=np.float32).reshape(4, 4) / 10
    score = jnp.array([10.0, 20.0, 30.0, 40.0])
    rewards = np.asarray(token_rewards(score, jnp.asarray(kl), jnp.asarray(mask), beta=0.5))
    expected = -0.5 * kl * mask
    expected[0, 2] += 10.0
    expected[1, 0] += 20.0
    expected[3, 3] += 40.0  # row 2 is empty: its score is dropped
    np.testing.assert_allclose(rewards, expected, rtol=1e-6)
    assert np.all(rewards[2] == 0.0)
    # dense shaping adds each token's own part where it is emitted, and nothing on padding
    dense = np.full((4, 4), 0.25, np.float32)
    shaped = np.asarray(token_rewards(score, jnp.asarray(kl), jnp.asarray(mask), beta=0.5, dense_bt=jnp.asarray(dense)))
    np.testing.assert_allclose(shaped, expected + 0.25 * mask, rtol=1e-6)


def test_gae_hand_computed_three_tokens():
    rewards = jnp.array([[1.0, 2.0, 3.0]])
    values = jnp.array([[0.5, 1.0, 1.5]])
    mask = jnp.ones((1, 3))
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(ret[0], [6.0, 5.0, 3.0], rtol=1e-6)  # reward-to-go
    np.testing.assert_allclose(adv[0], [5.5, 4.0, 1.5], rtol=1e-6)
    # γ = 0.5, λ = 0.5: δ = (1 + 0.5 − 0.5, 2 + 0.75 − 1, 3 − 1.5) = (1, 1.75, 1.5); A_t = δ_t + 0.25·A_{t+1}
    adv, ret = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    a2 = 1.5
    a1 = 1.75 + 0.25 * a2
    np.testing.assert_allclose(adv[0], [1.0 + 0.25 * a1, a1, a2], rtol=1e-6)


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.7), (1.0, 0.0)])
def test_gae_matches_a_python_loop_on_uneven_rows(gamma, lam):
    rng = np.random.default_rng(0)
    lengths = [5, 0, 1, 3, 7, 2]
    mask = _mask(lengths, 7)
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    # Garbage on padding must not leak into any real token.
    rewards_in = np.where(mask > 0, rewards, 1e6).astype(np.float32)
    values_in = np.where(mask > 0, values, -1e6).astype(np.float32)
    adv, ret = jax.jit(gae)(rewards_in, values_in, mask, gamma, lam)
    want_adv, want_ret = _gae_loop(rewards, values, lengths, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)
    if lam == 0.0:  # one-step TD: A_t = δ_t
        np.testing.assert_allclose(adv[0, 0], rewards[0, 0] + gamma * values[0, 1] - values[0, 0], rtol=1e-5)
    if gamma == 0.0:  # A_t = r_t − V_t
        np.testing.assert_allclose(adv, (rewards - values) * mask, rtol=1e-5, atol=1e-6)


def test_whiten():
    rng = np.random.default_rng(1)
    mask = jnp.asarray(_mask([4, 6, 0, 2], 6))
    x = jnp.asarray(rng.normal(3.0, 5.0, size=mask.shape).astype(np.float32))
    w = whiten(x, mask)
    np.testing.assert_allclose(masked_mean(w, mask), 0.0, atol=1e-6)
    np.testing.assert_allclose(masked_var(w, mask), 1.0, rtol=1e-5)
    assert np.all(np.asarray(w)[np.asarray(mask) == 0] == 0)
    kept = whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(masked_mean(kept, mask), masked_mean(x, mask), rtol=1e-5)
    np.testing.assert_allclose(masked_var(kept, mask), 1.0, rtol=1e-5)
    assert np.all(np.asarray(kept)[np.asarray(mask) == 0] == 0)


def test_policy_loss_at_ratio_one_is_minus_the_advantage():
    logp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, 7.0, 9.0]])
    adv = jnp.array([[1.0, -2.0, 3.0], [0.5, 100.0, 100.0]])
    mask = jnp.asarray(_mask([3, 1], 3))
    loss, stats = policy_loss(logp, logp, adv, mask, clip_eps=0.2)
    np.testing.assert_allclose(loss, -(1.0 - 2.0 + 3.0 + 0.5), rtol=1e-6)
    assert float(stats["clip_fraction"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    np.testing.assert_allclose(stats["ratio"], 4.0)


def test_policy_loss_clipping_values_gradient_and_stats():
    eps = 0.2
    ratio = np.array([1.5, 0.5, 1.1, 0.5, 1.5], np.float32)
    adv = np.array([2.0, 2.0, 2.0, -1.0, -1.0], np.float32)
    old = np.full((1, 5), -1.0, np.float32)
    logp = jnp.asarray(old + np.log(ratio)[None])
    mask = jnp.ones((1, 5))
    loss, stats = policy_loss(logp, old, adv[None], mask, eps)
    # Per token max(−A·ρ, −A·clip(ρ)): A>0, ρ=1.5 → −2.4 (clipped); A>0, ρ=0.5 → −1.0 (unclipped, pessimistic);
    # ρ=1.1 → −2.2; A<0, ρ=0.5 → 0.8 (clipped); A<0, ρ=1.5 → 1.5 (unclipped).
    np.testing.assert_allclose(loss, -2.4 - 1.0 - 2.2 + 0.8 + 1.5, rtol=1e-5)
    assert float(stats["clip_fraction"]) == 4.0  # |ρ − 1| > ε on all but the 1.1 token
    np.testing.assert_allclose(stats["approx_kl"], np.sum((ratio - 1) - np.log(ratio)), rtol=1e-5)
    np.testing.assert_allclose(stats["ratio"], ratio.sum(), rtol=1e-6)
    grad = np.asarray(jax.grad(lambda lp: policy_loss(lp, old, adv[None], mask, eps)[0])(logp))[0]
    # Outside the clip range on the side the advantage pushes towards, the gradient is zero.
    assert float(grad[0]) == 0.0 and float(grad[3]) == 0.0
    np.testing.assert_allclose(grad[[1, 2, 4]], -adv[[1, 2, 4]] * ratio[[1, 2, 4]], rtol=1e-5)


def test_policy_loss_ignores_inf_on_padding():
    logp = jnp.array([[-1.0, jnp.inf]])
    mask = jnp.array([[1.0, 0.0]])
    loss, stats = policy_loss(logp, jnp.array([[-1.2, -1.0]]), jnp.array([[1.0, jnp.nan]]), mask, 0.2)
    grad = jax.grad(lambda lp: policy_loss(lp, jnp.array([[-1.2, -1.0]]), jnp.array([[1.0, jnp.nan]]), mask,
                                           0.2)[0])(logp)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in stats.values())
    assert np.all(np.isfinite(np.asarray(grad))) and float(grad[0, 1]) == 0.0


def test_value_loss_clipped_and_unclipped():
    values = jnp.array([[2.0, 0.0, 1.05]])
    old = jnp.array([[1.0, 1.0, 1.0]])
    returns = jnp.array([[3.0, 1.0, 0.0]])
    mask = jnp.ones((1, 3))
    # Unclipped: ½(1 + 1 + 1.1025). Clipped (c = 0.2): V_clip = 1.2, 0.8, 1.05 → squared errors 3.24, 0.04, 1.1025.
    loss, stats = value_loss(values, old, returns, mask, None)
    np.testing.assert_allclose(loss, 0.5 * 3.1025, rtol=1e-6)
    assert float(stats["value_clip_fraction"]) == 0.0
    np.testing.assert_allclose(value_loss(values, old, returns, mask, 0.0)[0], 0.5 * 3.1025, rtol=1e-6)
    loss, stats = value_loss(values, old, returns, mask, 0.2)
    np.testing.assert_allclose(loss, 0.5 * (3.24 + 1.0 + 1.1025), rtol=1e-5)
    assert float(stats["value_clip_fraction"]) == 1.0
    loss, _ = value_loss(values, old, returns, jnp.array([[1.0, 0.0, 0.0]]), 0.2)
    np.testing.assert_allclose(loss, 0.5 * 3.24, rtol=1e-5)


def test_entropy_from_logits():
    logits = jnp.zeros((2, 3, 7)) + jnp.arange(3.0)[None, :, None] * 50  # uniform, shifted: no overflow
    np.testing.assert_allclose(entropy_from_logits(logits), np.full((2, 3), np.log(7.0)), rtol=1e-6)
    p = np.array([0.7, 0.2, 0.1])
    np.testing.assert_allclose(entropy_from_logits(jnp.log(jnp.asarray(p))[None, None])[0, 0],
                               -np.sum(p * np.log(p)), rtol=1e-6)
    ruled_out = jnp.array([[[0.0, 0.0, -jnp.inf]]])
    np.testing.assert_allclose(entropy_from_logits(ruled_out), [[np.log(2.0)]], rtol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(entropy_from_logits(z)))(ruled_out)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.min(entropy_from_logits(jnp.array([[[1e4, 0.0, 0.0]]])))) >= 0.0


def test_explained_variance():
    rng = np.random.default_rng(2)
    mask = jnp.asarray(_mask([5, 3], 5))
    target = jnp.asarray(rng.normal(size=(2, 5)).astype(np.float32))
    np.testing.assert_allclose(explained_variance(target, target, mask), 1.0)
    mean_pred = jnp.full_like(target, masked_mean(target, mask))
    np.testing.assert_allclose(explained_variance(mean_pred, target, mask), 0.0, atol=1e-6)
    assert float(explained_variance(target + 5.0, target, mask)) == pytest.approx(1.0, abs=1e-6)  # a bias only
    assert float(explained_variance(-target, target, mask)) < 0.0
    assert float(explained_variance(target, jnp.ones_like(target), mask)) == 0.0  # Var(target) = 0
    assert float(explained_variance(target, target, jnp.zeros_like(mask))) == 0.0


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=7.0, n_steps=100)  # error = 1/6
    np.testing.assert_allclose(ctl.value, 0.1 * (1 + (1 / 6) * 100 / 10_000))
    beta = ctl.value
    ctl.update(current_kl=600.0, n_steps=100)  # error clipped at +0.2
    np.testing.assert_allclose(ctl.value, beta * (1 + 0.2 * 100 / 10_000))
    beta = ctl.value
    ctl.update(current_kl=jnp.float32(0.0), n_steps=1000)  # error clipped at −0.2; a jnp scalar is fine
    np.testing.assert_allclose(ctl.value, beta * (1 - 0.2 * 1000 / 10_000))
    beta = ctl.value
    ctl.update(current_kl=3.0, n_steps=10)  # below target: down
    assert ctl.value < beta
    restored = make_kl_controller("adaptive", 1.0, target=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    restored.update(8.0, 64), ctl.update(8.0, 64)
    assert restored.value == ctl.value


def test_fixed_kl_controller_and_factory_errors():
    ctl = make_kl_controller("fixed", 0.05)
    assert isinstance(ctl, FixedKLController)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05 and ctl.state_dict() == {"value": 0.05}
    with pytest.raises(ValueError, match="'pid' is not one of"):
        make_kl_controller("pid", 0.1, 6.0, 10_000)
    with pytest.raises(ValueError, match="target=0"):
        make_kl_controller("adaptive", 0.1, 0, 10_000)
    with pytest.raises(ValueError, match="horizon=-5"):
        make_kl_controller("adaptive", 0.1, 6.0, -5)


def test_leave_one_out_mean_is_the_groups_other_samples():
    x = jnp.array([1.0, 2.0, 6.0, 10.0, 20.0, 30.0])  # two prompts, 3 samples each
    np.testing.assert_allclose(leave_one_out_mean(x, 3), [4.0, 3.5, 1.5, 25.0, 20.0, 15.0])
    np.testing.assert_allclose(leave_one_out_mean(x, 2), [2.0, 1.0, 10.0, 6.0, 30.0, 20.0])
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_mean(x, 1)
