"""Reinforcement learning from rewards: the SFT policy against a reward model and/or verifiable judges, under a
KL penalty to the SFT reference. PPO, GRPO, Dr. GRPO, DAPO, RLOO and REINFORCE++ are settings of one loop.

    llm-jax train --config configs/ppo.py:tiny  --workdir runs/ppo     # GAE with a value model, the reward model
    llm-jax train --config configs/grpo.py:tiny --workdir runs/grpo    # group-normalised, no value model

This module declares the `rl` config section and the pipeline table's row; the loop and the algorithms live in
llm_jax/rl/ (which builds on objectives/, not the other way round):

    rl/settings.py     the section checked, `rl.reward`'s terms
    rl/rewards.py      what pays: the reward model and the judges of eval/judges.py, with weights
    rl/advantages.py   the estimators by name: gae, grpo, dr_grpo, rloo, reinforce_pp
    rl/policy_loss.py  the clipped surrogate and its options (clip-higher, GSPO's ratio, aggregation, KL term,
                       entropy, truncated importance sampling)
    rl/groups.py       dynamic sampling and overlong handling (DAPO)
    rl/loop.py         the iteration on the run harness (train/harness.py)

One iteration, with π the policy, π_ref the frozen reference, s_i the paid score of response i:

    kl_t      = kl_estimate(log π_old, log π_ref)           (rl.kl_estimator) in the reward with β = rl.kl_coef
    A         = estimator(s, kl, β, V)                      (rl.estimator)
    policy    = aggregate(max(−A·ρ, −A·clip(ρ, 1 − ε_low, 1 + ε_high)) + β_loss·kl_loss − c_e·H)
    value     = Σ_t ½·max((V − G)², (clip(V, V_old ± c) − G)²)          (only for an estimator that needs V)

β is fixed or follows the adaptive controller toward `rl.kl_target` (Ziegler et al. 2019).
"""
from llm_jax.objectives import before_after, fmt

CONFIG_SECTION = "rl"
CONFIG_DEFAULTS = dict(  # train.steps counts RL iterations; defaults are PPO's (configs/ppo.py)
    reward="reward_model",  # what pays: comma list of spec or spec=weight; reward_model | a judge: gold (the
                           # embedded task's scorer: the ceiling), exact_match, numeric_match,
                           # module:function (eval/judges.py), e.g. "reward_model=1,gold=0.5"
    reward_run="runs/rm",  # the frozen reward model (scored and logged whenever set; "": none)
    reference_run="",      # the frozen reference; empty: train.init_from (LoRA: the policy's own base)
    estimator="gae",       # advantages: gae | grpo | dr_grpo | rloo | reinforce_pp (rl/advantages.py)
    value_from="reward",   # gae's value model starts from the reward run (trunk + head) | policy (zero head) | none
    prompts="default_task", eval_prompts="default_task", n_eval_prompts=256,
    rollout_batch=64,      # responses per iteration: rollout_batch / samples_per_prompt prompts
    samples_per_prompt=1,  # k responses to each prompt (a group; the group estimators need k >= 2)
    minibatch=16, epochs=4,  # updates per iteration: epochs · rollout_batch / minibatch, each model
    max_new_tokens=32, temperature=1.0, top_k=0, top_p=1.0,
    rollout="static",      # static: one batch decodes until its longest answer | continuous: continuous batching
    rollout_slots=0,       # continuous batching's rows decoding at once; 0: rollout_batch
    kl_coef=0.05,          # β of the per-token KL penalty in the reward (the initial β when adaptive)
    kl_estimator="k1",     # k1 | k2 | k3 (rl/losses.py), the reward's penalty
    kl_control="fixed",    # fixed | adaptive (toward kl_target nats per response over kl_horizon samples)
    kl_target=6.0, kl_horizon=10000.0,
    kl_loss_coef=0.0,      # β_loss of a KL term in the loss (GRPO's), instead of or beside the reward's penalty
    kl_loss_estimator="k3",  # its estimator: k1 | k2 | k3
    gamma=1.0, lam=0.95,   # GAE
    clip_eps=0.2,          # ε_low of the clipped ratio
    clip_eps_high=0.0,     # ε_high; 0: clip_eps (symmetric, PPO); DAPO's clip-higher: 0.28
    ratio="token",         # token: π/π_old per token (PPO) | sequence: GSPO's length-normalised sequence ratio
    aggregation="token",   # token: mean over the batch's tokens | sequence: mean of responses' token means (GRPO)
                           # | constant: Σ tokens / (B · max_new_tokens) (Dr. GRPO)
    value_clip=0.2, entropy_coef=0.0,
    tis_cap=0.0,           # > 0: truncated importance sampling of the sampler/trainer mismatch, weights capped here
    whiten_advantages=True,  # normalise the advantages over the batch's tokens
    normalize_score=True,  # standardise reward-model scores with the reward run's last eval mean and std
    unfinished_penalty=1.0,  # subtracted from the score of a response that never stopped
    overlong="none",       # none | filter (no loss on responses that did not stop) | penalty (DAPO's soft one)
    overlong_cache=0,      # the penalty's ramp: the last overlong_cache tokens of max_new_tokens, down to −1
    dynamic_sampling=False,  # DAPO: drop groups whose scores are all equal, sample more prompts to refill
    max_sampling_rounds=4,   # rounds of sampling an iteration may take to fill its batch
    value_lr=0.0,          # the value model's peak lr; 0: optim.lr
    ptx_coef=0.0,          # PPO-ptx: + ptx_coef · the LM loss on pretraining rows at every policy update
    ptx_data="default",    # those rows: a data.train spec ("default": the embedded corpus), packed at data.seq_len
    ptx_batch=8,           # pretraining rows per policy update
    reward_shaping="final",  # final: the whole score at the last token | dense: the part each token earned,
                             # as it is emitted (likelihood reward models; a judge over prefixes)
)

# RL has its own loop (sample, score, update), which `llm-jax train` runs for objective "rl". Named, not
# imported: the loop builds on this module's layer.
LOOP = "llm_jax.rl.loop"


def table_row(metrics: dict, summary: dict) -> str:
    """Before → after the run, from the loop's own evals (`rl.n_eval_prompts`; before = the starting policy)."""
    del summary
    parts = []
    if metrics.get("before_eval_gold_greedy") is not None:
        parts.append(f"gold greedy {before_after(metrics, 'eval_gold_greedy')}, "
                     f"sampled {before_after(metrics, 'eval_gold')}")
    else:
        parts.append(f"reward greedy {before_after(metrics, 'eval_reward_greedy')}, "
                     f"sampled {before_after(metrics, 'eval_reward')}")
    parts.append(f"KL {fmt(metrics.get('after_eval_kl'))} nats")
    if metrics.get("before_eval_score") is not None:
        parts.append(f"reward-model score {before_after(metrics, 'eval_score')}")
    return "; ".join(parts)
