"""The default corpus: deterministic, and its log-probabilities exact (the scorer parses text back)."""
import collections
import itertools
import json
import os

import numpy as np
import pytest

from llm_jax.data import default_corpus as dc

TINY = dc.SourceSpec(n_topics=3, n_nouns=5, n_verbs=4, n_adjectives=3, n_adverbs=2, lexicon_seed=7)


def test_generation_is_deterministic_and_seeded():
    a = dc.generate_documents(30, seed=0)
    assert a == dc.generate_documents(30, seed=0)
    assert a != dc.generate_documents(30, seed=1)
    assert all(isinstance(t, str) and t and lp < 0 for t, lp in a)


@pytest.mark.parametrize("spec", [dc.DEFAULT_SPEC, TINY], ids=["default", "tiny"])
def test_scorer_matches_generator(spec):
    for text, log_p in dc.generate_documents(150, seed=3, spec=spec):
        assert dc.score_document(text, spec) == pytest.approx(log_p, rel=1e-9, abs=1e-9)


def test_scorer_probabilities_sum_to_the_pattern_probability():
    # Enumerate every one-paragraph, one-sentence document of pattern "D N R V": their probabilities must
    # add up to p(1 paragraph) p(1 sentence) p(pattern), because words and end marks are normalised.
    src = dc.build_source(TINY)
    pattern = dc.PATTERNS.index("D N R V")
    total = 0.0
    for d, n, r, v, mark in itertools.product(src.words["D"], src.words["N"], src.words["R"], src.words["V"],
                                              dc.END_MARKS):
        text = f"{d[0].upper()}{d[1:]} {n} {r} {v}{mark}"
        total += np.exp(dc.score_document(text, TINY))
    expected = TINY.q_paragraph * TINY.q_sentence * np.exp(src.pattern_log_probs[pattern])
    assert total == pytest.approx(expected, rel=1e-9)


def test_empirical_frequency_matches_probability():
    # The commonest document's frequency estimates its probability.
    docs = dc.generate_documents(40_000, seed=5, spec=TINY)
    text, count = collections.Counter(t for t, _ in docs).most_common(1)[0]
    p = np.exp(dc.score_document(text, TINY))
    freq = count / len(docs)
    assert abs(freq - p) < 5 * np.sqrt(p / len(docs))


@pytest.mark.parametrize("text", ["", "the cat.", "The blorp zing.", "The the the the the.",
                                  "The   a.", "Hello world"])
def test_scorer_rejects_text_the_source_cannot_emit(text):
    with pytest.raises(ValueError):
        dc.score_document(text)


def test_words_are_unique_across_classes():
    src = dc.build_source()
    all_words = [w for ws in src.words.values() for w in ws]
    assert len(all_words) == len(set(all_words)) == src.lexicon_size > 1500
    assert all(w.isalpha() and w.islower() for w in all_words)


def test_write_default_corpus_is_idempotent(tmp_path):
    path = dc.write_default_corpus(str(tmp_path), n_docs=40, seed=2)
    mtime = os.stat(path).st_mtime_ns
    assert dc.write_default_corpus(str(tmp_path), n_docs=40, seed=2) == path
    assert os.stat(path).st_mtime_ns == mtime
    records = [json.loads(line) for line in open(path)]
    assert [(r["text"], r["log_prob"]) for r in records] == dc.generate_documents(40, seed=2)
    stats = json.load(open(tmp_path / dc.STATS_FILE))
    assert stats["n_docs"] == 40 and stats["n_topics"] == dc.DEFAULT_SPEC.n_topics
    assert stats["n_chars"] == sum(len(r["text"]) for r in records)
    assert stats["nats_per_char"] == pytest.approx(-sum(r["log_prob"] for r in records) / stats["n_chars"])
    # A different request regenerates.
    dc.write_default_corpus(str(tmp_path), n_docs=41, seed=2)
    assert sum(1 for _ in open(path)) == 41
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_default_corpus_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_JAX_CACHE", str(tmp_path))
    assert dc.default_corpus_dir() == str(tmp_path)
