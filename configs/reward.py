"""Reward model from an SFT run: Bradley–Terry on preference pairs (`llm_jax/objectives/reward.py`).

    llm-jax train --config configs/reward.py:tiny --workdir runs/rm      # from runs/sft, on the embedded task

The trunk starts from the SFT params and a zero scalar head is added. `data.train` names preference records
(`{"prompt", "chosen", "rejected"[, "edited"]}` or `{"prompt", "responses", "ranking"}`, jsonl/parquet;
llm_jax/data/records.py) or `default_task`; the loss covers every ordered pair of each record.
`--config.reward.layout=packed` puts a prompt and up to `reward.responses_per_row` of its answers in one row
(llm_jax/data/preference_rows.py; raise `data.seq_len` to hold them).
"""
from llm_jax.configs_common import stage_config

_STAGE = {
    # The likelihood readout: a scalar head alone judges this trunk's answers by their length (reward.py).
    "tiny": dict(reward=dict(readout="likelihood"), data=dict(seq_len=64, batch_size=32), optim=dict(lr=5e-4, warmup_steps=20, weight_decay=0.0),
                 train=dict(steps=300, log_every=10, eval_every=100, checkpoint_every=100, eval_batches=8)),
    # From an SFT run of an imported checkpoint (configs/pipeline.py:hf): a scalar head on the last token's state.
    "hf": dict(reward=dict(readout="last"), data=dict(seq_len=512, batch_size=8),
               optim=dict(lr=1e-5, warmup_steps=10, weight_decay=0.0),
               train=dict(steps=200, log_every=10, eval_every=100, checkpoint_every=100, eval_batches=8)),
}


def get_config(arg=None):
    return stage_config(arg, objective="reward", init_from="runs/sft", stage_sizes=_STAGE)
