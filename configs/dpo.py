"""DPO from an SFT run against itself as the frozen reference (`llm_jax/objectives/dpo.py`).

    llm-jax train --config configs/dpo.py:tiny --workdir runs/dpo      # from runs/sft, on the embedded task
    ... --config.dpo.loss=ipo    --config.dpo.label_smoothing=0.1   --config.dpo.beta=0.3

The reference's log-probs of every pair are computed once before training and cached in the run's data dir.
"""
import os

from llm_jax.config_lib import load_config, parse_arg

_HERE = os.path.dirname(os.path.abspath(__file__))
_STAGE = {
    "tiny": dict(data=dict(seq_len=64, batch_size=32), optim=dict(lr=2e-4, warmup_steps=20, weight_decay=0.0),
                 train=dict(steps=200, log_every=10, eval_every=100, checkpoint_every=100, eval_batches=8)),
}


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", steps=-1, seed=0, init_from="runs/sft")
    config = load_config(os.path.join(_HERE, f"pretrain.py:size={arg.size},seed={arg.seed}"))
    config.objective = "dpo"
    config.train.init_from = arg.init_from
    config.data.update(train="default_task", eval="")
    for section, fields in _STAGE.get(arg.size, {}).items():
        config[section].update(fields)
    if arg.steps > 0:
        config.train.steps = arg.steps
    return config
