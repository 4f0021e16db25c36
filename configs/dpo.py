"""DPO from an SFT run against itself as the frozen reference (`llm_jax/objectives/dpo.py`).

    llm-jax train --config configs/dpo.py:tiny --workdir runs/dpo      # from runs/sft, on the embedded task
    ... --config.dpo.loss=ipo    --config.dpo.label_smoothing=0.1   --config.dpo.beta=0.3
    llm-jax train --config configs/dpo.py:hf --workdir runs/qwen-dpo --config.train.init_from=runs/qwen-sft \
        --config.data.train=my_pairs.jsonl                                  # an imported checkpoint's SFT run

The reference's log-probs of every pair are computed once before training and cached in the run's data dir.
"""
from llm_jax.configs_common import stage_config

_STAGE = {
    # The chosen answer's NLL (Llama 3's 0.2): at data version 1 the tiny model's greedy gold score fell from 0.877 to
    # 0.794 without it as both answers' log-probs fell; with it 0.880 (experiments/post_training/README.md).
    "tiny": dict(dpo=dict(nll_coef=0.2), data=dict(seq_len=64, batch_size=32), optim=dict(lr=2e-4, warmup_steps=20, weight_decay=0.0),
                 train=dict(steps=200, log_every=10, eval_every=100, checkpoint_every=100, eval_batches=8)),
    # From an SFT run of an imported checkpoint: --config.train.init_from=runs/qwen-sft
    "hf": dict(dpo=dict(beta=0.1), data=dict(seq_len=512, batch_size=8), optim=dict(lr=5e-7, warmup_steps=10, weight_decay=0.0),
               train=dict(steps=200, log_every=10, eval_every=100, checkpoint_every=100, eval_batches=8)),
}


def get_config(arg=None):
    return stage_config(arg, objective="dpo", init_from="runs/sft", stage_sizes=_STAGE)
