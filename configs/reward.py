"""Reward model from an SFT run: Bradley–Terry on preference pairs (`llm_jax/objectives/reward.py`).

    llm-jax train --config configs/reward.py:tiny --workdir runs/rm      # from runs/sft, on the embedded task

The trunk starts from the SFT params and a zero scalar head is added. `data.train` names preference records
(`{"prompt", "chosen", "rejected"}`, jsonl/parquet) or `default_task`.
"""
import os

from llm_jax.config_lib import load_config, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))
_STAGE = {
    "tiny": dict(data=dict(seq_len=64, batch_size=32), optim=dict(lr=5e-4, warmup_steps=20, weight_decay=0.0),
                 train=dict(steps=300, log_every=10, eval_every=100, checkpoint_every=100, eval_batches=8)),
}


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", steps=-1, seed=0, init_from="runs/sft")
    config = load_config(os.path.join(_HERE, f"pretrain.py:size={arg.size},seed={arg.seed}"))
    config.objective = "reward"
    config.train.init_from = arg.init_from
    config.data.update(train="default_task", eval="")
    for section, fields in _STAGE.get(arg.size, {}).items():
        config[section].update(fields)
    if arg.steps > 0:
        config.train.steps = arg.steps
    return config
