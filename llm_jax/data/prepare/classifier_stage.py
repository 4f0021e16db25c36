r"""The classifier command: train a fastText-style binary classifier on positive and negative example documents,
measure it on a held-out split, and save it for data preparation's classifier steps.

    llm-jax classifier --config configs/classifier.py:quality --workdir runs/quality_clf

1. read     the `positive` and `negative` specs (llm_jax/data/prepare/inputs.py: text, jsonl, parquet, gzip,
            zstd), or generate them (`generated:<kind>`, llm_jax/data/prepare/classifier_examples.py)
2. split    a document is held out when the first 8 bytes of blake2b(text) fall in the lowest `holdout_fraction`
            of their range: the split is the same whatever the seed, and copies of one text land on one side, so
            duplicates never leak from training into the held-out set
3. train    hashed n-gram features (classifier_features.py), JAX/optax training (classifier_train.py)
4. measure  the saved model's NumPy scores (the code prepare runs) on the held-out documents: precision, recall,
            F1, accuracy at `threshold`, ROC AUC, a precision/recall table, the same rates in four groups by
            document length, and the AUC of document length alone as a baseline (a classifier that only learnt
            length would not beat it)
5. write    <workdir>/classifier.npz (classifier.py), classifier.json (settings, metrics, training data: per class
            the spec, documents, characters and the sha256 of the texts in order) and report.md (metrics, the
            precision/recall table, the words whose buckets score highest and lowest, misclassified held-out
            documents)

The same config gives the same files, byte for byte. A bad config is a ConfigError; examples that cannot be read,
or a class with no document (or none on one side of the split), a DataError naming the spec.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import sys
import time

import numpy as np

from llm_jax.config_lib import ConfigError
from llm_jax.data.prepare import classifier_examples, classifier_metrics, inputs
from llm_jax.data.prepare.classifier import load_classifier, save_classifier, sigmoid
from llm_jax.data.prepare.classifier_features import FeatureConfig, feature_ids, token_hash, tokenize
from llm_jax.data.prepare.classifier_train import TrainConfig, train_classifier
from llm_jax.data.prepare.steps import dataclass_from_section
from llm_jax.data.sources import FORMATS, DataError
from llm_jax.files import write_json_atomic, write_text_atomic

MODEL_FILE, INFO_FILE, REPORT_FILE = "classifier.npz", "classifier.json", "report.md"
CLASSES = ("positive", "negative")
TOP_WORDS, MIN_WORD_COUNT = 12, 5


@dataclasses.dataclass(frozen=True)
class Examples:
    """One class's documents as read, with where each came from and what identifies the set."""
    wheres: list[str]
    texts: list[str]
    identity: dict
    errors: list[str]


def _log(text: str) -> None:
    print(f"classifier: {text}", file=sys.stderr, flush=True)


def _check_config(config) -> tuple[FeatureConfig, TrainConfig, float, float]:
    features = dataclass_from_section(FeatureConfig, config.features.to_dict(), "features")
    train = dataclass_from_section(TrainConfig, config.train.to_dict(), "train")
    for name in CLASSES:
        section = config[name]
        if not isinstance(section.spec, str) or not section.spec.strip():
            raise ConfigError(f"config.{name}.spec must name example documents, got {section.spec!r}")
        if section.format not in FORMATS:
            raise ConfigError(f"config.{name}.format must be one of {FORMATS}, got {section.format!r}")
    if config.on_error not in inputs.ON_ERROR:
        raise ConfigError(f"config.on_error must be one of {inputs.ON_ERROR}, got {config.on_error!r}")
    holdout, threshold = config.holdout_fraction, config.threshold
    if not isinstance(holdout, float) or not 0.0 < holdout < 1.0:
        raise ConfigError(f"config.holdout_fraction must be in (0, 1), got {holdout!r}")
    if not isinstance(threshold, float) or not 0.0 < threshold < 1.0:
        raise ConfigError(f"config.threshold must be in (0, 1), got {threshold!r}")
    if not isinstance(config.generated.docs, int) or config.generated.docs < 1:
        raise ConfigError(f"config.generated.docs must be an int >= 1, got {config.generated.docs!r}")
    return features, train, holdout, threshold


def read_examples(config, name: str) -> Examples:
    """The documents of `config.<name>` (module docstring, step 1)."""
    section = config[name]
    spec = section.spec.strip()
    errors: list[DataError] = []
    if spec.startswith(classifier_examples.PREFIX):
        kind = spec[len(classifier_examples.PREFIX):]
        if kind not in classifier_examples.KINDS:
            raise ConfigError(f"config.{name}.spec={spec!r}: no such generated kind; known: "
                              f"{[classifier_examples.PREFIX + k for k in classifier_examples.KINDS]}")
        texts = classifier_examples.generate(kind, config.generated.docs, config.generated.seed)
        wheres = [f"{spec} #{i}" for i in range(len(texts))]
    else:
        wheres, texts = [], []
        for file in inputs.list_input_files(spec, section.format, section.text_key):
            for where, text in inputs.iter_input_documents(file, config.on_error, errors):
                wheres.append(where)
                texts.append(text)
    if not texts:
        raise DataError(f"config.{name}.spec={spec!r} holds no documents (every record blank or unreadable)")
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    identity = dict(spec=spec, docs=len(texts), chars=sum(map(len, texts)), texts_sha256=digest.hexdigest())
    if spec.startswith(classifier_examples.PREFIX):
        identity["generated"] = config.generated.to_dict()
    return Examples(wheres, texts, identity, [str(e) for e in errors])


def heldout_mask(texts: list[str], fraction: float) -> np.ndarray:
    """True for the documents held out (module docstring, step 2)."""
    cut = int(fraction * 2 ** 64)
    return np.array([int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8, person=b"llmjax-holdout")
                                    .digest(), "little") < cut for t in texts], bool)


def _bucket_words(texts: list[str], classifier) -> dict[str, list]:
    """The training words (seen MIN_WORD_COUNT times or more) whose unigram buckets score highest and lowest."""
    counts = collections.Counter(t for text in texts for t in tokenize(text, classifier.features))
    words = sorted(w for w, n in counts.items() if n >= MIN_WORD_COUNT)
    if not words:
        return dict(positive=[], negative=[])
    s = classifier.bucket_scores[np.array([token_hash(w) % classifier.features.buckets for w in words])]
    order = np.argsort(-s, kind="stable")
    pick = lambda idx: [[words[i], round(float(s[i]), 4)] for i in idx]   # noqa: E731
    return dict(positive=pick(order[:TOP_WORDS]), negative=pick(order[::-1][:TOP_WORDS]))


def _misclassified(wheres, texts, labels, scores, threshold, examples, chars) -> dict:
    wrong = {"false_positives": [], "false_negatives": []}
    for where, text, label, score in zip(wheres, texts, labels, scores):
        kind = "false_negatives" if label else "false_positives"
        if (score >= threshold) != bool(label) and len(wrong[kind]) < examples:
            wrong[kind].append(dict(where=where, score=round(float(score), 4), text=text[:chars]))
    return wrong


def measure(classifier, held_texts: list[str], held_labels: np.ndarray, train_ids: list[np.ndarray],
            train_labels: np.ndarray, threshold: float) -> tuple[dict, np.ndarray, float]:
    """Held-out metrics (module docstring, step 4) with the training accuracy; returns them, the held-out scores and
    the seconds NumPy scoring took (features included)."""
    start = time.perf_counter()
    held_scores = classifier.scores(held_texts)
    score_seconds = time.perf_counter() - start
    words = [len(t.split()) for t in held_texts]
    metrics = classifier_metrics.evaluate(held_scores, held_labels, threshold)
    metrics["length_baseline_roc_auc"] = classifier_metrics.roc_auc(words, held_labels)
    metrics["by_length"] = classifier_metrics.by_length(held_scores, held_labels, words, threshold)
    train_scores = sigmoid(classifier.logits_of_ids(train_ids))
    metrics["training_accuracy"] = classifier_metrics.at_threshold(train_scores, train_labels, threshold)["accuracy"]
    # The same held-out documents scored as their highest-scoring paragraph (prepare's pooling="max_paragraph").
    paragraph_scores = classifier.max_paragraph_scores(held_texts)
    metrics["max_paragraph"] = dict(classifier_metrics.evaluate(paragraph_scores, held_labels, threshold),
                                    by_length=classifier_metrics.by_length(paragraph_scores, held_labels, words,
                                                                           threshold))
    return metrics, held_scores, score_seconds


def run_classifier(config, workdir: str) -> dict:
    """Trains, measures and saves a classifier (module docstring); returns a one-line summary."""
    start = time.perf_counter()
    features, train_config, holdout_fraction, threshold = _check_config(config)
    examples = {name: read_examples(config, name) for name in CLASSES}
    wheres = examples["positive"].wheres + examples["negative"].wheres
    texts = examples["positive"].texts + examples["negative"].texts
    labels = np.r_[np.ones(len(examples["positive"].texts)), np.zeros(len(examples["negative"].texts))]
    heldout = heldout_mask(texts, holdout_fraction)
    for name, label in zip(CLASSES, (1, 0)):
        for side, mask in (("training", ~heldout), ("held-out", heldout)):
            if not np.any(mask & (labels == label)):
                raise DataError(f"config.{name}.spec={examples[name].identity['spec']!r}: no {name} document falls "
                                f"in the {side} split ({examples[name].identity['docs']} documents, "
                                f"holdout_fraction={holdout_fraction}); give more documents")
    _log(f"{int(labels.sum())} positive, {int(len(labels) - labels.sum())} negative documents; "
         f"{int(heldout.sum())} held out")
    ids = [feature_ids(t, features) for t in texts]
    train_idx, held_idx = np.flatnonzero(~heldout), np.flatnonzero(heldout)
    params, epoch_losses, train_seconds = train_classifier([ids[i] for i in train_idx], labels[train_idx],
                                                           features.buckets, train_config, log=_log)
    os.makedirs(workdir, exist_ok=True)
    model_path = os.path.join(workdir, MODEL_FILE)
    sha256 = save_classifier(model_path, params, features, threshold)
    classifier = load_classifier(model_path)
    held_texts = [texts[i] for i in held_idx]
    metrics, held_scores, score_seconds = measure(classifier, held_texts, labels[held_idx],
                                                  [ids[i] for i in train_idx], labels[train_idx], threshold)
    info = dict(model=MODEL_FILE, model_sha256=sha256, threshold=threshold, features=features.to_json(),
                train=dataclasses.asdict(train_config), holdout_fraction=holdout_fraction,
                data={name: dict(e.identity, input_errors=len(e.errors)) for name, e in examples.items()},
                split=dict(training=int(len(train_idx)), heldout=int(len(held_idx))),
                epoch_losses=[round(x, 6) for x in epoch_losses], heldout=metrics,
                words=_bucket_words([texts[i] for i in train_idx], classifier),
                misclassified=_misclassified([wheres[i] for i in held_idx], held_texts, labels[held_idx],
                                             held_scores, threshold, config.report.examples,
                                             config.report.example_chars),
                input_errors=[e for ex in examples.values() for e in ex.errors][:100])
    write_json_atomic(os.path.join(workdir, INFO_FILE), info)
    write_text_atomic(os.path.join(workdir, REPORT_FILE), to_markdown(info))
    m = metrics
    _log(f"held out: precision {m['precision']:.4f} recall {m['recall']:.4f} F1 {m['f1']:.4f} ROC AUC "
         f"{m['roc_auc']:.4f} at threshold {threshold}")
    return dict(workdir=os.path.abspath(workdir), model=os.path.abspath(model_path), sha256=sha256,
                train_docs=int(len(train_idx)), heldout_docs=int(len(held_idx)), threshold=threshold,
                precision=round(m["precision"], 4), recall=round(m["recall"], 4), f1=round(m["f1"], 4),
                max_paragraph_precision=round(m["max_paragraph"]["precision"], 4),
                max_paragraph_recall=round(m["max_paragraph"]["recall"], 4),
                roc_auc=round(m["roc_auc"], 4), train_seconds=round(train_seconds, 2),
                score_docs_per_second=round(len(held_idx) / max(score_seconds, 1e-9)),
                seconds=round(time.perf_counter() - start, 2))


def _rate_row(r: dict) -> str:
    return (f"| {r['threshold']:g} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['accuracy']:.4f} "
            f"| {r['tp']} | {r['fp']} | {r['fn']} | {r['tn']} |")


def _by_length_table(rows: list[dict], title: str) -> list[str]:
    return (["", title, "", "| words | documents | precision | recall | F1 | accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
            + [f"| {r['min_words']}-{r['max_words']} | {r['docs']} | {r['precision']:.4f} | {r['recall']:.4f} | "
               f"{r['f1']:.4f} | {r['accuracy']:.4f} |" for r in rows])


def to_markdown(info: dict) -> str:
    m, data = info["heldout"], info["data"]
    lines = ["# Classifier report", "",
             f"Positives: {data['positive']['docs']:,} documents from `{data['positive']['spec']}`; negatives: "
             f"{data['negative']['docs']:,} from `{data['negative']['spec']}`; {info['split']['training']:,} trained "
             f"on, {info['split']['heldout']:,} held out.",
             f"Model: `{info['model']}` (sha256 {info['model_sha256'][:16]}…), {info['features']['buckets']:,} "
             f"buckets × dim {info['train']['dim']}, word 1-{info['features']['word_ngrams']}-grams"
             + (f", char {info['features']['char_ngram_min']}-{info['features']['char_ngram_max']}-grams"
                if info["features"]["char_ngram_max"] else "") + ".",
             f"Loss per epoch: {', '.join(f'{x:.4f}' for x in info['epoch_losses'])}; training accuracy "
             f"{m['training_accuracy']:.4f}.", "",
             "## Held out", "",
             f"At threshold {info['threshold']:g}: precision {m['precision']:.4f}, recall {m['recall']:.4f}, "
             f"F1 {m['f1']:.4f}, accuracy {m['accuracy']:.4f} ({m['positives']} positives, {m['negatives']} "
             f"negatives). ROC AUC {m['roc_auc']:.4f}; document length alone: {m['length_baseline_roc_auc']:.4f}.",
             "", "| threshold | precision | recall | F1 | accuracy | TP | FP | FN | TN |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_rate_row(r) for r in m["pr_table"]]
    lines += _by_length_table(m["by_length"], f"By document length (held out, at threshold {info['threshold']:g}):")
    p = m["max_paragraph"]
    lines += ["", "## Held out, each document scored as its highest-scoring paragraph", "",
              "Prepare's `pooling=max_paragraph`: a signal in one paragraph is not averaged away by the rest of the "
              f"document. At threshold {info['threshold']:g}: precision {p['precision']:.4f}, recall "
              f"{p['recall']:.4f}, F1 {p['f1']:.4f}, accuracy {p['accuracy']:.4f}; ROC AUC {p['roc_auc']:.4f}. "
              "A document has as many chances to score high as it has paragraphs, so this pooling usually wants a "
              "higher threshold:", "", "| threshold | precision | recall | F1 | accuracy | TP | FP | FN | TN |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_rate_row(r) for r in p["pr_table"]]
    lines += _by_length_table(p["by_length"], "By document length:")
    lines += ["", "## Words whose buckets score highest and lowest", "",
              "A bucket's score s = E·w is shared by every n-gram that hashes there.", "",
              "- toward positive: " + ", ".join(f"`{w}` {s:+.3f}" for w, s in info["words"]["positive"]),
              "- toward negative: " + ", ".join(f"`{w}` {s:+.3f}" for w, s in info["words"]["negative"])]
    for kind, title in (("false_positives", "False positives"), ("false_negatives", "False negatives")):
        lines += ["", f"## {title} (held out, first {len(info['misclassified'][kind])})", ""]
        lines += [f"- `{e['where']}` (score {e['score']:.4f}): {' '.join(e['text'].split())}"
                  for e in info["misclassified"][kind]] or ["None."]
    if info["input_errors"]:
        lines += ["", "## Input errors", ""] + [f"- {e}" for e in info["input_errors"]]
    return "\n".join(lines) + "\n"

