"""The embedded default corpus: English-like text from a source whose probability is known exactly.

Each document is drawn from a small probabilistic grammar:

    topic      ~ Uniform(n_topics)                         (latent, summed out when scoring)
    paragraphs ~ Geometric(q_paragraph)       (>= 1)
    sentences  ~ Geometric(q_sentence)        (>= 1, per paragraph)
    pattern    ~ Categorical(pattern_probs)   (a sequence of word classes, per sentence)
    word       ~ Zipf mixture over its class, tilted by the topic
    end mark   ~ Categorical({".", "?", "!"})

Word classes are disjoint sets of lowercase strings and the patterns have distinct class sequences, so a
rendered document has exactly one derivation besides the topic. Hence

    log p(doc) = log Σ_t p(t) p(words | t) + log p(lengths, patterns, end marks)

is exact, and -log p(doc) is the code length of the whole document (its length included). The mean of
-log p over a held-out set is the entropy floor no language model can beat on this corpus.
`score_document` recovers the derivation by parsing the text back, independently of the generator.

Nothing is downloaded and no file ships: `write_default_corpus` renders the corpus into a cache directory.

Two corpora are embedded, each named by a data spec (`CORPORA`):

    default          DEFAULT_SPEC, 7,200 documents: what pretraining, tokenizers and the scaling sweeps use
    default:domain   DOMAIN_SPEC, 3,600 documents: a shifted domain for continued pretraining. Same lexicon and
                     word classes (the default corpus' tokenizer fits it), but another shared word ranking
                     (`rank_seed`: common words become rare), the pattern preference reversed (`pattern_zipf`
                     < 0: long sentences are common) and shorter paragraphs. Its log p is exact as well.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Iterator

import numpy as np

from llm_jax.files import write_text_atomic, written_with

DEFAULT_N_DOCS = 7200  # about 4 MB of text
END_MARKS = (".", "?", "!")
END_MARK_PROBS = (0.82, 0.12, 0.06)
COMMA = ","

# Function words are real English so the text reads naturally; content words are invented.
DETERMINERS = ("the", "a", "this", "that", "every", "some", "no", "each", "its", "their")
PREPOSITIONS = ("in", "on", "of", "with", "from", "under", "over", "near", "beyond", "through",
                "across", "behind")
CONJUNCTIONS = ("and", "but", "while", "because", "so", "although")

# Class letters: D determiner, A adjective, N noun, V verb, R adverb, P preposition, C conjunction,
# "," a comma glued to the previous word.
PATTERNS = (
    "D N V D N",
    "D A N V D N",
    "D N V D A N P D N",
    "D N R V",
    "R , D N V D N",
    "D N V D N C D N V",
    "D A N V P D N",
    "D N P D N V D A N",
    "D N V , C D A N V R",
    "D A A N V R",
    "P D N , D N V D N",
    "D N V D N P D A N",
    "D A N R V D N",
    "C D N V , D N V D N",
)
PATTERN_ZIPF = 0.8


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """The knobs of the source. The lexicon and distributions depend only on these (not on the sample seed)."""
    n_topics: int = 12
    n_nouns: int = 1000
    n_verbs: int = 450
    n_adjectives: int = 400
    n_adverbs: int = 150
    zipf_exponent: float = 1.1
    topic_weight: float = 0.6       # share of a content word's probability that comes from the topic's own Zipf
    q_paragraph: float = 0.35       # mean 1/q paragraphs per document
    q_sentence: float = 0.25        # mean 1/q sentences per paragraph
    lexicon_seed: int = 1234
    pattern_zipf: float = PATTERN_ZIPF  # p(pattern i) ∝ (i+1)^-pattern_zipf; negative favours the later patterns
    rank_seed: int = 0              # 0: content words' shared Zipf ranking is lexicon order; else a permutation
                                    # drawn from this seed (the words stay, their frequencies move)

    def as_dict(self) -> dict:
        """The spec as cache identity. Fields added after the first corpus are left out at their defaults, so
        the default corpus' identity (cache keys, its stats file) is what it always was."""
        d = dataclasses.asdict(self)
        for name in _LATER_FIELDS:
            if d[name] == _FIELD_DEFAULTS[name]:
                del d[name]
        return d


_LATER_FIELDS = ("pattern_zipf", "rank_seed")
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SourceSpec)}


DEFAULT_SPEC = SourceSpec()
DOMAIN_SPEC = SourceSpec(q_paragraph=0.5, q_sentence=0.35, pattern_zipf=-0.8, rank_seed=1)
CONTENT_CLASSES = "ANVR"


@dataclasses.dataclass(frozen=True)
class Source:
    spec: SourceSpec
    classes: str                          # class letters, index = class id
    words: dict[str, tuple[str, ...]]     # class letter -> its words
    log_probs: dict[str, np.ndarray]      # class letter -> (n_topics, n_words) log p(word | class, topic)
    word_index: dict[str, tuple[str, int]]  # word -> (class letter, index)
    pattern_classes: tuple[tuple[str, ...], ...]
    pattern_log_probs: np.ndarray         # (n_patterns,)

    @property
    def lexicon_size(self) -> int:
        return len(self.word_index)


def _invent_words(rng: np.random.Generator, n: int, suffixes: tuple[str, ...], taken: set[str]) -> tuple[str, ...]:
    """Pronounceable invented words (consonant-vowel syllables plus a class-flavoured suffix), all new."""
    onsets = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "st",
              "tr", "pl", "sh", "th", "ch", "gr")
    vowels = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
    codas = ("", "", "", "n", "r", "l", "s", "m", "nd", "st")
    out: list[str] = []
    while len(out) < n:
        n_syllables = int(rng.choice([1, 2, 2, 3]))
        word = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))]
                       for _ in range(n_syllables))
        word += codas[rng.integers(len(codas))] + suffixes[rng.integers(len(suffixes))]
        if word not in taken:
            taken.add(word)
            out.append(word)
    return tuple(out)


def _zipf_log_probs(n: int, exponent: float) -> np.ndarray:
    log_w = -exponent * np.log(np.arange(1, n + 1))
    return log_w - np.logaddexp.reduce(log_w)


@functools.lru_cache(maxsize=8)
def build_source(spec: SourceSpec = DEFAULT_SPEC) -> Source:
    rng = np.random.default_rng(spec.lexicon_seed)
    taken = set(DETERMINERS + PREPOSITIONS + CONJUNCTIONS)
    words = {"D": DETERMINERS, "P": PREPOSITIONS, "C": CONJUNCTIONS}
    words["N"] = _invent_words(rng, spec.n_nouns, ("", "", "a", "o", "et", "ik"), taken)
    words["V"] = _invent_words(rng, spec.n_verbs, ("s", "es", "ed"), taken)
    words["A"] = _invent_words(rng, spec.n_adjectives, ("ish", "ous", "al", "y"), taken)
    words["R"] = _invent_words(rng, spec.n_adverbs, ("ly",), taken)

    log_probs = {}
    for cls, class_words in words.items():
        n = len(class_words)
        base = _zipf_log_probs(n, spec.zipf_exponent)
        if cls in CONTENT_CLASSES and spec.rank_seed:
            # Its own generator: the lexicon generator's draws (words, topic rankings) stay as they are.
            rank_rng = np.random.default_rng([spec.rank_seed, CONTENT_CLASSES.index(cls)])
            base = base[rank_rng.permutation(n)]
        if cls in CONTENT_CLASSES:
            # Each topic favours its own ranking of the class, mixed with the shared ranking, so topics
            # overlap like real subject matter does and the topic is learnable from context.
            topic_rank = np.stack([rng.permutation(n) for _ in range(spec.n_topics)])  # (K, n)
            topic_lp = base[topic_rank]
            mixed = np.logaddexp(np.log1p(-spec.topic_weight) + base[None, :],
                                 np.log(spec.topic_weight) + topic_lp)
        else:
            mixed = np.broadcast_to(base, (spec.n_topics, n))
        log_probs[cls] = np.ascontiguousarray(mixed)

    word_index = {w: (cls, i) for cls, class_words in words.items() for i, w in enumerate(class_words)}
    if len(word_index) != sum(len(v) for v in words.values()):
        raise AssertionError("word classes overlap: a rendered word would have two derivations")
    pattern_classes = tuple(tuple(p.split()) for p in PATTERNS)
    if len(set(pattern_classes)) != len(pattern_classes):
        raise AssertionError("two patterns share a class sequence: the pattern would not be recoverable")
    return Source(spec=spec, classes="DANVRPC,", words=words, log_probs=log_probs, word_index=word_index,
                  pattern_classes=pattern_classes,
                  pattern_log_probs=_zipf_log_probs(len(PATTERNS), spec.pattern_zipf))


def _geometric_log_pmf(k: np.ndarray, q: float) -> np.ndarray:
    """log P(K = k) for K ~ Geometric(q) on {1, 2, ...}."""
    return (k - 1) * np.log1p(-q) + np.log(q)


def generate_documents(n_docs: int, seed: int = 0, spec: SourceSpec = DEFAULT_SPEC) -> list[tuple[str, float]]:
    """Samples `n_docs` documents; returns (text, log p(text) in nats). Deterministic given seed and spec."""
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    if n_docs == 0:
        return []
    src = build_source(spec)
    rng = np.random.default_rng(seed)
    K = spec.n_topics
    topic_d = rng.integers(K, size=n_docs)
    n_paras_d = rng.geometric(spec.q_paragraph, size=n_docs)
    para_doc_p = np.repeat(np.arange(n_docs), n_paras_d)
    n_sents_p = rng.geometric(spec.q_sentence, size=len(para_doc_p))
    sent_para_s = np.repeat(np.arange(len(para_doc_p)), n_sents_p)
    sent_doc_s = para_doc_p[sent_para_s]
    n_sents = len(sent_doc_s)
    pattern_s = rng.choice(len(PATTERNS), size=n_sents, p=np.exp(src.pattern_log_probs))
    mark_s = rng.choice(len(END_MARKS), size=n_sents, p=END_MARK_PROBS)

    # Flatten every sentence's class sequence into slots.
    pattern_len = np.array([len(p) for p in src.pattern_classes])
    pattern_cls = [np.array([src.classes.index(c) for c in p]) for p in src.pattern_classes]
    n_slots_s = pattern_len[pattern_s]
    slot_sent = np.repeat(np.arange(n_sents), n_slots_s)
    slot_start_s = np.concatenate([[0], np.cumsum(n_slots_s)[:-1]])
    slot_pos = np.arange(len(slot_sent)) - slot_start_s[slot_sent]
    class_table = np.full((len(PATTERNS), pattern_len.max()), -1)
    for i, cls in enumerate(pattern_cls):
        class_table[i, :len(cls)] = cls
    slot_cls = class_table[pattern_s[slot_sent], slot_pos]
    slot_doc = sent_doc_s[slot_sent]
    slot_topic = topic_d[slot_doc]

    slot_word = np.empty(len(slot_sent), dtype=object)
    word_ll_dk = np.zeros((n_docs, K))  # Σ log p(word | class, topic) for every topic
    for c_id, cls in enumerate(src.classes):
        idx = np.flatnonzero(slot_cls == c_id)
        if cls == COMMA:
            slot_word[idx] = COMMA
            continue
        lp_kv = src.log_probs[cls]
        # Inverse-CDF sampling for all topics at once: topic t's CDF is shifted into [t, t+1].
        cdf = np.cumsum(np.exp(lp_kv), axis=1)
        cdf /= cdf[:, -1:]
        shifted = (cdf + np.arange(K)[:, None]).ravel()
        u = rng.random(len(idx))
        flat = np.searchsorted(shifted, slot_topic[idx] + u, side="right")
        w = np.minimum(flat - slot_topic[idx] * lp_kv.shape[1], lp_kv.shape[1] - 1)
        slot_word[idx] = np.asarray(src.words[cls], dtype=object)[w]
        np.add.at(word_ll_dk, slot_doc[idx], lp_kv[:, w].T)

    marginal_d = np.logaddexp.reduce(word_ll_dk - np.log(K), axis=1)
    structure_d = _geometric_log_pmf(n_paras_d, spec.q_paragraph)
    structure_d += np.bincount(para_doc_p, _geometric_log_pmf(n_sents_p, spec.q_sentence), minlength=n_docs)
    sent_ll = src.pattern_log_probs[pattern_s] + np.log(np.asarray(END_MARK_PROBS))[mark_s]
    structure_d += np.bincount(sent_doc_s, sent_ll, minlength=n_docs)
    log_p_d = marginal_d + structure_d

    texts = _render(slot_word, slot_start_s, n_slots_s, mark_s, sent_para_s, para_doc_p, n_docs)
    return list(zip(texts, log_p_d.tolist()))


def _render(slot_word, slot_start_s, n_slots_s, mark_s, sent_para_s, para_doc_p, n_docs) -> list[str]:
    sentences = []
    for start, n, mark in zip(slot_start_s.tolist(), n_slots_s.tolist(), mark_s.tolist()):
        sentences.append(_render_sentence(slot_word[start:start + n].tolist(), END_MARKS[mark]))
    paragraphs = [[] for _ in range(len(para_doc_p))]
    for s, p in zip(sentences, sent_para_s.tolist()):
        paragraphs[p].append(s)
    docs = [[] for _ in range(n_docs)]
    for para, d in zip(paragraphs, para_doc_p.tolist()):
        docs[d].append(" ".join(para))
    return ["\n\n".join(d) for d in docs]


def _render_sentence(words: list[str], end_mark: str) -> str:
    text = " ".join(words).replace(" ,", ",")
    return text[0].upper() + text[1:] + end_mark


def score_document(text: str, spec: SourceSpec = DEFAULT_SPEC) -> float:
    """log p(text) in nats, found by parsing the text back into its unique derivation.

    Raises ValueError if the text is not something the source can emit.
    """
    src = build_source(spec)
    pattern_id = {p: i for i, p in enumerate(src.pattern_classes)}
    K = spec.n_topics
    word_ll_k = np.zeros(K)
    structure = 0.0
    paragraphs = text.split("\n\n")
    structure += float(_geometric_log_pmf(np.array(len(paragraphs)), spec.q_paragraph))
    rendered_paragraphs = []
    for para in paragraphs:
        tokens = para.split(" ")
        sentences: list[tuple[list[str], str]] = []
        current: list[str] = []
        for tok in tokens:
            if not tok:
                raise ValueError(f"empty token in paragraph {para[:60]!r}")
            mark = tok[-1] if tok[-1] in END_MARKS else None
            if mark:
                tok = tok[:-1]
            comma = tok.endswith(COMMA)
            if comma:
                tok = tok[:-1]
            if not current:
                if not tok[:1].isupper():
                    raise ValueError(f"sentence does not start with a capital: {tok!r}")
                tok = tok[0].lower() + tok[1:]
            current.append(tok)
            if comma:
                current.append(COMMA)
            if mark:
                sentences.append((current, mark))
                current = []
        if current or not sentences:
            raise ValueError(f"paragraph does not end with a sentence mark: {para[-60:]!r}")
        structure += float(_geometric_log_pmf(np.array(len(sentences)), spec.q_sentence))
        for words, mark in sentences:
            classes = []
            for w in words:
                if w == COMMA:
                    classes.append(COMMA)
                    continue
                if w not in src.word_index:
                    raise ValueError(f"unknown word {w!r}")
                cls, i = src.word_index[w]
                classes.append(cls)
                word_ll_k += src.log_probs[cls][:, i]
            pid = pattern_id.get(tuple(classes))
            if pid is None:
                raise ValueError(f"no pattern has the class sequence {' '.join(classes)!r}")
            structure += float(src.pattern_log_probs[pid]) + float(np.log(END_MARK_PROBS[END_MARKS.index(mark)]))
        rendered_paragraphs.append(" ".join(_render_sentence(w, m) for w, m in sentences))
    if "\n\n".join(rendered_paragraphs) != text:
        raise ValueError("text does not re-render to itself; it is not a document of this source")
    return float(np.logaddexp.reduce(word_ll_k - np.log(K))) + structure


def default_corpus_dir() -> str:
    return os.environ.get("LLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm_jax")


CORPUS_FILE = "default_corpus.jsonl"
STATS_FILE = "default_corpus_stats.json"
DOMAIN_N_DOCS = 3600


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus:
    """One rendered corpus of this module: the data spec that names it, its source, seed and files."""
    name: str
    spec: SourceSpec
    seed: int
    file: str
    stats_file: str
    n_docs_name: str      # the module constant holding its size, read at call time so tests can shrink it

    @property
    def n_docs(self) -> int:
        return globals()[self.n_docs_name]

    def identity(self) -> list:
        """What a tokenized-corpus cache key needs to know about it."""
        return [self.name, self.seed, self.n_docs, self.spec.as_dict()]


CORPORA = {c.name: c for c in (
    EmbeddedCorpus("default", DEFAULT_SPEC, 0, CORPUS_FILE, STATS_FILE, "DEFAULT_N_DOCS"),
    EmbeddedCorpus("default:domain", DOMAIN_SPEC, 1, "default_domain_corpus.jsonl",
                   "default_domain_corpus_stats.json", "DOMAIN_N_DOCS"),
)}


def embedded_corpus(spec_part: str) -> EmbeddedCorpus | None:
    """The embedded corpus a data spec part names (`default`, `default:domain`), or None for anything else."""
    return CORPORA.get(spec_part)


def write_default_corpus(directory: str, n_docs: int | None = None, seed: int = 0) -> str:
    """Renders the corpus to `<directory>/default_corpus.jsonl` (+ stats); skips the work if already there.

    n_docs defaults to DEFAULT_N_DOCS, read at call time so that tests can shrink the corpus.
    """
    return write_corpus(directory, CORPORA["default"], n_docs, seed)


def write_corpus(directory: str, corpus: EmbeddedCorpus, n_docs: int | None = None, seed: int | None = None) -> str:
    """Renders an embedded corpus to `<directory>/<corpus.file>` (+ stats); skips the work if already there."""
    n_docs = corpus.n_docs if n_docs is None else n_docs
    seed = corpus.seed if seed is None else seed
    spec = corpus.spec
    os.makedirs(directory, exist_ok=True)
    corpus_path = os.path.join(directory, corpus.file)
    stats_path = os.path.join(directory, corpus.stats_file)
    wanted = dict(n_docs=n_docs, seed=seed, spec=spec.as_dict())
    if written_with([corpus_path], stats_path, wanted):
        return corpus_path
    docs = generate_documents(n_docs, seed, spec)
    lines = "".join(json.dumps({"text": t, "log_prob": lp}) + "\n" for t, lp in docs)
    n_chars = sum(len(t) for t, _ in docs)
    total_nats = -sum(lp for _, lp in docs)
    src = build_source(spec)
    stats = dict(wanted, n_chars=n_chars, total_nats=total_nats,
                 nats_per_char=total_nats / max(n_chars, 1),
                 n_topics=spec.n_topics, lexicon_size=src.lexicon_size)
    # The corpus first, the stats last: stats present means the corpus beside it is complete.
    write_text_atomic(corpus_path, lines)
    write_text_atomic(stats_path, json.dumps(stats, indent=1) + "\n")
    return corpus_path


def iter_default_corpus_records(n_docs: int | None = None, seed: int = 0,
                                directory: str | None = None) -> Iterator[dict]:
    """Yields {"text", "log_prob"} per document of the default corpus, rendering it on first use."""
    return iter_corpus_records(CORPORA["default"], n_docs, seed, directory)


def iter_corpus_records(corpus: EmbeddedCorpus, n_docs: int | None = None, seed: int | None = None,
                        directory: str | None = None) -> Iterator[dict]:
    """Yields {"text", "log_prob"} per document of an embedded corpus, rendering it on first use."""
    path = write_corpus(directory or default_corpus_dir(), corpus, n_docs=n_docs, seed=seed)
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
