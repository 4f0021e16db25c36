r"""A sentencepiece tokenizer trained on a corpus (the embedded default corpus unless `data.train` says).

    llm-jax tokenizer --config configs/tokenizer.py:default --workdir runs/tok
    llm-jax tokenizer --config configs/tokenizer.py:vocab=8192 --workdir runs/tok8k --config.data.train='data/*.jsonl'

A pretraining run uses it with `--config.tokenizer.path=runs/tok/tokenizer.model`; without one, a run trains
its own with the same settings.
"""
from llm_jax.config_lib import parse_arg
from llm_jax.configs_common import base_config


def get_config(arg=None):
    arg = parse_arg(arg, preset="default", vocab=2048, model_type="unigram")
    if arg.preset != "default":
        raise ValueError(f"unknown tokenizer preset {arg.preset!r}; known: ['default']")
    config = base_config()
    config.tokenizer.vocab_size = arg.vocab
    config.tokenizer.model_type = arg.model_type
    return config
