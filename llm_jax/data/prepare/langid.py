"""A small language identifier for coarse filtering: naive Bayes over character 1- to 3-grams.

It covers seven languages, English (en), German (de), French (fr), Spanish (es), Italian (it), Dutch (nl) and
Portuguese (pt), trained at first use on a few paragraphs of prose per language that ship beside this file
(`langid_text.txt`). That is enough to tell these languages apart on a sentence or more of ordinary text, and to
keep "English with invented content words" (the default corpus) as English, because function words and spelling
patterns carry the signal: every default-corpus document of 20 or more words comes out English, while a few in a
thousand one-sentence documents (five words, most of them invented) do not. It is not a general identifier: text
in any other language, code, or tables is still assigned to one of the seven, often with a high score. Use it to
keep or drop documents of these languages, not to label the web.

Features: the text is lowercased (NFC, so accents stay one character), every run of non-letters becomes one space,
and the result, padded with a space on each side, is cut into all its 1-, 2- and 3-character substrings except a
lone space. p(n-gram | language) is the n-gram's count in that language's training text, Lidstone-smoothed over the
n-grams any language has seen; n-grams no language has seen carry no evidence and are skipped.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import importlib.resources
import re
import unicodedata

import numpy as np

from llm_jax.data.prepare.heuristics import Verdict

TRAINING_TEXT = "langid_text.txt"
LANGUAGES = ("en", "de", "fr", "es", "it", "nl", "pt")
NGRAM_ORDERS = (1, 2, 3)
# Small, so an n-gram seen in one language's text and not another's counts for much: with a few paragraphs per
# language that is most of the evidence (0.01 beat 0.1 and 0.5 on both held-out sentences and the default corpus).
SMOOTHING = 0.01
_NON_LETTERS = re.compile(r"[\W\d_]+")
_SECTION = re.compile(r"^== (\w+) ==$")


def _letters(text: str) -> str:
    """The text as the n-grams see it (module docstring): lowercased letters, one space between runs, padded."""
    return " " + _NON_LETTERS.sub(" ", unicodedata.normalize("NFC", text).lower()).strip() + " "


def ngram_counts(text: str) -> collections.Counter:
    """Counts of the character n-grams the model uses (see the module docstring)."""
    letters = _letters(text)
    counts: collections.Counter = collections.Counter()
    if letters == "  ":
        return counts
    for n in NGRAM_ORDERS:
        counts.update(letters[i:i + n] for i in range(len(letters) - n + 1))
    del counts[" "]
    return counts


def ngram_codes(letters: str) -> np.ndarray:
    """Every 1-, 2- and 3-gram of `_letters(text)` as one uint64, in no particular order: (code point + 1) in 21
    bits per character, so n-grams of different lengths never share a code."""
    cp = np.frombuffer(letters.encode("utf-32-le"), np.uint32).astype(np.uint64) + 1
    codes = []
    for n in NGRAM_ORDERS:
        code = cp[:len(cp) - n + 1].copy()
        for k in range(1, n):
            code = (code << np.uint64(21)) | cp[k:len(cp) - n + 1 + k]
        codes.append(code)
    return np.concatenate(codes)


def read_training_text(text: str) -> dict[str, str]:
    """{language: its training prose} from the sectioned format of `langid_text.txt`."""
    sections: dict[str, list[str]] = {}
    current = None
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            continue
        header = _SECTION.match(line.strip())
        if header:
            current = header.group(1)
            if current in sections:
                raise ValueError(f"{TRAINING_TEXT}:{line_no}: language {current!r} appears twice")
            sections[current] = []
        elif line.strip():
            if current is None:
                raise ValueError(f"{TRAINING_TEXT}:{line_no}: text before the first '== code ==' header")
            sections[current].append(line)
    return {lang: "\n".join(lines) for lang, lines in sections.items()}


@dataclasses.dataclass(frozen=True)
class LanguageGuess:
    """The likeliest language, its posterior `score` (uniform prior over the covered languages), the gap to the
    runner-up in mean log-likelihood per n-gram (`margin`, nats; length-independent), and every posterior."""
    language: str
    score: float
    margin: float
    scores: dict[str, float]


class LanguageModel:
    """Naive Bayes over character n-grams; `identify` scores one text against every trained language."""

    def __init__(self, texts: dict[str, str], smoothing: float = SMOOTHING):
        if not texts:
            raise ValueError("a language model needs training text for at least one language")
        if smoothing <= 0:
            raise ValueError(f"smoothing must be > 0, got {smoothing}")
        self.languages = tuple(texts)
        counts = [ngram_counts(texts[lang]) for lang in self.languages]
        vocabulary = sorted(set().union(*counts))
        self.index = {g: i for i, g in enumerate(vocabulary)}
        counts_lv = np.zeros((len(self.languages), len(vocabulary)))
        for l, lang_counts in enumerate(counts):
            for g, c in lang_counts.items():
                counts_lv[l, self.index[g]] = c
        smoothed_lv = counts_lv + smoothing
        self.log_probs_lv = np.log(smoothed_lv / smoothed_lv.sum(axis=1, keepdims=True))
        # The vocabulary as sorted n-gram codes, so a text's n-grams are looked up in one vectorised search.
        codes = np.array([ngram_codes(g)[-1] for g in vocabulary], np.uint64)   # a g's last code is g's own
        self._order = np.argsort(codes, kind="stable")
        self._sorted_codes = codes[self._order]

    def ngram_weights(self, text: str) -> np.ndarray:
        """(V,) how often each vocabulary n-gram occurs in the text; `ngram_counts` restricted to the vocabulary."""
        codes = ngram_codes(_letters(text))
        pos = np.minimum(np.searchsorted(self._sorted_codes, codes), len(self._sorted_codes) - 1)
        known = self._sorted_codes[pos] == codes
        return np.bincount(self._order[pos[known]], minlength=len(self.index)).astype(np.float64)

    def identify(self, text: str) -> LanguageGuess:
        weights = self.ngram_weights(text)
        if not weights.any():
            return LanguageGuess("", 0.0, 0.0, {lang: 0.0 for lang in self.languages})
        log_likelihood_l = self.log_probs_lv @ weights
        # Each character sits in up to three overlapping n-grams, so the naive-Bayes sum counts the same evidence
        # about len(NGRAM_ORDERS) times; tempering by that keeps the posterior from being even more overconfident.
        tempered_l = log_likelihood_l / len(NGRAM_ORDERS)
        posterior_l = np.exp(tempered_l - np.logaddexp.reduce(tempered_l))
        order = np.argsort(-log_likelihood_l, kind="stable")
        margin = (log_likelihood_l[order[0]] - log_likelihood_l[order[1]]) / weights.sum() if len(order) > 1 else 0.0
        return LanguageGuess(self.languages[order[0]], float(posterior_l[order[0]]), float(margin),
                             {lang: float(p) for lang, p in zip(self.languages, posterior_l)})


@functools.lru_cache(maxsize=1)
def default_model() -> LanguageModel:
    """The model trained on the shipped text, built once per process."""
    text = importlib.resources.files("llm_jax.data.prepare").joinpath(TRAINING_TEXT).read_text(encoding="utf-8")
    return LanguageModel(read_training_text(text))


def identify_language(text: str) -> LanguageGuess:
    return default_model().identify(text)


@dataclasses.dataclass(frozen=True)
class LanguageFilterConfig:
    """Keep a document whose likeliest language is one of `languages` with posterior at least `min_score`.

    Only the first `max_chars` characters are read: a page's language shows in its first few thousand characters,
    and the cost of a long document stays bounded.
    """
    languages: tuple[str, ...] = ("en",)
    min_score: float = 0.65
    max_chars: int = 10_000

    def __post_init__(self):
        if isinstance(self.languages, str):
            raise TypeError(f"LanguageFilterConfig.languages must be a tuple, got the string {self.languages!r}")
        unknown = [lang for lang in self.languages if lang not in LANGUAGES]
        if unknown or not self.languages:
            raise ValueError(f"LanguageFilterConfig.languages {self.languages!r}: the identifier covers only "
                             f"{LANGUAGES}")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"LanguageFilterConfig.min_score must be in [0, 1], got {self.min_score}")
        if self.max_chars < 1:
            raise ValueError(f"LanguageFilterConfig.max_chars must be >= 1, got {self.max_chars}")


def language_filter(text: str, config: LanguageFilterConfig = LanguageFilterConfig()) -> Verdict:
    """Verdict "language" whose score is the best posterior among the wanted languages."""
    guess = identify_language(text[:config.max_chars])
    score = max(guess.scores[lang] for lang in config.languages)
    if not guess.language:
        return Verdict("language", score, False, "language: no letters to identify")
    if guess.language not in config.languages:
        return Verdict("language", score, False,
                       f"language {guess.language!r} (p {guess.score:.3f}) not in {config.languages}")
    if guess.score < config.min_score:
        return Verdict("language", score, False,
                       f"language {guess.language!r} p {guess.score:.3f} < min {config.min_score:g}")
    return Verdict("language", score, True)
