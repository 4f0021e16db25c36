"""Heuristic quality filters: the Gopher rules (Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
Insights from Training Gopher", appendix A), C4's terminal-punctuation rule taken as a document fraction, and a
keyword blocklist.

Every rule returns a `Verdict`: the rule's name, its numeric score (what a report histograms), whether the document
passes, and a short reason when it does not. `check_document` runs every rule (not only up to the first failure,
so every score can be histogrammed) over one `Document`, which splits the text once into what the rules share.

Units, chosen here where the paper leaves them open:
- a token is a whitespace-separated piece of text as written; a word is a token lowercased with leading and
  trailing punctuation and symbols stripped (tokens that are nothing else drop out), so "End." and "end" are the
  same word. Word counts, the alphabetic fraction and the symbol ratios count tokens (a stray "-" or "###" is
  exactly what they are after); mean word length, stop words and the n-gram rules use words.
- a line is a non-blank line, stripped; a paragraph is the text between blank lines, stripped.
- n-gram character fractions count the characters of the words an n-gram's occurrences cover, over the characters
  of all words; overlapping occurrences count each word once. A "duplicate" line, paragraph or n-gram occurrence
  is one after the first, so a text written twice scores 0.5.
- a ratio with nothing to count (no tokens, no lines) is 0.
"""
from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

_EDGE_NON_WORD = re.compile(r"^[\W_]+|[\W_]+$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n")
_ALPHA = re.compile(r"[^\W\d_]")                       # a letter in any script
BULLETS = ("•", "‣", "◦", "⁃", "▪", "●", "○", "■", "□", "►", "–", "-", "*", "·")
ELLIPSES = ("...", "…")
# C4 (Raffel et al. 2020) keeps a line only if it ends in one of these; closing quotes after a full stop count too.
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "”", "’", "'", "»")
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One rule's result. `reason` says why the document was dropped, e.g. "words 12 < min 50"; empty when kept."""
    rule: str
    score: float
    keep: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Decision:
    """Every rule's verdict on one document; dropped if any rule drops it, with the first failing rule's reason."""
    keep: bool
    reason: str
    verdicts: tuple[Verdict, ...]

    @property
    def scores(self) -> dict[str, float]:
        return {v.rule: v.score for v in self.verdicts}


@dataclasses.dataclass(frozen=True)
class Document:
    """A text split once into the pieces the rules share (see the module docstring for the units)."""
    text: str
    tokens: tuple[str, ...]
    words: tuple[str, ...]
    lines: tuple[str, ...]
    paragraphs: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> "Document":
        if not isinstance(text, str):
            raise TypeError(f"a document must be a str, got {type(text).__name__}")
        tokens = tuple(text.split())
        words = tuple(w for w in (_EDGE_NON_WORD.sub("", t).lower() for t in tokens) if w)
        lines = tuple(line.strip() for line in text.splitlines() if line.strip())
        paragraphs = tuple(p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip())
        return cls(text, tokens, words, lines, paragraphs)


def _check_fraction(name: str, value: float | None):
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1] or None, got {value}")


def _in_range(rule: str, score: float, minimum: float | None, maximum: float | None) -> Verdict:
    if minimum is not None and score < minimum:
        return Verdict(rule, score, False, f"{rule} {score:.4g} < min {minimum:g}")
    if maximum is not None and score > maximum:
        return Verdict(rule, score, False, f"{rule} {score:.4g} > max {maximum:g}")
    return Verdict(rule, score, True)


def _ratio(count: float, total: float) -> float:
    return count / total if total else 0.0


# --- Gopher quality rules -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GopherQualityConfig:
    """Gopher's quality thresholds (appendix A) plus C4's punctuation rule; None switches a rule off."""
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_chars: int | None = None                   # Gopher bounds words only; characters are here for other recipes
    max_chars: int | None = None
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_hash_ratio: float | None = 0.1             # "#" per token
    max_ellipsis_ratio: float | None = 0.1         # "..." or "…" per token
    max_bullet_line_frac: float | None = 0.9
    max_ellipsis_line_frac: float | None = 0.3
    min_alpha_word_frac: float | None = 0.8        # tokens with at least one letter
    min_stop_words: int | None = 2                 # occurrences of `stop_words`; English-specific, as in Gopher
    stop_words: tuple[str, ...] = GOPHER_STOP_WORDS
    # Lines ending in terminal punctuation: C4 drops each other line; FineWeb turned that into this document-level
    # threshold (drop when at most 12% of lines end so), which keeps list-heavy pages but not menus and link lists.
    min_terminal_punct_line_frac: float | None = 0.12

    def __post_init__(self):
        for name in ("max_bullet_line_frac", "max_ellipsis_line_frac", "min_alpha_word_frac",
                     "min_terminal_punct_line_frac"):
            _check_fraction(name, getattr(self, name))


def gopher_quality(doc: Document, config: GopherQualityConfig = GopherQualityConfig()) -> list[Verdict]:
    c = config
    verdicts = []
    n_tokens = len(doc.tokens)
    if c.min_chars is not None or c.max_chars is not None:
        verdicts.append(_in_range("chars", len(doc.text), c.min_chars, c.max_chars))
    if c.min_words is not None or c.max_words is not None:
        verdicts.append(_in_range("words", n_tokens, c.min_words, c.max_words))
    if c.min_mean_word_length is not None or c.max_mean_word_length is not None:
        mean_length = _ratio(sum(len(w) for w in doc.words), len(doc.words))
        verdicts.append(_in_range("mean_word_length", mean_length, c.min_mean_word_length, c.max_mean_word_length))
    if c.max_hash_ratio is not None:
        verdicts.append(_in_range("hash_ratio", _ratio(doc.text.count("#"), n_tokens), None, c.max_hash_ratio))
    if c.max_ellipsis_ratio is not None:
        n_ellipses = doc.text.count("...") + doc.text.count("…")
        verdicts.append(_in_range("ellipsis_ratio", _ratio(n_ellipses, n_tokens), None, c.max_ellipsis_ratio))
    n_lines = len(doc.lines)
    if c.max_bullet_line_frac is not None:
        n_bullets = sum(line.startswith(BULLETS) for line in doc.lines)
        verdicts.append(_in_range("bullet_lines", _ratio(n_bullets, n_lines), None, c.max_bullet_line_frac))
    if c.max_ellipsis_line_frac is not None:
        n_ellipsis_lines = sum(line.endswith(ELLIPSES) for line in doc.lines)
        verdicts.append(_in_range("ellipsis_lines", _ratio(n_ellipsis_lines, n_lines), None,
                                  c.max_ellipsis_line_frac))
    if c.min_alpha_word_frac is not None:
        n_alpha = sum(bool(_ALPHA.search(t)) for t in doc.tokens)
        verdicts.append(_in_range("alpha_words", _ratio(n_alpha, n_tokens), c.min_alpha_word_frac, None))
    if c.min_stop_words is not None:
        stop_words = frozenset(c.stop_words)
        verdicts.append(_in_range("stop_words", sum(w in stop_words for w in doc.words), c.min_stop_words, None))
    if c.min_terminal_punct_line_frac is not None:
        n_terminal = sum(line.endswith(TERMINAL_PUNCTUATION) for line in doc.lines)
        frac = _ratio(n_terminal, n_lines)
        # FineWeb drops at <= threshold; a document with no lines at all is dropped too.
        keep = frac > c.min_terminal_punct_line_frac
        verdicts.append(Verdict("terminal_punct_lines", frac, keep,
                                "" if keep else f"terminal_punct_lines {frac:.4g} <= min "
                                                f"{c.min_terminal_punct_line_frac:g}"))
    return verdicts


# --- Gopher repetition rules ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GopherRepetitionConfig:
    """Gopher's repetition thresholds (appendix A, table A1); a threshold of None switches a rule off."""
    max_dup_line_frac: float | None = 0.30
    max_dup_para_frac: float | None = 0.30
    max_dup_line_char_frac: float | None = 0.20
    max_dup_para_char_frac: float | None = 0.20
    top_ngram_max_char_frac: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    dup_ngram_max_char_frac: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

    def __post_init__(self):
        for name in ("max_dup_line_frac", "max_dup_para_frac", "max_dup_line_char_frac", "max_dup_para_char_frac"):
            _check_fraction(name, getattr(self, name))
        for name in ("top_ngram_max_char_frac", "dup_ngram_max_char_frac"):
            for n, frac in getattr(self, name):
                if not isinstance(n, int) or n < 1:
                    raise ValueError(f"{name}: n-gram size must be an int >= 1, got {n!r}")
                _check_fraction(f"{name}[{n}]", frac)


def _duplicate_fractions(pieces: tuple[str, ...]) -> tuple[float, float]:
    """(fraction of pieces, fraction of their characters) that repeat an earlier piece exactly."""
    seen: set[str] = set()
    n_dup = dup_chars = 0
    for piece in pieces:
        if piece in seen:
            n_dup += 1
            dup_chars += len(piece)
        seen.add(piece)
    return _ratio(n_dup, len(pieces)), _ratio(dup_chars, sum(len(p) for p in pieces))


def ngram_tables(word_ids: np.ndarray, max_n: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{n: (ids_g, first_i)} for n = 1..max_n (while the text has n words): the dense id of every n-word window
    and the window where each id first occurs.

    Each n extends the (n-1)-gram ids by one word and re-densifies them with a 1-D np.unique, so each n costs one
    1-D sort instead of a row-wise unique over n-column windows. The key id·n_vocab + word stays below
    n_windows·n_vocab, far inside int64.
    """
    tables: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    word_ids = np.asarray(word_ids, np.int64)
    n_vocab = int(word_ids.max()) + 1 if len(word_ids) else 0
    ids_g = word_ids
    for n in range(1, min(max_n, len(word_ids)) + 1):
        keys_g = word_ids if n == 1 else ids_g[:-1] * n_vocab + word_ids[n - 1:]
        _, first_i, inverse = np.unique(keys_g, return_index=True, return_inverse=True)
        ids_g = inverse.reshape(-1)
        tables[n] = (ids_g, first_i)
    return tables


def _covered_char_frac(starts: np.ndarray, n: int, lengths_w: np.ndarray) -> float:
    """Characters of the words inside any window [start, start + n), over all words' characters."""
    depth = np.zeros(len(lengths_w) + 1, np.int64)
    np.add.at(depth, starts, 1)
    np.add.at(depth, starts + n, -1)
    covered_w = np.cumsum(depth[:-1]) > 0
    return _ratio(float(lengths_w[covered_w].sum()), float(lengths_w.sum()))


def _top_frac(tables, lengths_w: np.ndarray, n: int) -> float:
    if n not in tables:
        return 0.0
    ids_g, _ = tables[n]
    counts = np.bincount(ids_g)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    return _covered_char_frac(np.flatnonzero(ids_g == top), n, lengths_w)


def _dup_frac(tables, lengths_w: np.ndarray, n: int) -> float:
    if n not in tables:
        return 0.0
    ids_g, first_i = tables[n]
    repeats = first_i[ids_g] != np.arange(len(ids_g))
    return _covered_char_frac(np.flatnonzero(repeats), n, lengths_w)


def top_ngram_char_frac(word_ids: np.ndarray, lengths_w: np.ndarray, n: int) -> float:
    """Share of characters inside the occurrences of the most frequent n-gram; 0 if no n-gram occurs twice."""
    return _top_frac(ngram_tables(word_ids, n), lengths_w, n)


def dup_ngram_char_frac(word_ids: np.ndarray, lengths_w: np.ndarray, n: int) -> float:
    """Share of characters inside occurrences of n-grams that already occurred earlier in the document."""
    return _dup_frac(ngram_tables(word_ids, n), lengths_w, n)


def gopher_repetition(doc: Document, config: GopherRepetitionConfig = GopherRepetitionConfig()) -> list[Verdict]:
    c = config
    verdicts = []
    line_frac, line_char_frac = _duplicate_fractions(doc.lines)
    para_frac, para_char_frac = _duplicate_fractions(doc.paragraphs)
    for rule, score, maximum in (("dup_line_frac", line_frac, c.max_dup_line_frac),
                                 ("dup_para_frac", para_frac, c.max_dup_para_frac),
                                 ("dup_line_char_frac", line_char_frac, c.max_dup_line_char_frac),
                                 ("dup_para_char_frac", para_char_frac, c.max_dup_para_char_frac)):
        if maximum is not None:
            verdicts.append(_in_range(rule, score, None, maximum))
    vocabulary: dict[str, int] = {}
    word_ids = np.array([vocabulary.setdefault(w, len(vocabulary)) for w in doc.words], np.int64)
    lengths_w = np.array([len(w) for w in doc.words], np.int64)
    tables = ngram_tables(word_ids, max((n for n, _ in c.top_ngram_max_char_frac + c.dup_ngram_max_char_frac),
                                        default=0))
    for n, maximum in c.top_ngram_max_char_frac:
        verdicts.append(_in_range(f"top_{n}gram_char_frac", _top_frac(tables, lengths_w, n), None, maximum))
    for n, maximum in c.dup_ngram_max_char_frac:
        verdicts.append(_in_range(f"dup_{n}gram_char_frac", _dup_frac(tables, lengths_w, n), None, maximum))
    return verdicts


# --- keyword blocklist ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlocklistConfig:
    """Words or phrases matched case-insensitively as whole words; a document with more than `max_hits` is dropped.

    A phrase's spaces match any whitespace. No list ships with the code: which words to block is a choice each
    data recipe makes and records in its config.
    """
    words: tuple[str, ...] = ()
    max_hits: int = 0

    def __post_init__(self):
        if isinstance(self.words, str):
            raise TypeError(f"BlocklistConfig.words must be a tuple of strings, got the string {self.words!r}")
        if any(not isinstance(w, str) or not w.strip() for w in self.words):
            raise ValueError(f"BlocklistConfig.words must be non-blank strings, got {self.words!r}")
        if self.max_hits < 0:
            raise ValueError(f"BlocklistConfig.max_hits must be >= 0, got {self.max_hits}")


@functools.lru_cache(maxsize=32)
def _blocklist_pattern(words: tuple[str, ...]) -> re.Pattern:
    # Longest first, so a phrase wins over a word it starts with.
    alternatives = sorted({r"\s+".join(map(re.escape, w.split())) for w in words}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def blocklist_hits(text: str, config: BlocklistConfig) -> list[str]:
    """The blocked words found in `text`, lowercased, in order of appearance."""
    if not config.words:
        return []
    return [" ".join(m.group(0).lower().split()) for m in _blocklist_pattern(config.words).finditer(text)]


def blocklist(doc: Document, config: BlocklistConfig = BlocklistConfig()) -> Verdict:
    hits = blocklist_hits(doc.text, config)
    if len(hits) > config.max_hits:
        return Verdict("blocklist_hits", len(hits), False,
                       f"blocklist_hits {len(hits)} > max {config.max_hits} (first: {hits[0]!r})")
    return Verdict("blocklist_hits", len(hits), True)


# --- all together ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HeuristicsConfig:
    quality: GopherQualityConfig = GopherQualityConfig()
    repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    blocklist: BlocklistConfig = BlocklistConfig()


def check_document(text: str, config: HeuristicsConfig = HeuristicsConfig()) -> Decision:
    """Runs every rule on `text`; kept only if every rule keeps it."""
    doc = Document.from_text(text)
    verdicts = (gopher_quality(doc, config.quality) + gopher_repetition(doc, config.repetition)
                + [blocklist(doc, config.blocklist)])
    failed = [v for v in verdicts if not v.keep]
    return Decision(not failed, failed[0].reason if failed else "", tuple(verdicts))
