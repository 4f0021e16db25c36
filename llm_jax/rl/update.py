"""The RL updates' loss functions, in the loss_fn(params, batch, rng) -> (loss_sum, stats) form of train/step.py.

A minibatch holds rollout rows in response coordinates (rl/rollout.py): `tokens`, `segment_ids`, `index`,
`response`, `mask` (the response's tokens), `loss_mask` (the tokens that count in the loss: `mask` unless
DAPO's overlong filter zeroed a row), `old_logp` (the trainer's log-probs at rollout time), `advantages`, and
as the options need them `ref_logp`, `sampler_logp`, `old_values`, `returns`; with PPO-ptx also packed
pretraining rows under `ptx_`-prefixed keys.

    policy:  rl/policy_loss.py policy_loss (clip ε_low/ε_high, token or sequence ratio, token / sequence /
             constant aggregation, KL loss term, entropy bonus, truncated importance sampling)
             + ptx_coef · (the pretraining rows' mean LM loss) · weight          (InstructGPT's PPO-ptx)
    value:   Σ_t ½·max((V − G)², (clip(V, V_old ± c) − G)²) over response tokens (rl/losses.py value_loss)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_jax.objectives import lm
from llm_jax.objectives.lm import token_log_probs
from llm_jax.rl import losses, rollout
from llm_jax.rl.policy_loss import policy_loss
from llm_jax.rl.settings import RLSettings

PTX_PREFIX = "ptx_"  # a policy minibatch's pretraining rows: ptx_inputs, ptx_targets, ... (packed LM rows)


def sequences(batch: dict) -> rollout.Sequences:
    return rollout.Sequences(batch["tokens"], batch["segment_ids"], batch["index"], batch["response"],
                             batch["mask"])


def make_policy_loss_fn(model, s: RLSettings):
    """loss_fn(params, batch, rng) -> (loss_sum, stats) of the policy (module docstring); `stats["weight"]` is the
    aggregation's weight, so the step's loss is the batch's loss whatever the aggregation."""
    lm_loss_fn = lm.make_loss_fn(model)
    options = s.loss_options

    def loss_fn(params, batch, rng):
        seqs = sequences(batch)
        logits_bnv = rollout.response_logits(model, params, seqs, rng)
        logp_bn = token_log_probs(logits_bnv, seqs.response_bn) * seqs.mask_bn
        loss_sum, weight, stats = policy_loss(
            logp_bn, batch["old_logp"], batch["advantages"], batch["loss_mask"], options,
            ref_logp_bt=batch.get("ref_logp"), entropy_bt=losses.entropy_from_logits(logits_bnv),
            sampler_logp_bt=batch.get("sampler_logp"))
        stats = dict(stats, weight=weight)
        if s.ptx_coef > 0:
            ptx = {k[len(PTX_PREFIX):]: v for k, v in batch.items() if k.startswith(PTX_PREFIX)}
            ptx_sum, ptx_stats = lm_loss_fn(params, ptx, None if rng is None else jax.random.fold_in(rng, 1))
            ptx_mean = ptx_sum / jnp.maximum(ptx_stats["weight"], 1.0)
            loss_sum = loss_sum + s.ptx_coef * ptx_mean * weight
            stats["ptx_loss"] = ptx_mean * weight  # a sum with the loss's weight, like every stat: the step's mean
        return loss_sum, stats
    return loss_fn


def make_value_loss_fn(model, s: RLSettings):
    """loss_fn(params, batch, rng) -> (Σ clipped value loss, stats) over response tokens."""
    def loss_fn(params, batch, rng):
        seqs = sequences(batch)
        values_bn = rollout.values(model, params, seqs, rng)
        loss_sum, stats = losses.value_loss(values_bn, batch["old_values"], batch["returns"], batch["loss_mask"],
                                            s.value_clip)
        return loss_sum, dict(stats, weight=jnp.sum(batch["loss_mask"]))
    return loss_fn
