"""RLHF with PPO: the SFT policy against the reward model, under a KL penalty to the SFT reference.

    llm-jax train --config configs/ppo.py:tiny --workdir runs/ppo      # policy runs/sft, reward model runs/rm

`train.steps` counts PPO iterations (sample `ppo.rollout_batch` responses, score them, `ppo.epochs` passes of
minibatch updates); `train.eval_every` evaluates greedy and sampled answers to held-out prompts (the gold
score on the embedded task). The settings and equations are in llm_jax/objectives/ppo.py.
"""
from llm_jax.configs_common import stage_config

_STAGE = {
    # Measured runs and what they show: experiments/rlhf/README.md.
    "tiny": dict(
        ppo=dict(rollout_batch=128, minibatch=32, epochs=4, max_new_tokens=12, kl_coef=0.05, value_from="policy",
                 value_lr=1e-3, n_eval_prompts=256),
        optim=dict(lr=3e-5, schedule="constant", warmup_steps=5, weight_decay=0.0),
        train=dict(steps=40, log_every=1, eval_every=20, checkpoint_every=10)),
    # An imported checkpoint's SFT run against its reward model (configs/pipeline.py:hf).
    "hf": dict(
        ppo=dict(rollout_batch=64, minibatch=16, epochs=2, max_new_tokens=64, kl_coef=0.05, value_from="reward",
                 n_eval_prompts=128),
        data=dict(seq_len=512), optim=dict(lr=1e-6, schedule="constant", warmup_steps=5, weight_decay=0.0),
        train=dict(steps=100, log_every=1, eval_every=50, checkpoint_every=10)),
}


def get_config(arg=None):
    return stage_config(arg, objective="ppo", init_from="runs/sft", stage_sizes=_STAGE)
