"""Advantage estimators by name: one rollout's scores (and values) -> per-token advantages for the policy loss.

Every estimator is a free function `fn(inputs: AdvantageInputs) -> Advantages` over right-padded (B, T) float32
arrays (`mask_bt` as in `llm_jax/rl/losses.py`), registered in `ESTIMATORS` with what it needs:

    name          needs a value model   needs groups (k ≥ 2)   A_t of response i
    gae           yes                   no                     GAE(r, V; γ, λ) on r_t = −β·kl_t + d_t + (s_i − Σd)·[t = last]
    grpo          no                    yes                    (s̃_i − mean_g s̃) / (std_g s̃ + ε)
    dr_grpo       no                    yes                    s̃_i − mean_g s̃
    rloo          no                    yes                    s̃_i − mean_{j ≠ i in g} s̃_j
    reinforce_pp  no                    no                     whiten_batch(Σ_{t' ≥ t} γ^(t'−t)·r_t')

A group is rows [g·k, (g+1)·k): one prompt's k samples. s_i is the paid sequence score (penalties included),
s̃_i = s_i − β·Σ_t kl_it the score with a KL-in-reward penalty taken out as a sequence total (β = 0, or kl_bt
None, when the KL is a term of the loss instead: `llm_jax/rl/policy_loss.py`). Padding entries of every output
are 0. Whitening GAE's advantages stays an option of the loop (`losses.whiten`); reinforce_pp's batch
normalisation is part of the estimator.

`check_estimator(name, has_value_model=..., group=...)` is the validation a loop runs once on its config:
it refuses gae without a value model and the group estimators with one sample per prompt.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp

from llm_jax.rl import losses

# Added to a group's standard deviation before dividing, as verl's compute_grpo_outcome_advantage (epsilon=1e-6).
GRPO_EPS = 1e-6


@flax.struct.dataclass
class AdvantageInputs:
    """What an estimator reads from a scored rollout; a pytree, so it can cross a jit boundary.

    scores_b:  (B,) the paid sequence score of each response, penalties included; with dense shaping the
               whole score, of which dense_bt holds the parts paid per token.
    mask_bt:   (B, T) 1.0 on a response's tokens (right-padded).
    kl_bt:     (B, T) per-token KL estimate (losses.kl_estimate) for a KL-in-reward penalty; None (or zeros)
               when the KL is a loss term.
    beta:      the KL-in-reward coefficient β (a number or a traced scalar: the adaptive controller's).
    values_bt: (B, T) the value model's V of the state before each token; None without a value model.
    dense_bt:  (B, T) per-token parts of the score (dense shaping, losses.token_rewards); None: all at the end.
               Only the per-token estimators (gae, reinforce_pp) read it: the group ones compare whole scores.
    group:     k, samples per prompt (static: it shapes a reshape).
    gamma, lam: discount and GAE λ.
    """
    scores_b: jax.Array
    mask_bt: jax.Array
    kl_bt: jax.Array | None = None
    beta: float | jax.Array = 0.0
    values_bt: jax.Array | None = None
    dense_bt: jax.Array | None = None
    group: int = flax.struct.field(pytree_node=False, default=1)
    gamma: float | jax.Array = 1.0
    lam: float | jax.Array = 1.0


class Advantages(NamedTuple):
    advantages_bt: jax.Array         # (B, T), 0 on padding
    returns_bt: jax.Array | None     # (B, T) the value model's regression targets; None without a value model


Estimator = Callable[[AdvantageInputs], Advantages]
ESTIMATORS: dict[str, Estimator] = {}


def register(name: str, *, needs_value_model: bool, needs_groups: bool):
    """Adds an estimator to ESTIMATORS under `name`, its needs recorded as attributes of the function."""
    def add(fn):
        fn.needs_value_model, fn.needs_groups = needs_value_model, needs_groups
        ESTIMATORS[name] = fn
        return fn
    return add


def get_estimator(name: str) -> Estimator:
    """The estimator registered as `name`; ValueError naming it and the choices otherwise."""
    if name not in ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r} is not one of {tuple(ESTIMATORS)}")
    return ESTIMATORS[name]


def check_estimator(name: str, *, has_value_model: bool, group: int) -> Estimator:
    """get_estimator(name), refusing what the run cannot give it: a value model, or k ≥ 2 samples per prompt."""
    fn = get_estimator(name)
    if fn.needs_value_model and not has_value_model:
        raise ValueError(f"advantage estimator {name!r} needs a value model (values_bt), and this run has none")
    if fn.needs_groups and group < 2:
        raise ValueError(f"advantage estimator {name!r} compares a prompt's samples with each other and needs "
                         f"group >= 2 samples per prompt, got group={group}")
    return fn


def _kl_b(inputs: AdvantageInputs):
    """Σ_t m·kl_t per response (0 without kl_bt)."""
    if inputs.kl_bt is None:
        return jnp.zeros(inputs.scores_b.shape, jnp.float32)
    return losses.masked_sum(inputs.kl_bt, inputs.mask_bt, axis=1)


def _token_rewards(inputs: AdvantageInputs):
    """r_t = −β·kl_t + d_t + (s − Σ_t d_t)·[t = last], the whole score paid over the response's tokens."""
    kl_bt = jnp.zeros_like(inputs.mask_bt) if inputs.kl_bt is None else inputs.kl_bt
    final_b = inputs.scores_b
    if inputs.dense_bt is not None:
        final_b = final_b - losses.masked_sum(inputs.dense_bt, inputs.mask_bt, axis=1)
    return losses.token_rewards(final_b, kl_bt, inputs.mask_bt, inputs.beta, inputs.dense_bt)


def _grouped(inputs: AdvantageInputs, name: str):
    """(s̃ as (G, k), 1[the group's s̃ are all equal] as (G, 1)): s̃_i = s_i − β·Σ_t kl_it."""
    k, b = inputs.group, inputs.scores_b.shape[0]
    if k < 2 or b % k:
        raise ValueError(f"advantage estimator {name!r} needs group >= 2 samples per prompt dividing the batch, "
                         f"got group={k} for {b} rows")
    paid_gk = (inputs.scores_b.astype(jnp.float32) - inputs.beta * _kl_b(inputs)).reshape(-1, k)
    equal_g1 = jnp.max(paid_gk, axis=1, keepdims=True) == jnp.min(paid_gk, axis=1, keepdims=True)
    return paid_gk, equal_g1


def _per_token(adv_gk, equal_g1, inputs: AdvantageInputs):
    """A group of equal scores carries no signal: exactly 0 (s − mean can round to ±1 ulp, std to ~0)."""
    adv_b = jnp.where(equal_g1, 0.0, adv_gk).reshape(-1)
    return Advantages(jnp.where(inputs.mask_bt > 0, adv_b[:, None], 0.0), None)


@register("gae", needs_value_model=True, needs_groups=False)
def gae(inputs: AdvantageInputs) -> Advantages:
    """PPO's estimator (Schulman et al. 2016, 2017; Ziegler et al. 2019): rewards per token, then GAE.

        r_t = −β·kl_t + d_t + (s − Σ_t d_t)·[t = last]          losses.token_rewards
        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1},   G_t = A_t + V_t     losses.gae
    returns_bt = G, the value model's targets. Whitening A over the batch is the loop's option (losses.whiten).
    """
    if inputs.values_bt is None:
        raise ValueError("advantage estimator 'gae' needs a value model: values_bt is None")
    advantages_bt, returns_bt = losses.gae(_token_rewards(inputs), inputs.values_bt, inputs.mask_bt,
                                           inputs.gamma, inputs.lam)
    return Advantages(advantages_bt, returns_bt)


@register("grpo", needs_value_model=False, needs_groups=True)
def grpo(inputs: AdvantageInputs) -> Advantages:
    """GRPO's outcome advantage (Shao et al. 2024, DeepSeekMath §4.1.2), the same for every token of response i:

        s̃_i = s_i − β·Σ_t kl_it,   A_i = (s̃_i − mean_g s̃) / (std_g s̃ + ε),   ε = GRPO_EPS = 1e-6
    std is the unbiased (Bessel, k − 1) one: the paper writes only "std", and the implementations GRPO runs are
    compared against all take torch.std's default, which is unbiased (TRL GRPOTrainer, verl
    compute_grpo_outcome_advantage, OpenRLHF group_norm). For k samples the two differ by sqrt(k/(k − 1)), an
    overall scale of the advantages. A group whose s̃ are all equal gets exactly 0. The paper puts the KL in the
    loss (β = 0 here, policy_loss's kl_in_loss_coef with k3); with a KL-in-reward penalty it comes off the score
    before grouping.
    """
    paid_gk, equal_g1 = _grouped(inputs, "grpo")
    k = inputs.group
    centred_gk = paid_gk - jnp.mean(paid_gk, axis=1, keepdims=True)
    std_g1 = jnp.sqrt(jnp.sum(jnp.square(centred_gk), axis=1, keepdims=True) / (k - 1))
    return _per_token(centred_gk / (std_g1 + GRPO_EPS), equal_g1, inputs)


@register("dr_grpo", needs_value_model=False, needs_groups=True)
def dr_grpo(inputs: AdvantageInputs) -> Advantages:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective"): GRPO without
    the division by the group's std, which weighs a prompt by how little its rewards vary (a difficulty bias).

        A_i = s̃_i − mean_g s̃,   s̃_i = s_i − β·Σ_t kl_it
    Its other fix, no length normalisation of the loss, is policy_loss's aggregation="constant" (Σ over tokens
    / (B · max_tokens)), not part of the advantage. A group of equal s̃ gets exactly 0.
    """
    paid_gk, equal_g1 = _grouped(inputs, "dr_grpo")
    return _per_token(paid_gk - jnp.mean(paid_gk, axis=1, keepdims=True), equal_g1, inputs)


@register("rloo", needs_value_model=False, needs_groups=True)
def rloo(inputs: AdvantageInputs) -> Advantages:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"):

        A_i = s̃_i − (Σ_{j in g} s̃_j − s̃_i) / (k − 1),   s̃_i = s_i − β·Σ_t kl_it     (losses.leave_one_out_mean)
    The baseline does not depend on sample i, so the estimate is unbiased; A_i = k/(k − 1)·(s̃_i − mean_g s̃).
    A group of equal s̃ gets exactly 0.
    """
    paid_gk, equal_g1 = _grouped(inputs, "rloo")
    paid_b = paid_gk.reshape(-1)
    adv_gk = (paid_b - losses.leave_one_out_mean(paid_b, inputs.group)).reshape(paid_gk.shape)
    return _per_token(adv_gk, equal_g1, inputs)


@register("reinforce_pp", needs_value_model=False, needs_groups=False)
def reinforce_pp(inputs: AdvantageInputs) -> Advantages:
    """REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning LLMs"): no critic,
    the KL in the per-token reward, the return-to-go, then one normalisation over the whole batch's tokens.

        r_t = −β·kl_t + d_t + (s − Σ_t d_t)·[t = last]
        R_t = Σ_{t' ≥ t} γ^(t'−t)·r_t'        (the paper's γ = 1: the plain return-to-go)
        A_t = (R_t − mean(R)) / sqrt(var(R) + 1e-8)   over every response token of the batch (losses.whiten,
                                                      unbiased var)
    Computed as GAE with V = 0 and λ = 1 (δ_t = r_t). Normalising over the batch rather than a prompt's group
    keeps it usable with k = 1.
    """
    rewards_bt = _token_rewards(inputs)
    returns_bt, _ = losses.gae(rewards_bt, jnp.zeros_like(rewards_bt), inputs.mask_bt, inputs.gamma, 1.0)
    return Advantages(losses.whiten(returns_bt, inputs.mask_bt), None)
