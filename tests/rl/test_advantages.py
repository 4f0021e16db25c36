"""The advantage estimators against hand-computed numbers: a 2-group batch (k = 3) with padded rows, a
KL-in-reward penalty and garbage on padding; all-equal groups; the registry and its validation; and a one-step
bandit where each estimator with the policy loss reaches the KL-regularised optimum."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.rl import losses
from llm_jax.rl.advantages import (ESTIMATORS, GRPO_EPS, AdvantageInputs, check_estimator, get_estimator)
from llm_jax.rl.policy_loss import PolicyLossOptions, policy_loss

LENGTHS = [3, 2, 1, 3, 2, 3]  # two groups of k = 3: rows 0-2 and 3-5
MASK = (np.arange(3)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.float32)
SCORES = np.array([2.0, 1.0, 0.0, 3.0, 1.0, -1.0], np.float32)
KL = np.array([[0.2, 0.0, 0.2],
               [0.4, 0.4, 9.0],   # 9: padding, never read
               [1.0, 9.0, 9.0],
               [0.0, 0.0, 0.0],
               [0.2, 0.2, 9.0],
               [0.0, 0.0, 0.0]], np.float32)
BETA = 0.5
# s̃ = s − β·Σ_t kl_t = 2 − 0.2, 1 − 0.4, 0 − 0.5, 3 − 0, 1 − 0.2, −1 − 0
PAID = np.array([1.8, 0.6, -0.5, 3.0, 0.8, -1.0])
# Per-token rewards r_t = −β·kl_t + s·[t = last], and their return-to-go (γ = 1) on the real tokens.
RETURN_TO_GO = np.array([[1.8, 1.9, 1.9],   # r = −0.1, 0, −0.1 + 2
                         [0.6, 0.8, 0.0],   # r = −0.2, −0.2 + 1
                         [-0.5, 0.0, 0.0],  # r = −0.5 + 0
                         [3.0, 3.0, 3.0],
                         [0.8, 0.9, 0.0],   # r = −0.1, −0.1 + 1
                         [-1.0, -1.0, -1.0]])


def _inputs(**kw):
    base = dict(scores_b=jnp.asarray(SCORES), mask_bt=jnp.asarray(MASK), kl_bt=jnp.asarray(KL), beta=BETA, group=3)
    return AdvantageInputs(**{**base, **kw})


def _per_response(adv_b):
    return np.asarray(adv_b)[:, None] * MASK


def test_grpo_hand_computed_with_the_unbiased_group_std():
    # group 0: s̃ = 1.8, 0.6, −0.5: mean 0.633333, deviations 1.166667, −0.033333, −1.133333,
    # Σ dev² = 2.646667, unbiased std = sqrt(2.646667 / 2) = 1.150362; group 1: s̃ = 3, 0.8, −1: mean 0.933333,
    # deviations 2.066667, −0.133333, −1.933333, Σ dev² = 8.026667, std = 2.003331
    want_b = np.array([1.166667 / 1.150362, -0.033333 / 1.150362, -1.133333 / 1.150362,
                       2.066667 / 2.003331, -0.133333 / 2.003331, -1.933333 / 2.003331])
    out = get_estimator("grpo")(_inputs())
    assert out.returns_bt is None
    np.testing.assert_allclose(out.advantages_bt, _per_response(want_b), rtol=1e-5, atol=1e-6)
    # the same in plain numpy, ε included
    paid_gk = PAID.reshape(2, 3)
    ref = (paid_gk - paid_gk.mean(1, keepdims=True)) / (paid_gk.std(1, ddof=1, keepdims=True) + GRPO_EPS)
    np.testing.assert_allclose(out.advantages_bt, _per_response(ref.reshape(-1)), rtol=1e-5, atol=1e-6)


def test_dr_grpo_and_rloo_hand_computed():
    dr = get_estimator("dr_grpo")(_inputs())
    np.testing.assert_allclose(dr.advantages_bt, _per_response([1.166667, -0.033333, -1.133333,
                                                                2.066667, -0.133333, -1.933333]), atol=1e-5)
    # A_i = s̃_i − mean of the other two: 1.8 − (0.6 − 0.5)/2, 0.6 − (1.8 − 0.5)/2, −0.5 − (1.8 + 0.6)/2, ...
    rl = get_estimator("rloo")(_inputs())
    np.testing.assert_allclose(rl.advantages_bt, _per_response([1.75, -0.05, -1.7, 3.1, -0.2, -2.9]), atol=1e-5)
    assert dr.returns_bt is None and rl.returns_bt is None


def test_group_estimators_without_a_kl_penalty_group_the_raw_scores():
    for inputs in (_inputs(beta=0.0), _inputs(kl_bt=None)):
        out = get_estimator("dr_grpo")(inputs)  # s = 2, 1, 0 | 3, 1, −1: means 1 and 1
        np.testing.assert_allclose(out.advantages_bt, _per_response([1.0, 0.0, -1.0, 2.0, 0.0, -2.0]), atol=1e-6)


def test_gae_is_ppos_token_rewards_then_gae():
    values = np.where(MASK > 0, 0.5, 7.0).astype(np.float32)  # 7 on padding: never read
    out = get_estimator("gae")(_inputs(values_bt=jnp.asarray(values)))
    # γ = λ = 1: A_t = (return-to-go) − V_t, G_t = return-to-go
    np.testing.assert_allclose(out.returns_bt, RETURN_TO_GO * MASK, atol=1e-6)
    np.testing.assert_allclose(out.advantages_bt, (RETURN_TO_GO - 0.5) * MASK, atol=1e-6)
    # γ = 0.5, λ = 0 (one-step TD): A_t = r_t + γ·V_{t+1} − V_t; row 0: r = −0.1, 0, 1.9
    out = get_estimator("gae")(_inputs(values_bt=jnp.asarray(values), gamma=0.5, lam=0.0))
    np.testing.assert_allclose(out.advantages_bt[0], [-0.1 + 0.25 - 0.5, 0.0 + 0.25 - 0.5, 1.9 - 0.5], atol=1e-6)
    np.testing.assert_allclose(out.advantages_bt[2], [-0.5 - 0.5, 0.0, 0.0], atol=1e-6)


def test_dense_shaping_pays_the_same_total_earlier():
    dense = np.zeros_like(KL)
    dense[0] = [0.5, 0.5, 0.0]
    dense[1] = [0.25, 0.0, 5.0]  # 5: padding, never read
    values = np.zeros_like(KL)
    out = get_estimator("gae")(_inputs(values_bt=jnp.asarray(values), dense_bt=jnp.asarray(dense)))
    # row 0: r = −0.1 + 0.5, 0 + 0.5, −0.1 + (2 − 1.0) = 0.4, 0.5, 0.9; row 1: r = −0.2 + 0.25, −0.2 + (1 − 0.25)
    np.testing.assert_allclose(out.returns_bt[0], [1.8, 1.4, 0.9], atol=1e-6)
    np.testing.assert_allclose(out.returns_bt[1], [0.6, 0.55, 0.0], atol=1e-6)
    np.testing.assert_allclose(out.returns_bt[2:], RETURN_TO_GO[2:] * MASK[2:], atol=1e-6)
    # group estimators compare whole scores: dense parts change nothing
    np.testing.assert_array_equal(get_estimator("rloo")(_inputs(dense_bt=jnp.asarray(dense))).advantages_bt,
                                  get_estimator("rloo")(_inputs()).advantages_bt)


def test_reinforce_pp_return_to_go_then_batch_normalisation():
    out = get_estimator("reinforce_pp")(_inputs())
    assert out.returns_bt is None
    g = RETURN_TO_GO[MASK > 0]  # the 14 response tokens of the batch
    want = np.zeros_like(RETURN_TO_GO)
    want[MASK > 0] = (g - g.mean()) / np.sqrt(g.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(out.advantages_bt, want, rtol=1e-5, atol=1e-6)
    adv = np.asarray(out.advantages_bt)
    np.testing.assert_allclose(adv[MASK > 0].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(adv[MASK > 0].std(ddof=1), 1.0, rtol=1e-5)
    # γ = 0.5: row 0's r = −0.1, 0, 1.9 discount to R = −0.1 + 0.25·1.9, 0.5·1.9, 1.9; the normalisation is
    # affine, so differences between tokens keep their ratios
    adv = np.asarray(get_estimator("reinforce_pp")(_inputs(gamma=0.5)).advantages_bt)
    np.testing.assert_allclose((adv[0, 1] - adv[0, 0]) / (adv[0, 2] - adv[0, 0]),
                               (0.95 - 0.375) / (1.9 - 0.375), rtol=1e-5)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_groups_give_exactly_zero(name):
    scores = jnp.array([0.1, 0.1, 0.1, 1e7 + 1, 1e7 + 1, 1e7 + 1, 1.0, 1.5, 1.0], jnp.float32)
    kl = jnp.zeros((9, 2)).at[7].set(jnp.array([0.5, 0.5]))  # 1.5 − 0.5·(0.5 + 0.5) = 1.0: equal after the KL
    inputs = AdvantageInputs(scores_b=scores, mask_bt=jnp.ones((9, 2)), kl_bt=kl, beta=0.5, group=3)
    adv = np.asarray(jax.jit(get_estimator(name))(inputs).advantages_bt)
    assert not np.any(np.isnan(adv))
    assert np.all(adv == 0.0)


def test_registry_and_validation():
    assert set(ESTIMATORS) == {"gae", "grpo", "dr_grpo", "rloo", "reinforce_pp"}
    needs = {name: (fn.needs_value_model, fn.needs_groups) for name, fn in ESTIMATORS.items()}
    assert needs == {"gae": (True, False), "grpo": (False, True), "dr_grpo": (False, True), "rloo": (False, True),
                     "reinforce_pp": (False, False)}
    with pytest.raises(ValueError, match=r"'ppo2' is not one of \('gae', 'grpo'"):
        get_estimator("ppo2")
    with pytest.raises(ValueError, match="'gae' needs a value model"):
        check_estimator("gae", has_value_model=False, group=4)
    for name in ("grpo", "dr_grpo", "rloo"):
        with pytest.raises(ValueError, match=f"'{name}' .* group=1"):
            check_estimator(name, has_value_model=True, group=1)
    assert check_estimator("reinforce_pp", has_value_model=False, group=1) is ESTIMATORS["reinforce_pp"]
    with pytest.raises(ValueError, match="needs a value model: values_bt is None"):
        get_estimator("gae")(_inputs())
    with pytest.raises(ValueError, match="group=4 for 6 rows"):
        get_estimator("grpo")(_inputs(group=4))


def test_inputs_cross_a_jit_boundary_with_a_traced_beta():
    fn = jax.jit(lambda inputs: get_estimator("rloo")(inputs).advantages_bt)
    np.testing.assert_allclose(fn(_inputs(beta=jnp.float32(BETA))), _per_response([1.75, -0.05, -1.7, 3.1, -0.2, -2.9]),
                               atol=1e-5)


# A one-step bandit: maximising E_π[r] − β·KL(π‖π_ref) has the closed form π* ∝ π_ref·exp(r/β).
REF_LOGITS = jnp.array([1.0, 0.5, 0.0, -0.5, -1.0])
REWARDS = jnp.array([0.0, 1.0, 0.3, 2.0, -1.0])
BANDIT_BETA = 0.5
GROUPS, K, ITERATIONS, EPOCHS = 128, 8, 200, 2

# Each estimator with the KL as a penalty in the reward (k1 per sampled token, every estimator's fixed point is
# π*), and the unnormalised ones with the KL as a loss term (k2, whose gradient at π = π_old is ∇KL(π‖π_ref)):
# dividing the advantages by a std (grpo, reinforce_pp, whitening) rescales the reward against a KL loss term,
# which moves the fixed point to π_ref·exp(r/(β·σ)). A group mean that includes the sample itself (dr_grpo)
# scales the reward's gradient by (k − 1)/k: E[(s_i − mean_g s)·∇log π_i] = (1 − 1/k)·∇E[s], so against a KL
# loss term its fixed point is π_ref·exp(r·(k − 1)/(k·β)) (rloo's baseline leaves the sample out: no scale).
CASES = [("gae", "reward", PolicyLossOptions(), 1.0),
         ("grpo", "reward", PolicyLossOptions(clip_eps_high=0.28, aggregation="sequence"), 1.0),
         ("dr_grpo", "reward", PolicyLossOptions(aggregation="constant", max_tokens=1), 1.0),
         ("rloo", "reward", PolicyLossOptions(ratio="sequence"), 1.0),
         ("reinforce_pp", "reward", PolicyLossOptions(), 1.0),
         ("gae", "loss", PolicyLossOptions(kl_in_loss_coef=BANDIT_BETA, kl_estimator="k2"), 1.0),
         ("dr_grpo", "loss", PolicyLossOptions(kl_in_loss_coef=BANDIT_BETA, kl_estimator="k2",
                                               aggregation="constant", max_tokens=1), (K - 1) / K),
         ("rloo", "loss", PolicyLossOptions(kl_in_loss_coef=BANDIT_BETA, kl_estimator="k2", ratio="sequence"), 1.0)]


def _bandit_policy(name, kl_in, options):
    """The policy after ITERATIONS rollouts of GROUPS·K one-token samples, each followed by EPOCHS plain gradient
    steps on policy_loss / weight; kl_in: "reward" (k1 penalty in the score, β in the inputs) or "loss"."""
    estimator = get_estimator(name)
    ref_logp_v = jax.nn.log_softmax(REF_LOGITS)
    n = GROUPS * K
    mask = jnp.ones((n, 1))

    def iteration(logits, key_lr):
        key, lr = key_lr
        actions = jax.random.categorical(key, logits, shape=(n,))
        old_logp = jax.nn.log_softmax(logits)[actions][:, None]
        ref_logp = ref_logp_v[actions][:, None]
        kl = losses.kl_estimate(old_logp, ref_logp, "k1") if kl_in == "reward" else None
        inputs = AdvantageInputs(scores_b=REWARDS[actions], mask_bt=mask, kl_bt=kl,
                                 beta=BANDIT_BETA if kl_in == "reward" else 0.0,
                                 values_bt=jnp.zeros((n, 1)), group=K)
        advantages = estimator(inputs).advantages_bt
        if name == "gae" and kl_in == "reward":  # the loop's whitening option: the batch mean as a baseline
            advantages = losses.whiten(advantages, mask)

        def loss(l):
            logp = jax.nn.log_softmax(l)[actions][:, None]
            loss_sum, weight, _ = policy_loss(logp, old_logp, advantages, mask, options, ref_logp_bt=ref_logp)
            return loss_sum / weight

        for _ in range(EPOCHS):  # plain gradient steps
            logits = logits - lr * jax.grad(loss)(logits)
        return logits, None

    lrs = jnp.linspace(1.0, 0.1, ITERATIONS)
    keys = jax.random.split(jax.random.key(0), ITERATIONS)
    logits, _ = jax.jit(lambda l: jax.lax.scan(iteration, l, (keys, lrs)))(REF_LOGITS)
    return jax.nn.softmax(logits)


@pytest.mark.parametrize("name,kl_in,options,reward_scale", CASES, ids=[f"{c[0]}-kl_in_{c[1]}" for c in CASES])
def test_each_estimator_moves_a_bandit_policy_to_the_kl_regularised_optimum(name, kl_in, options, reward_scale):
    optimum = jax.nn.softmax(jax.nn.log_softmax(REF_LOGITS) + reward_scale * REWARDS / BANDIT_BETA)
    np.testing.assert_allclose(_bandit_policy(name, kl_in, options), optimum, atol=0.03)
    assert not np.allclose(jax.nn.softmax(REF_LOGITS), optimum, atol=0.1)  # it really had to move


def test_a_k3_kl_loss_term_regularises_towards_the_other_kl():
    """GRPO's k3 loss term has the gradient of KL(π_ref‖π) at π = π_old, so the policy settles at the maximiser
    of E_π[r] − β·KL(π_ref‖π): r(y) + β·π_ref(y)/π(y) = λ, i.e. π(y) = β·π_ref(y)/(λ − r(y)) with λ > max r
    making Σ π = 1, and not at π* ∝ π_ref·exp(r/β)."""
    ref = np.asarray(jax.nn.softmax(REF_LOGITS), np.float64)
    r = np.asarray(REWARDS, np.float64)
    lo, hi = r.max() + 1e-9, r.max() + 100.0
    for _ in range(200):  # Σ_y β·π_ref(y)/(λ − r(y)) falls from ∞ as λ grows: bisect for 1
        lam = 0.5 * (lo + hi)
        lo, hi = (lam, hi) if np.sum(BANDIT_BETA * ref / (lam - r)) > 1 else (lo, lam)
    reverse_optimum = BANDIT_BETA * ref / (lam - r)
    policy = _bandit_policy("rloo", "loss", PolicyLossOptions(kl_in_loss_coef=BANDIT_BETA, kl_estimator="k3"))
    np.testing.assert_allclose(policy, reverse_optimum, atol=0.03)
    optimum = jax.nn.softmax(jax.nn.log_softmax(REF_LOGITS) + REWARDS / BANDIT_BETA)
    assert np.max(np.abs(np.asarray(policy) - np.asarray(optimum))) > 0.1
