"""The fastText-style classifier: hashed features checked by hand, the loss against hand-computed numbers, NumPy
scoring against the JAX forward pass, a planted signal separated on held-out documents while a no-signal control
stays at chance, the saved file (round trip, same bytes for the same training, clear errors for bad files)."""
import dataclasses
import hashlib
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config_lib import load
from llm_jax.data import default_corpus
from llm_jax.data.prepare.classifier_stage import heldout_mask
from llm_jax.data.prepare import classifier, classifier_examples, classifier_metrics, steps
from llm_jax.data.prepare.classifier_features import FeatureConfig, feature_ids, token_hash, tokenize
from llm_jax.data.prepare.classifier_train import (TrainConfig, forward_logits, pad_batch, train_classifier,
                                                   weighted_logistic_loss)

MASK64 = (1 << 64) - 1
FEATURES = FeatureConfig(buckets=1 << 12, word_ngrams=2)
# A few hundred short documents: Adam's epsilon at 1e-3 keeps rare buckets from memorising labels (classifier_train.py)
TRAIN = TrainConfig(dim=8, epochs=6, batch_size=32, learning_rate=0.1, adam_eps=1e-3, seed=3)
SIGNAL = "zorblax"


def _blake(text: str, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, person=person).digest(), "little")


def _splitmix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_features_are_the_documented_hashes():
    config = FeatureConfig(buckets=1000, word_ngrams=2, char_ngram_min=2, char_ngram_max=3)
    assert tokenize("The cat.\nOK", config) == ["the", "cat", ".", "</s>", "ok"]
    tokens = ["the", "cat", "."]
    unigrams = [_blake(t, b"llmjax-word") for t in tokens]
    bigrams = [_splitmix((a * 0x9E3779B97F4A7C15 + b) & MASK64) for a, b in zip(unigrams, unigrams[1:])]
    chars = [_blake(g, b"llmjax-char") for word in ("the", "cat") for n in (2, 3)
             for g in (f"<{word}>"[i:i + n] for i in range(len(word) + 3 - n))]
    expected = [h % 1000 for h in unigrams + bigrams + chars]
    assert feature_ids("The cat.", config).tolist() == expected
    # Pinned: the hash of a token must not change between versions, or saved models score garbage.
    assert token_hash("the") == 15007362455316179925
    assert feature_ids("The cat.", FeatureConfig(buckets=1000)).tolist() == [925, 514, 796, 739, 369]
    assert feature_ids("", config).shape == (0,)
    assert len(tokenize("a b " * 100, FeatureConfig(max_tokens=7))) == 7


def test_loss_and_forward_match_hand_computation():
    logits, labels, weights = jnp.array([0.0, 2.0, -1.0]), jnp.array([1.0, 0.0, 1.0]), jnp.array([1.0, 3.0, 0.0])
    expected = (math.log(2) + 3 * math.log(1 + math.e ** 2)) / 4    # the weight-0 row does not count
    assert float(weighted_logistic_loss(logits, labels, weights)) == pytest.approx(expected, rel=1e-6)
    params = dict(embeddings=jnp.array([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]]), output=jnp.array([1.0, -1.0]),
                  bias=jnp.array(0.5))
    ids = jnp.array([[0, 1, 2], [2, 0, 0]])
    mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # doc 0: mean of rows 0 and 1 = (0.5, 1) → 0.5 − 1 + 0.5 = 0; doc 1: row 2 → 4 − 4 + 0.5 = 0.5
    np.testing.assert_allclose(forward_logits(params, ids, mask), [0.0, 0.5], atol=1e-6)


def test_numpy_scoring_equals_the_jax_forward(tmp_path):
    rng = np.random.default_rng(0)
    params = dict(embeddings=rng.normal(size=(FEATURES.buckets, 8)).astype(np.float32),
                  output=rng.normal(size=8).astype(np.float32), bias=np.float32(-0.3))
    path = str(tmp_path / "classifier.npz")
    classifier.save_classifier(path, params, FEATURES, 0.5)
    model = classifier.load_classifier(path)
    texts = [t for t, _ in default_corpus.generate_documents(20, seed=2)] + ["", "!!"]
    ids, mask = pad_batch([feature_ids(t, FEATURES) for t in texts], len(texts))
    jax_scores = 1 / (1 + np.exp(-np.asarray(forward_logits({k: jnp.asarray(v) for k, v in params.items()},
                                                            ids, mask), np.float64)))
    np.testing.assert_allclose(model.scores(texts), jax_scores, rtol=1e-5, atol=1e-6)
    assert model.score(texts[3]) == pytest.approx(jax_scores[3], rel=1e-5)
    assert model.score("") == pytest.approx(1 / (1 + math.exp(0.3)), rel=1e-6)   # no features: σ(b)


def _planted(n_docs: int = 600, signal: bool = True):
    """One-sentence grammar documents, every other one labelled positive; positives carry SIGNAL at a random place.
    Short documents, because the mean of embeddings dilutes one token among n features by 1/n: in a few hundred
    long documents the model can fit the labels by their rare words sooner than by the signal."""
    rng = np.random.default_rng(5)
    texts, labels = [], []
    for i, (text, _) in enumerate(default_corpus.generate_documents(n_docs, seed=9)):
        words = text.split("\n")[0].split(". ")[0].split(" ")
        if i % 2 == 0 and signal:
            words.insert(int(rng.integers(len(words) + 1)), SIGNAL)
        texts.append(" ".join(words))
        labels.append(int(i % 2 == 0))
    return texts, np.array(labels)


def _train_and_score(texts, labels, tmp_path, name="model.npz", config=TRAIN):
    held = heldout_mask(texts, 0.25)
    ids = [feature_ids(t, FEATURES) for t in texts]
    params, losses, _ = train_classifier([ids[i] for i in np.flatnonzero(~held)], labels[~held], FEATURES.buckets,
                                         config)
    path = str(tmp_path / name)
    classifier.save_classifier(path, params, FEATURES, 0.5)
    scores = classifier.load_classifier(path).scores([texts[i] for i in np.flatnonzero(held)])
    return path, params, losses, classifier_metrics.evaluate(scores, labels[held], 0.5)


@pytest.fixture(scope="module")
def planted_model(tmp_path_factory):
    texts, labels = _planted()
    return _train_and_score(texts, labels, tmp_path_factory.mktemp("planted"))


def test_the_classifier_separates_a_planted_signal(planted_model):
    _, _, losses, metrics = planted_model
    assert losses[-1] < losses[0]
    assert metrics["precision"] >= 0.95 and metrics["recall"] >= 0.95, metrics
    assert metrics["roc_auc"] >= 0.99


def test_without_a_signal_it_stays_at_chance(tmp_path):
    texts, labels = _planted(signal=False)
    _, _, _, metrics = _train_and_score(texts, labels, tmp_path)
    assert 0.3 < metrics["roc_auc"] < 0.7 and metrics["accuracy"] < 0.7, metrics


def test_save_load_round_trip_and_another_seed(planted_model, tmp_path):
    path, params, _, _ = planted_model
    loaded = classifier.load_params(path)
    for key in ("embeddings", "output", "bias"):
        np.testing.assert_array_equal(loaded[key], params[key])
    model = classifier.load_classifier(path)
    assert model.features == FEATURES and model.threshold == 0.5
    np.testing.assert_allclose(model.bucket_scores, params["embeddings"] @ params["output"], rtol=1e-5, atol=1e-5)
    again = str(tmp_path / "again.npz")
    assert classifier.save_classifier(again, params, FEATURES, 0.5) == classifier.file_sha256(path)   # same bytes
    texts, labels = _planted(100)
    one_epoch = dataclasses.replace(TRAIN, epochs=1)
    first, _, _, _ = _train_and_score(texts, labels, tmp_path, "a.npz", one_epoch)
    other, _, _, _ = _train_and_score(texts, labels, tmp_path, "b.npz", dataclasses.replace(one_epoch, seed=4))
    assert classifier.file_sha256(first) != classifier.file_sha256(other)


def test_bad_model_files_name_the_file(tmp_path):
    with pytest.raises(classifier.ModelFileError, match="nope.npz.*does not exist"):
        classifier.load_classifier(str(tmp_path / "nope.npz"))
    text_file = tmp_path / "notes.npz"
    text_file.write_text("hello")
    with pytest.raises(classifier.ModelFileError, match="notes.npz is not a classifier file"):
        classifier.load_classifier(str(text_file))
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    with pytest.raises(classifier.ModelFileError, match="other.npz is not a classifier file: it has no 'settings'"):
        classifier.load_classifier(str(other))
    np.savez(other, settings=np.array('{"format": "something/else"}'))
    with pytest.raises(classifier.ModelFileError, match="format 'something/else'"):
        classifier.load_classifier(str(other))
    np.savez(other, settings=np.array(json.dumps({"format": classifier.FORMAT, "features": {"buckets": 8}})),
             bucket_scores=np.zeros(8, np.float32), bias=np.float32(0))
    with pytest.raises(classifier.ModelFileError, match="other.npz: its settings are invalid \\(KeyError: 'threshold'"):
        classifier.load_classifier(str(other))


def test_training_needs_both_classes():
    ids = [np.array([1, 2], np.int32)] * 4
    with pytest.raises(ValueError, match="both classes, got 4 positives and 0 negatives"):
        train_classifier(ids, np.ones(4), 16, TRAIN)
    with pytest.raises(ValueError, match="TrainConfig.dim must be an int >= 1, got 0"):
        TrainConfig(dim=0)
    with pytest.raises(ValueError, match="buckets"):
        FeatureConfig(buckets=0)


def test_metrics_against_counting_by_hand():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.2, 0.8])
    labels = np.array([1, 1, 0, 1, 0, 0])
    m = classifier_metrics.at_threshold(scores, labels, 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 2, 1, 1)
    assert m["precision"] == 0.5 and m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(4 / 7)
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p in scores[labels == 1] for n in scores[labels == 0]]
    assert classifier_metrics.roc_auc(scores, labels) == pytest.approx(np.mean(pairs))
    with pytest.raises(ValueError, match="both classes"):
        classifier_metrics.roc_auc(scores[:2], labels[:2])
    short, long = classifier_metrics.by_length(scores, labels, [5, 50, 6, 40, 7, 60], 0.5, bins=2)
    assert (short["min_words"], short["max_words"], short["docs"]) == (5, 7, 3)
    assert (short["tp"], short["fp"], short["fn"], short["tn"]) == (1, 1, 0, 1)    # docs 0, 2, 4
    assert (long["tp"], long["fp"], long["fn"], long["tn"]) == (1, 1, 1, 0)     # docs 1, 3, 5


def test_generated_examples_are_deterministic_and_plant_only_invented_words():
    classifier_examples.check_lexicon()
    toxic = classifier_examples.generate("toxicity-positive", 30, seed=0)
    assert toxic == classifier_examples.generate("toxicity-positive", 30, seed=0)
    abusive = set(classifier_examples.ABUSIVE_NOUNS + classifier_examples.ABUSIVE_ADJECTIVES)
    assert sum(bool(set(tokenize(t, FEATURES)) & abusive) for t in toxic) >= 20
    clean = classifier_examples.generate("toxicity-negative", 30, seed=0)
    assert not any(set(tokenize(t, FEATURES)) & abusive for t in clean)
    negative = classifier_examples.generate("quality-negative", 40, seed=0)
    positive = classifier_examples.generate("quality-positive", 40, seed=0)
    assert len(negative) == 40 and not set(negative) & set(positive)
    with pytest.raises(ValueError, match="unknown generated example kind 'spam'"):
        classifier_examples.generate("spam", 3)


def test_max_paragraph_pooling_finds_a_signal_the_mean_dilutes(planted_model):
    """A planted sentence in one paragraph of a long clean document: the mean over the document dilutes it, the
    highest-scoring paragraph does not; every score is one paragraph's own."""
    model = classifier.load_classifier(planted_model[0])
    texts, labels = _planted(n_docs=40)
    clean = [t for t, y in zip(texts, labels) if not y]
    signal = next(t for t, y in zip(texts, labels) if y)
    text = "\n\n".join(clean[:12] + [signal] + clean[12:24])
    assert classifier.paragraphs(text) == clean[:12] + [signal] + clean[12:24]
    assert classifier.paragraphs("one\n \ntwo\n\n\n") == ["one", "two"] and classifier.paragraphs(" ") == [" "]
    pooled = model.score(text, "max_paragraph")
    assert pooled == max(model.score(p) for p in classifier.paragraphs(text)) == model.score(signal)
    assert model.score(text) < 0.5 <= pooled
    np.testing.assert_allclose(model.max_paragraph_scores([text, signal, clean[0]]),
                               [pooled, model.score(signal), model.score(clean[0])], rtol=1e-6)
    with pytest.raises(ValueError, match="pooling must be one of"):
        model.score(text, "min_paragraph")
    for pooling, kept in (("document", True), ("max_paragraph", False)):   # prepare's step scores as configured
        config = load("configs/prepare.py:smoke", ["steps=('toxicity_classifier',)", f"toxicity_classifier.pooling="
                                                   f"{pooling}", f"toxicity_classifier.model={planted_model[0]}"])
        [(_, apply)] = steps.plan_steps(config).document_steps()
        assert apply(text).keep is kept
