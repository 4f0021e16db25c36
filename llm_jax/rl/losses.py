"""PPO's pieces as pure functions over arrays (Schulman et al. 2017; for language models Ziegler et al. 2019).

Batches of sampled responses are right-padded (B, T) arrays: `mask_bt` is 1.0 on a response's tokens, which
are the first Σ_t mask_bt positions of its row, and 0.0 on padding. Everything is float32. Losses and their
stats are sums over the masked tokens; the caller divides by the token count (the loss_sum / weight convention
of `llm_jax/train/step.py`), so micro-batches add up to the full batch exactly.

One PPO iteration, with π the policy, π_ref the frozen reference, V the value head and R the reward model:

    kl_t      = kl_estimate(log π, log π_ref)                      per sampled token
    r_t       = −β·kl_t  (+ R(x, y) at the response's last token)  token_rewards
    A_t, G_t  = GAE(r, V; γ, λ),  A whitened over the batch        gae, whiten
    loss      = policy_loss(A) + c_v·value_loss(G) − c_e·entropy
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CONTROLLERS = ("fixed", "adaptive")


def masked_sum(x, mask, axis=None):
    """Σ mask·x. Entries where mask is 0 count as 0 even when x is inf or NaN there (padding logits can be)."""
    return jnp.sum(jnp.where(mask > 0, x * mask, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
    """Σ mask·x / Σ mask; 0 where the mask is empty."""
    count = jnp.sum(mask, axis=axis)
    return jnp.where(count > 0, masked_sum(x, mask, axis) / jnp.where(count > 0, count, 1.0), 0.0)


def masked_var(x, mask, unbiased: bool = True):
    """Variance of the masked entries about their mean, over all axes.

        var = Σ m·(x − mean)² / Σ m,   times n / (n − 1) when unbiased and n = Σ m > 1
    """
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x - mean), mask)
    if unbiased:
        count = jnp.sum(mask)
        var = jnp.where(count > 1, var * count / jnp.where(count > 1, count - 1, 1.0), var)
    return var


def whiten(x_bt, mask_bt, shift_mean: bool = True, eps: float = 1e-8):
    """(x − mean) / sqrt(var + eps) over the masked entries (unbiased var); padding is returned as 0.

    With shift_mean=False the mean is added back: the spread is normalised but the sign of a reward is kept,
    as TRL does when whitening rewards.
    """
    mean = masked_mean(x_bt, mask_bt)
    out_bt = (x_bt - mean) * jax.lax.rsqrt(masked_var(x_bt, mask_bt) + eps)
    if not shift_mean:
        out_bt = out_bt + mean
    return jnp.where(mask_bt > 0, out_bt, 0.0)


def kl_estimate(logp_bt, ref_logp_bt, estimator: str):
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π, with r = log π_ref − log π:

        k1 = −r               unbiased, high variance, negative on some tokens
        k2 = r² / 2           biased, low variance, ≥ 0
        k3 = (e^r − 1) − r    unbiased (E_π[e^r] = 1), low variance, ≥ 0   (Schulman, "Approximating KL")
    """
    r_bt = ref_logp_bt - logp_bt
    if estimator == "k1":
        return -r_bt
    if estimator == "k2":
        return 0.5 * jnp.square(r_bt)
    if estimator == "k3":
        return jnp.expm1(r_bt) - r_bt
    raise ValueError(f"KL estimator {estimator!r} is not one of {KL_ESTIMATORS}")


def token_rewards(score_b, kl_bt, mask_bt, beta, dense_bt=None):
    """Per-token rewards: the KL penalty on every response token and the reward model's score at the last one.

        r_bt = m_bt · (−β·kl_bt + d_bt + score_b·1[t = L_b − 1]),   L_b = Σ_t m_bt
    `dense_bt` (default 0) is the part of the score paid as each token is emitted: with the score split as
    score_b + Σ_t d_bt (e.g. a likelihood reward model's per-token log-probs, or the increments of a scorer over
    the response's prefixes) the return of the whole response is the same, but a token's return-to-go no
    longer carries what the tokens before it earned, which a value model would otherwise have to predict.
    A row with an empty mask is all zeros (its score is dropped).
    """
    length_b = jnp.sum(mask_bt, axis=1).astype(jnp.int32)
    last_bt = jnp.arange(mask_bt.shape[1])[None, :] == (length_b - 1)[:, None]  # never true when L_b = 0
    rewards_bt = -beta * kl_bt + jnp.where(last_bt, score_b[:, None], 0.0)
    if dense_bt is not None:
        rewards_bt = rewards_bt + dense_bt
    return jnp.where(mask_bt > 0, rewards_bt, 0.0)


def leave_one_out_mean(x_b, group: int):
    """Each entry's baseline from its group's others: rows [g·k, (g+1)·k) are one prompt's k samples.

        b_i = (Σ_{j in group} x_j − x_i) / (k − 1)        (RLOO, Kool et al. 2019; Ahmadian et al. 2024)
    Unbiased: b_i does not depend on sample i. Needs k ≥ 2.
    """
    if group < 2:
        raise ValueError(f"a leave-one-out baseline needs at least 2 samples per prompt, got {group}")
    x_gk = x_b.reshape(-1, group)
    return ((jnp.sum(x_gk, axis=1, keepdims=True) - x_gk) / (group - 1)).reshape(x_b.shape)


def gae(rewards_bt, values_bt, mask_bt, gamma, lam):
    """Generalised advantage estimation (Schulman et al. 2016) -> (advantages_bt, returns_bt).

        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   G_t = A_t + V_t
    with V and A after a response's last token taken as 0: the episode ends there. A reverse scan over T;
    because rows are right-padded, zeroing the carry on padding ends every row at its own length (0 included).
    Padding entries of both outputs are 0.
    """
    mask_tb = jnp.transpose(mask_bt) > 0
    values_tb = jnp.where(mask_tb, jnp.transpose(values_bt), 0.0)
    rewards_tb = jnp.where(mask_tb, jnp.transpose(rewards_bt), 0.0)

    def step(carry, inputs):
        next_value_b, next_adv_b = carry
        reward_b, value_b, mask_b = inputs
        delta_b = reward_b + gamma * next_value_b - value_b
        adv_b = jnp.where(mask_b, delta_b + gamma * lam * next_adv_b, 0.0)
        return (value_b, adv_b), adv_b

    zeros_b = jnp.zeros(rewards_tb.shape[1], jnp.float32)
    _, adv_tb = jax.lax.scan(step, (zeros_b, zeros_b), (rewards_tb, values_tb, mask_tb), reverse=True)
    advantages_bt = jnp.transpose(adv_tb)
    return advantages_bt, jnp.where(mask_bt > 0, advantages_bt + values_bt, 0.0)


def policy_loss(logp_bt, old_logp_bt, advantages_bt, mask_bt, clip_eps):
    """PPO's clipped surrogate as a sum over tokens -> (loss_sum, stats), ρ = π/π_old = exp(log π − log π_old):

        loss = Σ m · max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))
    stats (sums over tokens): clip_fraction = Σ m·1[|ρ − 1| > ε]; approx_kl = Σ m·((ρ − 1) − log ρ), the k3
    estimate of KL(π_old ‖ π) from tokens of π_old; ratio = Σ m·ρ.
    """
    # Padding log-probs are zeroed before exp, so an inf there cannot turn the loss or its gradient into NaN.
    log_ratio_bt = jnp.where(mask_bt > 0, logp_bt - old_logp_bt, 0.0)
    ratio_bt = jnp.exp(log_ratio_bt)
    surrogate_bt = jnp.maximum(-advantages_bt * ratio_bt,
                               -advantages_bt * jnp.clip(ratio_bt, 1.0 - clip_eps, 1.0 + clip_eps))
    stats = dict(clip_fraction=masked_sum((jnp.abs(ratio_bt - 1.0) > clip_eps).astype(jnp.float32), mask_bt),
                 approx_kl=masked_sum((ratio_bt - 1.0) - log_ratio_bt, mask_bt),
                 ratio=masked_sum(ratio_bt, mask_bt))
    return masked_sum(surrogate_bt, mask_bt), jax.tree.map(jax.lax.stop_gradient, stats)


def value_loss(values_bt, old_values_bt, returns_bt, mask_bt, clip_range):
    """Value regression as a sum over tokens -> (loss_sum, stats), clipped around the rollout's values:

        V_clip = V_old + clip(V − V_old, −c, c),   loss = Σ m · ½·max((V − G)², (V_clip − G)²)
    clip_range (a Python number) None or 0: loss = Σ m · ½·(V − G)². stats: value_clip_fraction = Σ m·1[the
    clipped term is strictly the larger], 0 when unclipped.
    """
    unclipped_bt = jnp.square(values_bt - returns_bt)
    if clip_range is None or clip_range == 0:
        return 0.5 * masked_sum(unclipped_bt, mask_bt), dict(value_clip_fraction=jnp.zeros((), jnp.float32))
    clipped_values_bt = old_values_bt + jnp.clip(values_bt - old_values_bt, -clip_range, clip_range)
    clipped_bt = jnp.square(clipped_values_bt - returns_bt)
    chose_clipped = masked_sum((clipped_bt > unclipped_bt).astype(jnp.float32), mask_bt)
    return (0.5 * masked_sum(jnp.maximum(unclipped_bt, clipped_bt), mask_bt),
            dict(value_clip_fraction=jax.lax.stop_gradient(chose_clipped)))


def entropy_from_logits(logits_btv):
    """(B, T) entropy of softmax(logits) in nats: H = −Σ_v p_v log p_v, from log_softmax in float32.

    Logits of −inf (tokens ruled out) give p log p = 0, in value and gradient.
    """
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    p_btv = jnp.exp(logp_btv)
    return -jnp.sum(p_btv * jnp.where(p_btv > 0, logp_btv, 0.0), axis=-1)


def explained_variance(pred_bt, target_bt, mask_bt):
    """1 − Var(target − pred) / Var(target) over the masked entries: 1 for a perfect prediction, 0 for
    predicting the mean, negative when worse than that. Where Var(target) = 0 (or the mask is empty) there
    is nothing to explain and the result is 0.0, not NaN, so a logged mean stays finite.
    """
    var_target = masked_var(target_bt, mask_bt, unbiased=False)
    var_error = masked_var(target_bt - pred_bt, mask_bt, unbiased=False)
    return jnp.where(var_target > 0, 1.0 - var_error / jnp.where(var_target > 0, var_target, 1.0), 0.0)


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, beta: float):
        self.value = float(beta)

    def update(self, current_kl, n_steps: int) -> None:
        del current_kl, n_steps

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """β steered towards a target KL per response (Ziegler et al. 2019, eq. 2):

        e = clip(KL / target − 1, −0.2, 0.2),   β ← β·(1 + e·n_steps / horizon)
    so one update moves β by at most 20%·n_steps/horizon, up when the policy drifts past the target. Only β is
    state; target and horizon come from the config.
    """

    def __init__(self, init_beta: float, target: float, horizon: float):
        self.value, self.target, self.horizon = float(init_beta), float(target), float(horizon)

    def update(self, current_kl, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


def make_kl_controller(kind: str, beta: float, target: float | None = None, horizon: float | None = None):
    """A KL controller by name: "fixed" (β constant) or "adaptive" (needs target > 0 and horizon > 0)."""
    if kind == "fixed":
        return FixedKLController(beta)
    if kind != "adaptive":
        raise ValueError(f"KL controller {kind!r} is not one of {KL_CONTROLLERS}")
    if target is None or target <= 0:
        raise ValueError(f"the adaptive KL controller needs a positive target KL, got target={target}")
    if horizon is None or horizon <= 0:
        raise ValueError(f"the adaptive KL controller needs a positive horizon, got horizon={horizon}")
    return AdaptiveKLController(beta, target, horizon)
