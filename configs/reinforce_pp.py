"""REINFORCE++ (Hu 2025): no critic; each token's advantage is the return-to-go of the score less the per-token
KL penalty, normalised over the whole batch (global, not per group), under PPO's clipped ratio.

    llm-jax train --config configs/reinforce_pp.py:tiny --workdir runs/reinforce_pp
    llm-jax train --config configs/reinforce_pp.py:size=tiny,task=arithmetic --workdir runs/rpp_arith

The fields are the `rl` section's (llm_jax/objectives/rl.py). Arguments: `size`, `task`, `steps`, `seed`,
`init_from`.
"""
from llm_jax.configs_common import rl_stage_config

_STAGE = {
    "tiny": dict(
        rl=dict(estimator="reinforce_pp", samples_per_prompt=1, rollout_batch=128, minibatch=32, epochs=2,
                max_new_tokens=12, kl_coef=0.05, kl_estimator="k1", whiten_advantages=False, n_eval_prompts=256),
        optim=dict(lr=3e-5, schedule="constant", warmup_steps=5, weight_decay=0.0),
        train=dict(steps=40, log_every=1, eval_every=20, checkpoint_every=10)),
    "hf": dict(
        rl=dict(estimator="reinforce_pp", rollout_batch=64, minibatch=16, epochs=1, max_new_tokens=64, kl_coef=0.05,
                kl_estimator="k1", whiten_advantages=False, n_eval_prompts=128),
        data=dict(seq_len=512), optim=dict(lr=1e-6, schedule="constant", warmup_steps=5, weight_decay=0.0),
        train=dict(steps=100, log_every=1, eval_every=50, checkpoint_every=10)),
}


def get_config(arg=None):
    return rl_stage_config(arg, stage_sizes=_STAGE)
