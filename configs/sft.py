"""Supervised fine-tuning from a pretraining run (loss on assistant tokens only).

    llm-jax train --config configs/sft.py:tiny --workdir runs/sft      # from runs/pre, on the embedded task
    llm-jax train --config configs/sft.py:size=1b,init_from=gs://b/runs/pre --config.data.train=sft.jsonl ...
    llm-jax train --config configs/sft.py:hf --workdir runs/qwen-sft --config.train.init_from=runs/qwen \
        --config.data.train=my_chats.jsonl [--config.model.lora_rank=16]   # an imported checkpoint (import-hf)

The `hf` preset takes the whole model section from the run it starts from (`model.from_init`): any family an
imported checkpoint holds, its tokenizer and its own chat template (`data.chat_template="hf"`). Otherwise the model
section is the pretraining config's of the same size (the params must fit), so the lineage is one
config family. Data: `data.train` names SFT records (jsonl/parquet, `llm_jax/data/records.py`) or
`default_task`, the embedded task whose answers `default_task.gold_score` grades.
"""
from llm_jax.configs_common import stage_config

_STAGE = {  # size: data/optim/train settings of this stage
    "tiny": dict(data=dict(seq_len=64, batch_size=32), optim=dict(lr=3e-3, warmup_steps=20, min_lr_ratio=0.1),
                 train=dict(steps=1800, log_every=10, eval_every=600, checkpoint_every=600, eval_batches=8)),
    # A checkpoint imported with `llm-jax import-hf`: --config.train.init_from=runs/qwen; LoRA: model.lora_rank=16.
    "hf": dict(data=dict(seq_len=512, batch_size=8), optim=dict(lr=2e-5, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0),
               train=dict(steps=200, log_every=10, eval_every=100, checkpoint_every=100, eval_batches=8)),
}


def get_config(arg=None):
    return stage_config(arg, objective="sft", init_from="runs/pre", stage_sizes=_STAGE)
