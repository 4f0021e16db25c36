"""RLHF with PPO: the SFT policy optimised against a frozen reward model under a KL penalty to the reference.

    llm-jax train --config configs/ppo.py:tiny --workdir runs/ppo     # policy from runs/sft, reward from runs/rm

Four models share the mesh: the policy π (from `train.init_from`, the SFT run), the value model V (a
`reward.RewardModel`: the reward run's trunk and head by default, `ppo.value_from`), the frozen reference
π_ref (`ppo.reference_run`, default the SFT run) and the frozen reward model R (`ppo.reward_run`). The frozen
two hold no optimizer state; a LoRA policy's reference is its own base weights with the adapters left out,
so the two share one copy of the base.

Each iteration (`train.steps` of them; `llm_jax/rl/ppo_loop.py`) samples one response per prompt for
`ppo.rollout_batch` prompts with the KV-cache generator, scores them, and takes `ppo.epochs` passes of
minibatch updates (`ppo.minibatch` rows each) of both models, with the losses of `llm_jax/rl/losses.py`:

    s       = (R(x, y) − μ_R) / σ_R − penalty·[y did not stop]       μ_R, σ_R: the reward run's last eval
    r_t     = −β·kl_t + s·[t = last]          kl_t = kl_estimate(log π_old, log π_ref)  (k1 | k2 | k3)
    A, G    = GAE(r, V_old; γ, λ), A whitened over the rollout
    policy  = Σ_t max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 ± ε)) − c_e·Σ_t entropy_t       ρ_t = π/π_old
    value   = Σ_t ½·max((V − G)², (clip(V, V_old ± c) − G)²)

both averaged over the minibatch's response tokens. With `ppo.reward_shaping="dense"` the score is paid
in the parts its tokens earned, as they are emitted, and the rest (the head, the penalty) at the end:

    r_t     = −β·kl_t + d_t + (s − Σ_t d_t)·[t = last]
    d_t     = log p_R(y_t | x, y_<t) / σ_R            a "likelihood" reward model's per-token terms
    d_t     = Φ(y_≤t) − Φ(y_<t),  Φ = gold_score(x, ·)  the gold scorer over the response's prefixes

The return of a whole response is unchanged (γ = 1); a token's return-to-go just no longer holds what the
tokens before it earned, which the value model would otherwise have to read off the prefix (credit
assignment: experiments/rlhf/README.md). With `ppo.baseline="group"` each prompt is sampled
`ppo.samples_per_prompt` (k) times and the mean paid score of its other k − 1 samples replaces the value
model as the baseline (RLOO; s − b is paid at the last token, GAE then runs with V = 0 and the value model is
not trained). That baseline is per prompt by construction, where the value model must first learn it. With `ppo.reward="gold"` the embedded task's scorer pays s
instead (gold_score − penalty·[did not stop]): PPO against a perfect reward model, the ceiling that separates
the reward model's errors from the optimiser's (the reward model is still scored and logged). Any other judge
of eval/judges.py pays the same way (`ppo.reward="numeric_match"`, `"my_rewards:checker"`: verifiable rewards). β is fixed or follows the adaptive controller toward
`ppo.kl_target` (Ziegler et al. 2019). Standardising R with the reward model's own held-out statistics puts
rewards on a unit scale, so β and the value loss mean the same thing whatever offset R learned.

With `ppo.ptx_coef` > 0 every policy update also takes `ppo.ptx_batch` packed rows of pretraining text
(`ppo.ptx_data`) and adds ptx_coef · their mean LM loss (InstructGPT's PPO-ptx: the pretraining distribution
holds on while the policy chases the reward).

This module holds the settings (its config section, `CONFIG_DEFAULTS`), the two loss functions and its row of the
pipeline table; the loop lives in `llm_jax/rl/ppo_loop.py`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llm_jax.objectives import before_after, fmt, lm
from llm_jax.objectives.lm import token_log_probs
from llm_jax.rl import losses, rollout

VALUE_FROM = ("reward", "policy")
REWARD_MODEL = "reward_model"  # ppo.reward: the reward run pays; any other value is a judge spec (eval/judges.py)
BASELINES = ("value", "group")
REWARD_SHAPINGS = ("final", "dense")

CONFIG_SECTION = "ppo"
CONFIG_DEFAULTS = dict(  # train.steps counts PPO iterations
    reward="reward_model",  # what pays: the reward model | a judge: gold (the embedded task's scorer: the
                           # ceiling), exact_match, numeric_match, module:function (eval/judges.py)
    reward_run="runs/rm",  # the frozen reward model (scored and logged in either case)
    reference_run="",      # the frozen reference; empty: train.init_from (LoRA: the policy's own base)
    value_from="reward",   # the value model starts from the reward run (trunk + head) | policy (zero head)
    prompts="default_task", eval_prompts="default_task", n_eval_prompts=256,
    rollout_batch=64,      # responses per iteration: rollout_batch / samples_per_prompt prompts
    samples_per_prompt=1,  # k responses to each prompt (a group)
    baseline="value",      # value: GAE with the value model | group: the prompt's other samples (RLOO)
    minibatch=16, epochs=4,  # updates per iteration: epochs · rollout_batch / minibatch, each model
    max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0,
    kl_coef=0.05,          # β of the per-token KL penalty (the initial β when adaptive)
    kl_estimator="k1",     # k1 | k2 | k3 (rl/losses.py)
    kl_control="fixed",    # fixed | adaptive (toward kl_target nats per response over kl_horizon samples)
    kl_target=6.0, kl_horizon=10000.0,
    gamma=1.0, lam=0.95,   # GAE
    clip_eps=0.2, value_clip=0.2, entropy_coef=0.0,
    whiten_advantages=True,
    normalize_score=True,  # standardise scores with the reward run's last eval mean and std
    unfinished_penalty=1.0,  # subtracted from the (standardised) score of a response that never stopped
    value_lr=0.0,          # the value model's peak lr; 0: optim.lr
    ptx_coef=0.0,          # PPO-ptx: + ptx_coef · the LM loss on pretraining rows at every policy update
    ptx_data="default",    # those rows: a data.train spec ("default": the embedded corpus), packed at data.seq_len
    ptx_batch=8,           # pretraining rows per policy update
    reward_shaping="final",  # final: the whole score at the last token | dense: the part each token earned,
                             # as it is emitted (likelihood reward models; the gold scorer over prefixes)
)


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    reward: str
    reward_run: str
    reference_run: str
    value_from: str
    prompts: str
    eval_prompts: str
    n_eval_prompts: int
    rollout_batch: int
    samples_per_prompt: int
    baseline: str
    minibatch: int
    epochs: int
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    kl_coef: float
    kl_estimator: str
    kl_control: str
    kl_target: float
    kl_horizon: float
    gamma: float
    lam: float
    clip_eps: float
    value_clip: float
    entropy_coef: float
    whiten_advantages: bool
    normalize_score: bool
    unfinished_penalty: float
    value_lr: float
    reward_shaping: str
    ptx_coef: float
    ptx_data: str
    ptx_batch: int

    @property
    def updates_per_iteration(self) -> int:
        return self.epochs * (self.rollout_batch // self.minibatch)


def settings(config) -> PPOSettings:
    """`config.ppo` checked field by field; every bad value is named."""
    p = config.ppo
    s = PPOSettings(**{f.name: p[f.name] for f in dataclasses.fields(PPOSettings)})
    s = dataclasses.replace(s, reference_run=s.reference_run or config.train.init_from)
    if not config.train.init_from:
        raise ValueError("PPO starts from a policy: set train.init_from to an SFT run directory")
    if not s.reward_run:
        raise ValueError("PPO needs a reward model: set ppo.reward_run to a reward run directory")
    if not s.reward:
        raise ValueError(f'ppo.reward is empty: "{REWARD_MODEL}" or a judge (gold, exact_match, module:function, ...)')
    if s.baseline not in BASELINES:
        raise ValueError(f"ppo.baseline={s.baseline!r} is not one of {BASELINES}")
    if s.samples_per_prompt < 1 or s.rollout_batch % s.samples_per_prompt:
        raise ValueError(f"ppo.rollout_batch={s.rollout_batch} must be a multiple of ppo.samples_per_prompt="
                         f"{s.samples_per_prompt} (>= 1)")
    if s.baseline == "group" and s.samples_per_prompt < 2:
        raise ValueError(f'ppo.baseline="group" needs ppo.samples_per_prompt >= 2, got {s.samples_per_prompt}')
    if s.ptx_coef < 0 or (s.ptx_coef > 0 and (s.ptx_batch < 1 or not s.ptx_data)):
        raise ValueError(f"ppo.ptx_coef={s.ptx_coef} must be >= 0, and > 0 needs ppo.ptx_data (got "
                         f"{s.ptx_data!r}) and ppo.ptx_batch >= 1 (got {s.ptx_batch})")
    if s.reward_shaping not in REWARD_SHAPINGS:
        raise ValueError(f"ppo.reward_shaping={s.reward_shaping!r} is not one of {REWARD_SHAPINGS}")
    if s.value_from not in VALUE_FROM:
        raise ValueError(f"ppo.value_from={s.value_from!r} is not one of {VALUE_FROM}")
    if s.kl_estimator not in losses.KL_ESTIMATORS:
        raise ValueError(f"ppo.kl_estimator={s.kl_estimator!r} is not one of {losses.KL_ESTIMATORS}")
    losses.make_kl_controller(s.kl_control, s.kl_coef, s.kl_target, s.kl_horizon)  # names a bad kind or target
    for name in ("rollout_batch", "minibatch", "epochs", "max_new_tokens", "n_eval_prompts"):
        if getattr(s, name) < 1:
            raise ValueError(f"ppo.{name} must be >= 1, got {getattr(s, name)}")
    if s.rollout_batch % s.minibatch:
        raise ValueError(f"ppo.rollout_batch={s.rollout_batch} is not a multiple of ppo.minibatch={s.minibatch}")
    if s.kl_coef < 0 or s.entropy_coef < 0 or s.value_clip < 0 or s.clip_eps <= 0:
        raise ValueError(f"ppo.kl_coef={s.kl_coef}, entropy_coef={s.entropy_coef} and value_clip={s.value_clip} "
                         f"must be >= 0 and clip_eps={s.clip_eps} > 0")
    if not (0.0 <= s.gamma <= 1.0 and 0.0 <= s.lam <= 1.0):
        raise ValueError(f"ppo.gamma={s.gamma} and ppo.lam={s.lam} must be in [0, 1]")
    if s.temperature <= 0:
        raise ValueError(f"ppo.temperature must be > 0 (PPO needs a sampling policy), got {s.temperature}")
    return s


def _sequences(batch: dict) -> rollout.Sequences:
    return rollout.Sequences(batch["tokens"], batch["segment_ids"], batch["index"], batch["response"],
                             batch["mask"])


PTX_PREFIX = "ptx_"  # a policy minibatch's pretraining rows: ptx_inputs, ptx_targets, ... (packed LM rows)


def make_policy_loss_fn(model, s: PPOSettings):
    """loss_fn(params, batch, rng) -> (Σ clipped policy loss − c_e·Σ entropy, stats) over response tokens; with
    `ppo.ptx_coef` > 0, plus ptx_coef · (the mean LM loss of the batch's `ptx_` rows) · Σ response tokens, so that
    the step's mean over response tokens is the PPO loss + ptx_coef · the pretraining loss (InstructGPT's
    PPO-ptx)."""
    lm_loss_fn = lm.make_loss_fn(model)

    def loss_fn(params, batch, rng):
        seqs = _sequences(batch)
        logits_bnv = rollout.response_logits(model, params, seqs, rng)
        logp_bn = token_log_probs(logits_bnv, seqs.response_bn) * seqs.mask_bn
        pg_sum, stats = losses.policy_loss(logp_bn, batch["old_logp"], batch["advantages"], seqs.mask_bn,
                                           s.clip_eps)
        entropy_sum = losses.masked_sum(losses.entropy_from_logits(logits_bnv), seqs.mask_bn)
        weight = jnp.sum(seqs.mask_bn)
        stats = dict(stats, weight=weight, policy_loss=pg_sum, entropy=entropy_sum)
        loss = pg_sum - s.entropy_coef * entropy_sum
        if s.ptx_coef > 0:
            ptx = {k[len(PTX_PREFIX):]: v for k, v in batch.items() if k.startswith(PTX_PREFIX)}
            ptx_sum, ptx_stats = lm_loss_fn(params, ptx, None if rng is None else jax.random.fold_in(rng, 1))
            ptx_mean = ptx_sum / jnp.maximum(ptx_stats["weight"], 1.0)
            loss = loss + s.ptx_coef * ptx_mean * weight
            stats["ptx_loss"] = ptx_mean * weight  # a sum over response tokens, like every stat: the step's mean
        return loss, stats
    return loss_fn


def make_value_loss_fn(model, s: PPOSettings):
    """loss_fn(params, batch, rng) -> (Σ clipped value loss, stats) over response tokens."""
    def loss_fn(params, batch, rng):
        seqs = _sequences(batch)
        values_bn = rollout.values(model, params, seqs, rng)
        loss_sum, stats = losses.value_loss(values_bn, batch["old_values"], batch["returns"], seqs.mask_bn,
                                            s.value_clip)
        return loss_sum, dict(stats, weight=jnp.sum(seqs.mask_bn))
    return loss_fn


def table_row(metrics: dict, summary: dict) -> str:
    """Before → after the run, from the loop's own evals (`ppo.n_eval_prompts`; before = the starting policy)."""
    del summary
    return (f"gold greedy {before_after(metrics, 'eval_gold_greedy')}, sampled {before_after(metrics, 'eval_gold')}; "
            f"KL {fmt(metrics.get('after_eval_kl'))} nats; reward-model score {before_after(metrics, 'eval_score')}")


# PPO has its own loop (sample, score, update), which `llm-jax train` runs for objective "ppo". Named, not
# imported: the loop builds on this module.
LOOP = "llm_jax.rl.ppo_loop"
