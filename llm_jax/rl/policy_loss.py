"""The clipped policy-gradient loss with the options of the PPO family, as one free function.

    l_t  = w_t · max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε_low, 1 + ε_high))     the surrogate
         + β_loss · kl(log π_t, log π_ref,t)                                a KL loss term (GRPO)
         − c_e · H_t                                                         an entropy bonus
    loss = aggregate(l)

over right-padded (B, T) float32 arrays with `mask_bt` as in `llm_jax/rl/losses.py`. The options
(`PolicyLossOptions`) and where each comes from:

    clip_eps_low/high   ε_low = ε_high is PPO (Schulman et al. 2017); ε_high > ε_low is DAPO's clip-higher
                        (Yu et al. 2025), room for low-probability tokens to grow
    ratio="token"       ρ_t = π(y_t)/π_old(y_t)                                                       (PPO)
    ratio="sequence"    ρ_t = s_i = exp(mean_t(log π − log π_old)) on every token of response i      (GSPO,
                        Zheng et al. 2025), in GSPO-token form: s_i·π_t/sg[π_t] with s_i's value taken
                        under sg, so token t's gradient is s_i·∇log π_t: with one advantage per response the
                        "sequence" aggregation gives GSPO's s_i·A_i·(1/|y_i|)·Σ_t ∇log π_t exactly
    aggregation         "token": Σ_bt m·l / Σ_bt m (DAPO's token-level); "sequence": mean over responses of
                        each response's token mean (the original GRPO); "constant": Σ_bt m·l / (B·max_tokens)
                        (Dr. GRPO, Liu et al. 2025: no length normalisation)
    kl_in_loss_coef,    β_loss ≥ 0 and the estimator of losses.kl_estimate, gradient through log π and not
    kl_estimator        weighted by ρ (GRPO's term, with k3). At π = π_old the expected gradient of the term is
                        0 for k1, ∇KL(π‖π_ref) for k2 and ∇KL(π_ref‖π) for k3 (Σ_y π·(1 − π_ref/π)·∇log π
                        = −Σ_y π_ref·∇log π): only k2 pulls towards π* ∝ π_ref·exp(r/β).
    entropy_coef        c_e ≥ 0
    tis_cap             C > 0: truncated importance sampling of the sampler/trainer mismatch (Yao et al. 2025,
                        "Your efficient RL framework secretly brings you off-policy RL training"),
                        w_t = sg[min(π_old(y_t)/π_sampler(y_t), C)]; 0: w_t = 1

The loss_sum / weight convention of `llm_jax/train/step.py`: `aggregate` returns a (sum, weight) pair whose
ratio is the batch value and which add over any split of the batch into micro-batches (rows):

    token:     Σ_bt m·x,                          Σ_bt m
    sequence:  Σ_b (Σ_t m·x / Σ_t m),             #{b : Σ_t m > 0}          (empty responses count nowhere)
    constant:  Σ_bt m·x / max_tokens,             B
Every stat is a sum aggregated the same way, so stat / weight is its batch value too.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.rl import losses

RATIOS = ("token", "sequence")
AGGREGATIONS = ("token", "sequence", "constant")


@dataclasses.dataclass(frozen=True)
class PolicyLossOptions:
    """The loss's options (module docstring); checked when made, every bad value named."""
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    ratio: str = "token"
    aggregation: str = "token"
    max_tokens: int | None = None
    kl_in_loss_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    tis_cap: float = 0.0

    def __post_init__(self):
        if self.ratio not in RATIOS:
            raise ValueError(f"ratio={self.ratio!r} is not one of {RATIOS}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={self.aggregation!r} is not one of {AGGREGATIONS}")
        if self.kl_estimator not in losses.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} is not one of {losses.KL_ESTIMATORS}")
        for name in ("clip_eps_low", "clip_eps_high"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("kl_in_loss_coef", "entropy_coef", "tis_cap"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.aggregation == "constant" and (self.max_tokens is None or self.max_tokens < 1):
            raise ValueError(f'aggregation="constant" divides by max_tokens, which must be >= 1, got '
                             f"max_tokens={self.max_tokens}")


def aggregate(x_bt, mask_bt, aggregation: str, max_tokens: int | None = None):
    """(sum, weight) of per-token x under an aggregation (module docstring); sum / weight is the batch value."""
    if aggregation == "token":
        return losses.masked_sum(x_bt, mask_bt), jnp.sum(mask_bt)
    if aggregation == "sequence":
        count_b = jnp.sum(mask_bt, axis=1)
        return jnp.sum(losses.masked_mean(x_bt, mask_bt, axis=1)), jnp.sum((count_b > 0).astype(jnp.float32))
    if aggregation == "constant":
        return losses.masked_sum(x_bt, mask_bt) / max_tokens, jnp.float32(mask_bt.shape[0])
    raise ValueError(f"aggregation={aggregation!r} is not one of {AGGREGATIONS}")


def policy_loss(logp_bt, old_logp_bt, advantages_bt, mask_bt, options: PolicyLossOptions, *, ref_logp_bt=None,
                entropy_bt=None, sampler_logp_bt=None):
    """The policy loss of the module docstring -> (loss_sum, weight, stats).

    logp_bt: log π of the sampled tokens (differentiated); old_logp_bt: log π_old, the policy that the
    advantages were computed for (the trainer's recomputation at rollout time); ref_logp_bt: log π_ref (needed
    when kl_in_loss_coef > 0); entropy_bt: H of π per token (needed when entropy_coef > 0); sampler_logp_bt:
    the sampler's log-probs of the same tokens (needed when tis_cap > 0).
    stats, sums with the loss's weight: policy_loss (the surrogate alone), clip_fraction = clip_fraction_low
    (ρ < 1 − ε_low) + clip_fraction_high (ρ > 1 + ε_high), approx_kl = (ρ_t − 1) − log ρ_t with the token
    ratio (k3 of KL(π_old ‖ π)), ratio (the ρ used); entropy and kl (the loss term's estimator) when their
    inputs are given; tis_weight (w) and tis_capped (1[π_old/π_sampler > C]) when tis_cap > 0.
    With ratio="token", ε_low = ε_high = ε and no other option this is losses.policy_loss, weight Σ m.
    """
    o = options
    for field, arg, given in (("kl_in_loss_coef", "ref_logp_bt", ref_logp_bt),
                              ("entropy_coef", "entropy_bt", entropy_bt),
                              ("tis_cap", "sampler_logp_bt", sampler_logp_bt)):
        if getattr(o, field) > 0 and given is None:
            raise ValueError(f"{field}={getattr(o, field)} needs {arg}, which was not given")
    real_bt = mask_bt > 0
    # Padding is zeroed before exp or any product, so inf or NaN there reaches neither the loss nor its gradient.
    log_ratio_bt = jnp.where(real_bt, logp_bt - old_logp_bt, 0.0)
    advantages_bt = jnp.where(real_bt, advantages_bt, 0.0)
    if o.ratio == "sequence":
        log_s_b = losses.masked_mean(log_ratio_bt, mask_bt, axis=1)
        sg = jax.lax.stop_gradient
        used_log_ratio_bt = jnp.where(real_bt, sg(log_s_b)[:, None] + log_ratio_bt - sg(log_ratio_bt), 0.0)
    else:
        used_log_ratio_bt = log_ratio_bt
    ratio_bt = jnp.exp(used_log_ratio_bt)
    low, high = 1.0 - o.clip_eps_low, 1.0 + o.clip_eps_high
    surrogate_bt = jnp.maximum(-advantages_bt * ratio_bt, -advantages_bt * jnp.clip(ratio_bt, low, high))
    per_stat = dict(clip_fraction_low=(ratio_bt < low).astype(jnp.float32),
                    clip_fraction_high=(ratio_bt > high).astype(jnp.float32),
                    approx_kl=(jnp.exp(log_ratio_bt) - 1.0) - log_ratio_bt,
                    ratio=ratio_bt)
    if o.tis_cap > 0:
        sampler_ratio_bt = jnp.exp(jnp.where(real_bt, old_logp_bt - sampler_logp_bt, 0.0))
        tis_bt = jax.lax.stop_gradient(jnp.minimum(sampler_ratio_bt, o.tis_cap))
        surrogate_bt = tis_bt * surrogate_bt
        per_stat.update(tis_weight=tis_bt, tis_capped=(sampler_ratio_bt > o.tis_cap).astype(jnp.float32))
    per_stat["policy_loss"] = surrogate_bt
    loss_bt = surrogate_bt
    if ref_logp_bt is not None:
        kl_bt = losses.kl_estimate(jnp.where(real_bt, logp_bt, 0.0), jnp.where(real_bt, ref_logp_bt, 0.0),
                                   o.kl_estimator)
        per_stat["kl"] = kl_bt
        if o.kl_in_loss_coef > 0:
            loss_bt = loss_bt + o.kl_in_loss_coef * kl_bt
    if entropy_bt is not None:
        entropy_bt = jnp.where(real_bt, entropy_bt, 0.0)
        per_stat["entropy"] = entropy_bt
        if o.entropy_coef > 0:
            loss_bt = loss_bt - o.entropy_coef * entropy_bt
    loss_sum, weight = aggregate(loss_bt, mask_bt, o.aggregation, o.max_tokens)
    stats = {name: aggregate(jax.lax.stop_gradient(x_bt), mask_bt, o.aggregation, o.max_tokens)[0]
             for name, x_bt in per_stat.items()}
    stats["clip_fraction"] = stats["clip_fraction_low"] + stats["clip_fraction_high"]
    return loss_sum, weight, stats


def logprob_mismatch(sampler_logp_bt, trainer_logp_bt, mask_bt) -> dict:
    """How far the sampler's log-probs of the sampled tokens are from the trainer's (different kernels,
    precision or weights: the off-policy gap that tis_cap corrects), over the masked tokens:

        mean_abs = Σ m·|Δ| / Σ m,   max_abs = max_{m > 0} |Δ|,   Δ = log π_sampler − log π_trainer
    Both 0 for an empty mask.
    """
    abs_bt = jnp.where(mask_bt > 0, jnp.abs(sampler_logp_bt - trainer_logp_bt), 0.0)
    return dict(mean_abs=losses.masked_mean(abs_bt, mask_bt), max_abs=jnp.max(abs_bt, initial=0.0))
