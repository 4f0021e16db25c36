r"""A fastText-style document classifier for data preparation's `quality_classifier` and `toxicity_classifier`
steps (llm_jax/data/prepare/classifier_stage.py; the model in llm_jax/data/prepare/classifier.py).

    llm-jax classifier --config configs/classifier.py:quality --workdir runs/quality_clf
    llm-jax classifier --config configs/classifier.py:toxicity --workdir runs/toxicity_clf
    llm-jax classifier --config configs/classifier.py:quality --workdir runs/my_clf \
        --config.positive.spec='good/*.jsonl.gz' --config.negative.spec='junk/*.jsonl.gz' --config.threshold=0.7

and then, to filter with them:

    llm-jax prepare --config configs/prepare.py:default --workdir runs/data \
        --config.steps="('privacy', 'langid', 'heuristics', 'quality_classifier', 'toxicity_classifier', \
'blocklist', 'exact_dedup', 'minhash_dedup')" \
        --config.quality_classifier.model=runs/quality_clf/classifier.npz \
        --config.toxicity_classifier.model=runs/toxicity_clf/classifier.npz

The classifier scores p(positive). `positive` and `negative` are specs as prepare's input reads them (a file, a
glob, or a comma list; text, jsonl or parquet, gzip or zstd; `text_key` names the jsonl field or parquet column).
The presets' defaults, `generated:<kind>`, are synthetic documents built from the embedded default corpus's grammar
(llm_jax/data/prepare/classifier_examples.py), `generated.docs` of each, so that the commands run with no
download: they show the machinery works, not how well it filters the web. For real filtering point `positive` and
`negative` at your own files, e.g. for quality, reference-quality text (Wikipedia, books, pages cited by them) as
positives and a random sample of the crawl as negatives, as GPT-3 and fastText-filtered corpora such as DCLM do.

Presets:
    quality   positives: grammar documents; negatives: word salad, keyword lists, boilerplate and fragments of the
              same lexicon, matched in length (the report gives a length-only baseline's AUC to show it)
    toxicity  positives: grammar documents with invented abusive sentences, some words obfuscated; negatives: clean
              grammar documents; word and character 3-5-gram features. The mean of embeddings dilutes one abusive
              sentence by the document's length: the report's by-length table shows recall falling from short to
              long documents (about 1.0 under 30 words, 0.7 over 120 on the default data); scored as their
              highest-scoring paragraph (prepare's pooling=max_paragraph, also in the report) they keep it near 1.0
    smoke     the test suite's: a quality classifier on few documents, small buckets and dimension

Every document whose text hashes into the lowest `holdout_fraction` is held out (classifier_stage.py), and the
report gives precision, recall, F1 and accuracy at `threshold`, ROC AUC, and a precision/recall table on them.
`threshold` is saved with the model and is what prepare's steps use unless their own `threshold` is set.
"""
import dataclasses

import ml_collections

from llm_jax.config_lib import ConfigError, parse_arg
from llm_jax.data.prepare.classifier_features import FeatureConfig
from llm_jax.data.prepare.classifier_train import TrainConfig

PRESETS = ("quality", "toxicity", "smoke")


def get_config(arg=None):
    arg = parse_arg(arg, preset="quality")
    if arg.preset not in PRESETS:
        raise ConfigError(f"unknown classifier preset {arg.preset!r}; known: {list(PRESETS)}")
    task = "toxicity" if arg.preset == "toxicity" else "quality"
    c = ml_collections.ConfigDict()
    c.positive = ml_collections.ConfigDict(dict(spec=f"generated:{task}-positive", format="auto", text_key="text"))
    c.negative = ml_collections.ConfigDict(dict(spec=f"generated:{task}-negative", format="auto", text_key="text"))
    c.generated = ml_collections.ConfigDict(dict(docs=3000, seed=0))   # for `generated:` specs only
    c.on_error = "stop"             # stop | skip (bad records counted in the report)
    c.features = dataclasses.asdict(FeatureConfig())
    c.train = dataclasses.asdict(TrainConfig())
    c.holdout_fraction = 0.1
    c.threshold = 0.5
    c.report = ml_collections.ConfigDict(dict(examples=5, example_chars=300))
    if arg.preset == "toxicity":
        c.features.update(char_ngram_min=3, char_ngram_max=5)
    if arg.preset == "smoke":
        c.generated.docs = 300
        c.features.update(buckets=1 << 12)
        c.train.update(dim=8, epochs=4, batch_size=32, learning_rate=0.05)
        c.holdout_fraction = 0.2
        c.report.update(examples=2, example_chars=120)
    return c
