"""Synthetic example documents for training and testing classifiers without any download, all built from the
grammar and lexicon of the embedded default corpus (llm_jax/data/default_corpus.py). They are stand-ins that
exercise the machinery, not models of real web text: point the classifier config at your own files for that.

    quality-positive    documents of the default corpus's grammar (samples of their own seed, so a quality
                        classifier never scores its own training documents when prepare reads the default corpus)
    quality-negative    low-quality text from the same lexicon, each matched in length to a grammar document and
                        drawn from four kinds in turn:
                          word salad      the words of a grammar document shuffled into new "sentences": the same
                                          word counts and length, only the order is wrong (bigrams tell)
                          keyword list    its content words in short lines joined by commas or bars, unpunctuated
                          boilerplate     a few menu and footer lines of lexicon words, repeated down the page
                          fragments       grammar sentences cut off after a few words, one a line
                        and a third of them, of any kind, open with a genuine paragraph of another document
    toxicity-positive   a grammar document with one to three "abusive" sentences inserted between its sentences:
                        grammar sentences whose nouns or adjectives are replaced by words of an invented abusive
                        lexicon (ABUSIVE_NOUNS, ABUSIVE_ADJECTIVES; nonsense words, not in the corpus lexicon, and
                        no real slur), a quarter of them obfuscated by one changed letter (o→0, i→1, e→3, a→4, or a
                        doubled letter), the kind of variation character n-grams are for
    toxicity-negative   grammar documents (another seed)

A spec `generated:<kind>` in configs/classifier.py names one of them; `generate(kind, n_docs, seed)` is
deterministic.
"""
from __future__ import annotations

import re

import numpy as np

from llm_jax.data import default_corpus

PREFIX = "generated:"
KINDS = ("quality-positive", "quality-negative", "toxicity-positive", "toxicity-negative")
ABUSIVE_NOUNS = ("grobnatch", "skuzzlet", "vormidge", "drubbock", "blathermonk", "zagwort", "snibbet", "kragloon")
ABUSIVE_ADJECTIVES = ("quenkish", "groatly", "smarfing", "vlubbous", "drekky", "snorbish")
_SENTENCE_END = re.compile(r"(?<=[.?!]) ")
_LEETSPEAK = {"o": "0", "i": "1", "e": "3", "a": "4"}
# Seeds of the grammar samples, offset from the default corpus's own (0) so none of its documents is drawn.
_SEEDS = {"quality-positive": 1_001, "quality-negative": 2_001, "toxicity-positive": 3_001,
          "toxicity-negative": 4_001}


def _grammar_documents(n_docs: int, seed: int) -> list[str]:
    return [text for text, _ in default_corpus.generate_documents(n_docs, seed=seed)]


def _sentences(document: str) -> list[str]:
    return [s for paragraph in document.split("\n\n") for s in _SENTENCE_END.split(paragraph)]


def _content_words(document: str) -> list[str]:
    index = default_corpus.build_source().word_index
    words = [w.strip(".?!,").lower() for w in document.split()]
    return [w for w in words if index.get(w, ("D",))[0] in default_corpus.CONTENT_CLASSES]


def _word_salad(rng, reference: str, pool) -> str:
    words = [w.strip(".?!,").lower() for w in reference.split()]
    words = [words[i] for i in rng.permutation(len(words))]
    sentences, i = [], 0
    while i < len(words):
        n = int(rng.integers(4, 13))
        chunk = words[i:i + n]
        # the grammar's own end marks, so that "?" and "!" do not tell the classes apart
        mark = default_corpus.END_MARKS[rng.choice(3, p=default_corpus.END_MARK_PROBS)]
        sentences.append(" ".join([chunk[0].capitalize()] + chunk[1:]) + mark)
        i += n
    return " ".join(sentences)


def _keyword_list(rng, reference: str, pool) -> str:
    words = _content_words(reference) or _content_words(pool())
    lines, i = [], 0
    while i < len(words):
        n = int(rng.integers(1, 5))
        lines.append((", " if rng.random() < 0.5 else " | ").join(words[i:i + n]))
        i += n
    return "\n".join(lines)


def _boilerplate(rng, reference: str, pool) -> str:
    nouns = default_corpus.build_source().words["N"]
    adjectives = default_corpus.build_source().words["A"]
    templates = [" | ".join(nouns[int(j)].capitalize() for j in rng.integers(0, 60, int(rng.integers(3, 6)))),
                 f"{adjectives[int(rng.integers(0, 40))].capitalize()} {nouns[int(rng.integers(0, 60))]} "
                 f"{int(rng.integers(1990, 2030))}",
                 " ".join(nouns[int(j)] for j in rng.integers(0, 200, 3)) + " >>"]
    target, lines = len(reference.split()), []
    while sum(len(line.split()) for line in lines) < target:
        lines.append(templates[int(rng.integers(len(templates)))])
    return "\n".join(lines)


def _fragments(rng, reference: str, pool) -> str:
    sentences, target, lines = _sentences(reference), len(reference.split()), []
    while sum(len(line.split()) for line in lines) < target:
        if not sentences:
            sentences = _sentences(pool())
        words = sentences.pop(0).rstrip(".?!").split()
        lines.append(" ".join(words[:max(2, int(len(words) * rng.uniform(0.3, 0.7)))]))
    return "\n".join(lines)


_LOW_QUALITY = (_word_salad, _keyword_list, _boilerplate, _fragments)


def _quality_negatives(n_docs: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    references = _grammar_documents(2 * n_docs + 1, seed)
    extra = iter(references[n_docs:])
    pool = lambda: next(extra, references[0])   # noqa: E731  (more grammar text when a reference runs short)
    docs = []
    for i, reference in enumerate(references[:n_docs]):
        text = _LOW_QUALITY[i % len(_LOW_QUALITY)](rng, reference, pool)
        if rng.random() < 1 / 3:
            text = pool().split("\n\n")[0] + "\n\n" + text
        docs.append(text)
    return docs


def _obfuscate(rng, word: str) -> str:
    positions = [i for i, c in enumerate(word) if c in _LEETSPEAK]
    if positions and rng.random() < 0.5:
        i = positions[int(rng.integers(len(positions)))]
        return word[:i] + _LEETSPEAK[word[i]] + word[i + 1:]
    i = int(rng.integers(len(word)))
    return word[:i + 1] + word[i:]


def abusive_sentence(rng, sentence: str) -> str:
    """A grammar sentence with its nouns (and adjectives, if any) swapped for invented abusive words; at least one
    word is swapped, a quarter of the swapped words obfuscated."""
    index = default_corpus.build_source().word_index
    words = sentence.split(" ")
    slots = [(i, index[w.strip(".?!,").lower()][0]) for i, w in enumerate(words)
             if index.get(w.strip(".?!,").lower(), ("D",))[0] in "NA"]
    n_swapped = int(rng.integers(1, len(slots) + 1)) if slots else 0
    for i, cls in slots[:n_swapped]:
        lexicon = ABUSIVE_NOUNS if cls == "N" else ABUSIVE_ADJECTIVES
        swapped = lexicon[int(rng.integers(len(lexicon)))]
        if rng.random() < 0.25:
            swapped = _obfuscate(rng, swapped)
        bare = words[i].strip(".?!,").lower()
        word = words[i].lower().replace(bare, swapped)
        words[i] = word[0].upper() + word[1:] if i == 0 else word
    return " ".join(words)


def _toxic_documents(n_docs: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    documents = _grammar_documents(n_docs, seed)
    donors = [s for d in _grammar_documents(n_docs, seed + 1) for s in _sentences(d)]
    docs = []
    for document in documents:
        paragraphs = [_SENTENCE_END.split(p) for p in document.split("\n\n")]
        for _ in range(int(rng.integers(1, 4))):
            paragraph = paragraphs[int(rng.integers(len(paragraphs)))]
            donor = donors[int(rng.integers(len(donors)))]
            paragraph.insert(int(rng.integers(len(paragraph) + 1)), abusive_sentence(rng, donor))
        docs.append("\n\n".join(" ".join(p) for p in paragraphs))
    return docs


def check_lexicon() -> None:
    """The invented abusive words are not corpus words (a clean document would otherwise carry the signal)."""
    shared = sorted(set(ABUSIVE_NOUNS + ABUSIVE_ADJECTIVES) & set(default_corpus.build_source().word_index))
    if shared:
        raise AssertionError(f"abusive words {shared} are also words of the default corpus")


def generate(kind: str, n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` documents of one kind (module docstring); the same for the same arguments."""
    if kind not in KINDS:
        raise ValueError(f"unknown generated example kind {kind!r}; known: {list(KINDS)}")
    if n_docs < 1:
        raise ValueError(f"generated examples need n_docs >= 1, got {n_docs}")
    base = _SEEDS[kind] + 10_000 * seed
    if kind == "quality-negative":
        return _quality_negatives(n_docs, base)
    if kind == "toxicity-positive":
        check_lexicon()
        return _toxic_documents(n_docs, base)
    return _grammar_documents(n_docs, base)
