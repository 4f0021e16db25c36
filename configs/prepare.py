r"""Data preparation: raw documents to cleaned, deduplicated and tokenized shards
(llm_jax/data/prepare/prepare_stage.py).

    llm-jax prepare --config configs/prepare.py:default --workdir runs/data
    llm-jax prepare --config configs/prepare.py:default,processes=8 --workdir runs/web \
        --config.input.spec='raw/*.jsonl.gz' --config.output.tokenizer=runs/tok/tokenizer.model \
        --config.blocklist.words="('casino', 'viagra')" --config.heuristics.quality.min_chars=200

Presets:
    default  the embedded default corpus through every step with the blocks' published thresholds (Gopher's
             quality and repetition rules, FineWeb's terminal-punctuation fraction, 128-permutation MinHash at
             Jaccard 0.8); cleaned jsonl only, since no tokenizer is named
    smoke    the test suite's: one process, one host, phone numbers drop their document, a two-word blocklist,
             a 64-permutation MinHash, short reports; the tests point `input.spec` at their own files

Classifier steps (not in the default steps: they need a trained model). Train, then name the models:

    llm-jax classifier --config configs/classifier.py:quality --workdir runs/quality_clf
    llm-jax classifier --config configs/classifier.py:toxicity --workdir runs/toxicity_clf
    llm-jax prepare --config configs/prepare.py:default --workdir runs/data \
        --config.steps="('privacy', 'langid', 'heuristics', 'quality_classifier', 'toxicity_classifier', \
'blocklist', 'exact_dedup', 'minhash_dedup')" \
        --config.quality_classifier.model=runs/quality_clf/classifier.npz \
        --config.toxicity_classifier.model=runs/toxicity_clf/classifier.npz

`quality_classifier` drops a document whose score is below the threshold, `toxicity_classifier` one whose score is
at or above it; `threshold=None` uses the one saved with the model (`--config.toxicity_classifier.threshold=0.8`
sets another). `pooling=max_paragraph` scores a document as its highest-scoring paragraph instead of its mean, for
a signal confined to one paragraph (the classifier's report measures both). prepare.json records each model's
sha256: a rerun with another model refuses the workdir.

Every field of a step's section is a field of that block's config dataclass (llm_jax/data/prepare/*.py), filled
here with its default so that overrides are typed; a rule whose threshold is None is off (override with a number
to switch it on, e.g. `--config.heuristics.quality.min_chars=200`).
"""
import dataclasses

import ml_collections

from llm_jax.config_lib import ConfigError, parse_arg
from llm_jax.data.prepare import dedup, heuristics, langid, privacy, steps

PRESETS = ("default", "smoke")
# The language filter before the quality rules: Gopher's English stop-word rule would otherwise drop every other
# language first, and the report would not say which documents were in another language (FineWeb's order too).
STEPS = ("privacy", "langid", "heuristics", "blocklist", "exact_dedup", "minhash_dedup")


def _fields(config) -> dict:
    return dataclasses.asdict(config)


def get_config(arg=None):
    arg = parse_arg(arg, preset="default", processes=1)
    if arg.preset not in PRESETS:
        raise ConfigError(f"unknown prepare preset {arg.preset!r}; known: {list(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.input = ml_collections.ConfigDict(dict(
        spec="default",        # "default" (the embedded corpus), a file, a glob, or a comma list; one shard a file
        format="auto",         # auto (by extension, under .gz / .zst) | text | jsonl | parquet
        text_key="text",       # the document's field in jsonl records and parquet rows
    ))
    c.steps = STEPS
    c.privacy = _fields(privacy.PrivacyConfig())
    c.heuristics = dict(quality=_fields(heuristics.GopherQualityConfig()),
                        repetition=_fields(heuristics.GopherRepetitionConfig()))
    c.langid = _fields(langid.LanguageFilterConfig())
    c.blocklist = _fields(heuristics.BlocklistConfig())
    c.quality_classifier = _fields(steps.ClassifierFilterConfig())    # model: a classifier.npz
    c.toxicity_classifier = _fields(steps.ClassifierFilterConfig())
    c.exact_dedup = ml_collections.ConfigDict()      # no settings: normalised-text hashes (dedup.py)
    c.minhash_dedup = _fields(dedup.MinHashConfig())
    c.output = ml_collections.ConfigDict(dict(
        jsonl=True,            # clean/shard-NNNNN.jsonl
        parquet=False,         # clean/shard-NNNNN.parquet
        tokenizer="",          # a sentencepiece .model: tokens/shard-NNNNN.{tokens,offsets}.npy; empty: none
    ))
    c.processes = arg.processes    # worker processes over input files; the output does not depend on it
    c.host_index = 0
    c.host_count = 0               # 0: jax.process_index() and jax.process_count()
    c.dedup_scope = "run"          # run: across every host's files (hosts wait for each other) | host: its own
    c.dedup_wait_seconds = 86_400.0  # how long a host waits for the others' filtered shards before stopping
    c.on_error = "stop"            # stop | skip (bad records and unreadable files counted and listed)
    c.report = ml_collections.ConfigDict(dict(examples=5, example_chars=300, bins=20))
    if arg.preset == "smoke":
        c.host_count = 1
        c.privacy.phone = "drop"
        c.blocklist.words = ("casino", "viagra")
        c.minhash_dedup.update(num_perm=64, bands=16)
        c.report.update(examples=3, example_chars=120, bins=10)
    return c
