"""Supervised fine-tuning: next-token cross entropy on assistant tokens only, over packed conversations.

The loss, the steps and the metrics are the language model's (`lm.py`); only the data differs: chat-rendered
conversations whose loss mask is 1 on assistant content and the end marker closing each assistant turn
(`data/post_training.py`, `data/chat.py`). Start from a pretraining run with `train.init_from`.
"""
from __future__ import annotations

from llm_jax.data.post_training import build_sft_data
from llm_jax.objectives import fmt, gold_text
from llm_jax.objectives.lm import abstract_batch, finish_eval, make_eval_step, make_train_step

__all__ = ["abstract_batch", "build_data", "finish_eval", "make_eval_step", "make_train_step", "table_row"]


def build_data(config, tokenizer, workdir: str):
    return build_sft_data(config, tokenizer, workdir)


def table_row(metrics: dict, summary: dict) -> str:
    del summary
    return f"answer-token eval loss {fmt(metrics.get('eval_loss'))}; {gold_text(metrics)}"
