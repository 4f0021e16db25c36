"""RLHF with PPO: the SFT policy against the reward model under a KL penalty to the SFT reference; GAE with a
value model (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

    llm-jax train --config configs/ppo.py:tiny --workdir runs/ppo      # policy runs/sft, reward model runs/rm
    llm-jax train --config configs/ppo.py:size=tiny,task=arithmetic --workdir runs/ppo_arith   # verifiable

`train.steps` counts iterations (sample `rl.rollout_batch` responses, score them, `rl.epochs` passes of minibatch
updates); `train.eval_every` evaluates greedy and sampled answers to held-out prompts. The fields are the `rl`
section's (llm_jax/objectives/rl.py); the loop is llm_jax/rl/loop.py. Arguments: `size` (tiny | hf), `task`
(default | arithmetic: configs_common.RL_TASKS), `steps`, `seed`, `init_from`.
"""
from llm_jax.configs_common import rl_stage_config

_STAGE = {
    # Measured runs and what they show: experiments/rlhf/README.md.
    "tiny": dict(
        rl=dict(estimator="gae", rollout_batch=128, minibatch=32, epochs=4, max_new_tokens=12, kl_coef=0.05,
                value_from="policy", value_lr=1e-3, n_eval_prompts=256),
        optim=dict(lr=3e-5, schedule="constant", warmup_steps=5, weight_decay=0.0),
        train=dict(steps=40, log_every=1, eval_every=20, checkpoint_every=10)),
    # An imported checkpoint's SFT run against its reward model (configs/pipeline.py:hf).
    "hf": dict(
        rl=dict(estimator="gae", rollout_batch=64, minibatch=16, epochs=2, max_new_tokens=64, kl_coef=0.05,
                value_from="reward", n_eval_prompts=128),
        data=dict(seq_len=512), optim=dict(lr=1e-6, schedule="constant", warmup_steps=5, weight_decay=0.0),
        train=dict(steps=100, log_every=1, eval_every=50, checkpoint_every=10)),
}


def get_config(arg=None):
    return rl_stage_config(arg, stage_sizes=_STAGE)
