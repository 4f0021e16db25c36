"""The tokenizer stage: train a sentencepiece model on a config's corpus, or hand a run its tokenizer.

    llm-jax tokenizer --config configs/tokenizer.py:default --workdir runs/tok

Every run directory keeps the tokenizer it was trained with as `<workdir>/tokenizer.model` (sentencepiece), or
`<workdir>/tokenizer/` (a Hugging Face tokenizer: an imported checkpoint's, or one `tokenizer.path` names), so a
later stage that starts from the run (`train.init_from`) inherits it and the whole lineage shares one vocabulary.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import sys

from llm_jax.data import hf_tokenizer
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.data.tokenizer_files import load_tokenizer, run_tokenizer_path
from llm_jax.data.mixture import training_spec
from llm_jax.data.sources import iter_documents


class TokenizerMismatch(ValueError):
    """A run directory whose tokenizer differs from the one the config names."""


def prepare_tokenizer(config, workdir: str, vocab_size: int | None = None, fresh: bool = False):
    """The run's tokenizer, kept as `<workdir>/tokenizer.model` or `<workdir>/tokenizer/`: copied from
    `tokenizer.path`, inherited from `train.init_from`, reused from an earlier attempt of this run, or trained on
    the training corpus.

    A named tokenizer is checked against the model's `vocab_size` before anything is copied, so a wrong path
    leaves the workdir as it was. With `fresh` (the workdir holds no checkpoint: nothing was trained with the
    copy there), a copy left by an earlier attempt with another tokenizer is replaced; otherwise it is refused."""
    source = config.tokenizer.path or (run_tokenizer_path(config.train.init_from) if config.train.init_from else "")
    if source:
        if not os.path.exists(source):
            raise FileNotFoundError(f"tokenizer {source!r} does not exist")
        tokenizer = load_tokenizer(source)
        if vocab_size is not None:
            tokenizer_lib.check_vocab(tokenizer, vocab_size)
        try:  # either kind keeps an earlier copy of the same bytes and refuses another tokenizer
            return load_tokenizer(tokenizer.save(workdir))
        except FileExistsError as e:
            if not fresh:
                raise TokenizerMismatch(f"{e} (the configured {source}): use a new --workdir") from e
            print(f"{workdir} held another tokenizer from an earlier attempt that saved no checkpoint: "
                     f"replacing it with {source}", file=sys.stderr)
            _remove_copies(workdir)
            return load_tokenizer(tokenizer.save(workdir))
    target = os.path.join(workdir, "tokenizer.model")
    if os.path.exists(target):
        tokenizer = tokenizer_lib.Tokenizer.load(target)
    else:
        tokenizer = train_tokenizer(config, target)
    if vocab_size is not None:
        tokenizer_lib.check_vocab(tokenizer, vocab_size)
    return tokenizer


def _remove_copies(workdir: str) -> None:
    path = os.path.join(workdir, tokenizer_lib.RUN_FILE)
    if os.path.isfile(path):
        os.remove(path)
    directory = os.path.join(workdir, hf_tokenizer.RUN_DIR)
    if os.path.isdir(directory):
        shutil.rmtree(directory)


def train_tokenizer(config, target: str) -> tokenizer_lib.Tokenizer:
    c = config.tokenizer
    texts = iter_documents(training_spec(config.data), config.data.format, config.data.text_key)
    return tokenizer_lib.train_tokenizer(texts, target, vocab_size=c.vocab_size, model_type=c.model_type,
                                         character_coverage=c.character_coverage,
                                         max_sentence_chars=c.max_sentence_chars, seed=config.seed)


def run_tokenizer(config, workdir: str) -> dict:
    """Trains (or reuses) `<workdir>/tokenizer.model` and reports its compression on the first documents."""
    os.makedirs(workdir, exist_ok=True)
    tokenizer = prepare_tokenizer(config, workdir)
    spec = training_spec(config.data)
    sample = list(itertools.islice(iter_documents(spec, config.data.format, config.data.text_key), 500))
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(sample))
    n_chars = sum(len(text) for text in sample)
    report = dict(path=tokenizer.path, vocab_size=tokenizer.vocab_size, sha256=tokenizer.sha256,
                  chars_per_token=round(n_chars / max(n_tokens, 1), 4), sample_documents=len(sample))
    with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report
