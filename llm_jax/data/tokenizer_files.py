"""Which tokenizer a path holds: a sentencepiece model, a Hugging Face tokenizer directory, or a run's tokenizer.

    load_tokenizer("runs/tok/tokenizer.model")   sentencepiece `Tokenizer`
    load_tokenizer("checkpoints/Qwen3-0.6B")     `HFTokenizer` (a directory with tokenizer.json)
    load_tokenizer("runs/sft")                   the run's own: <run>/tokenizer/ (Hugging Face) or
                                                 <run>/tokenizer.model (sentencepiece), see run_tokenizer_path

A run directory also holds the tokenizer stage's report as tokenizer.json (not a Hugging Face file) and a
config.json, so a directory counts as a Hugging Face tokenizer when it has tokenizer_config.json or no
tokenizer.model; one with tokenizer.model and no tokenizer_config.json is read as a run.
(This module is not named tokenizers.py: that would shadow the `tokenizers` package for readers of this folder.)
"""
from __future__ import annotations

import os
from typing import Union

from llm_jax.data import hf_tokenizer
from llm_jax.data.tokenizer import RUN_FILE, Tokenizer

AnyTokenizer = Union[Tokenizer, hf_tokenizer.HFTokenizer]


def run_tokenizer_path(run_dir: str) -> str:
    """Where a run keeps its tokenizer: `<run>/tokenizer/` for a Hugging Face one, else `<run>/tokenizer.model`
    (named even when missing, so the error that follows names the file the run lacks)."""
    directory = os.path.join(run_dir, hf_tokenizer.RUN_DIR)
    return directory if os.path.isdir(directory) else os.path.join(run_dir, RUN_FILE)


def load_tokenizer(path: str) -> AnyTokenizer:
    """The tokenizer at `path` (module docstring); FileNotFoundError naming the path when there is none."""
    if os.path.basename(path) == "tokenizer.json" and os.path.isfile(path):
        return hf_tokenizer.HFTokenizer.load(os.path.dirname(path) or ".")
    if os.path.isfile(path) or path.endswith(".model"):  # a missing .model: sentencepiece's own error names it
        return Tokenizer.load(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer {path!r} does not exist (expected a sentencepiece .model file, a "
                                f"Hugging Face tokenizer directory or a run directory)")
    if os.path.isdir(os.path.join(path, hf_tokenizer.RUN_DIR)):
        return hf_tokenizer.HFTokenizer.load(os.path.join(path, hf_tokenizer.RUN_DIR))
    model = os.path.join(path, RUN_FILE)
    if os.path.isfile(model) and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        return Tokenizer.load(model)
    return hf_tokenizer.HFTokenizer.load(path)
