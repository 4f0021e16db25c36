"""GRPO (Shao et al. 2024, DeepSeekMath): k samples of each prompt, each one's advantage its score's standing in
its group, (s − mean) / std; no value model; a k3 KL term to the reference in the loss. Its successors are
variants of the same preset:

    llm-jax train --config configs/grpo.py:tiny --workdir runs/grpo                     # GRPO
    llm-jax train --config configs/grpo.py:size=tiny,variant=dr_grpo --workdir runs/dr  # Dr. GRPO
    llm-jax train --config configs/grpo.py:size=tiny,variant=dapo --workdir runs/dapo   # DAPO
    llm-jax train --config configs/grpo.py:size=tiny,variant=gspo --workdir runs/gspo   # GSPO
    llm-jax train --config configs/grpo.py:size=tiny,task=arithmetic --workdir runs/g   # verifiable rewards

- dr_grpo (Liu et al. 2025): no division by the group's std, no length normalisation (the loss summed over
  tokens and divided by a constant);
- dapo (Yu et al. 2025): clip-higher (ε_high 0.28), token-level loss, dynamic sampling (groups of equal scores
  dropped and refilled), a soft overlong penalty, no KL term;
- gspo (Zheng et al. 2025): the sequence-level, length-normalised ratio, clipped at its paper's 3e-4 / 4e-4.
The fields are the `rl` section's (llm_jax/objectives/rl.py). Arguments: `size`, `task`, `variant`, `steps`,
`seed`, `init_from`.
"""
from llm_jax.configs_common import rl_stage_config

_STAGE = {
    "tiny": dict(
        rl=dict(estimator="grpo", samples_per_prompt=8, rollout_batch=128, minibatch=32, epochs=2,
                max_new_tokens=12, kl_coef=0.0, kl_loss_coef=0.04, kl_loss_estimator="k3", aggregation="sequence",
                whiten_advantages=False, n_eval_prompts=256),
        optim=dict(lr=3e-5, schedule="constant", warmup_steps=5, weight_decay=0.0),
        train=dict(steps=40, log_every=1, eval_every=20, checkpoint_every=10)),
    "hf": dict(
        rl=dict(estimator="grpo", samples_per_prompt=8, rollout_batch=64, minibatch=16, epochs=1, max_new_tokens=64,
                kl_coef=0.0, kl_loss_coef=0.04, aggregation="sequence", whiten_advantages=False,
                n_eval_prompts=128),
        data=dict(seq_len=512), optim=dict(lr=1e-6, schedule="constant", warmup_steps=5, weight_decay=0.0),
        train=dict(steps=100, log_every=1, eval_every=50, checkpoint_every=10)),
}

VARIANTS = {
    "grpo": {},
    "dr_grpo": dict(rl=dict(estimator="dr_grpo", aggregation="constant")),
    "dapo": dict(rl=dict(clip_eps_high=0.28, aggregation="token", kl_loss_coef=0.0, dynamic_sampling=True,
                         overlong="penalty", overlong_cache=4)),
    "gspo": dict(rl=dict(ratio="sequence", clip_eps=3e-4, clip_eps_high=4e-4)),
}


def get_config(arg=None):
    return rl_stage_config(arg, stage_sizes=_STAGE, variants=VARIANTS)
