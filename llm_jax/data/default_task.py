"""The embedded default task: word-list transformations whose answers a program scores exactly.

Post-training (SFT, reward model, DPO, PPO, rejection sampling) needs a task whose quality is known
without a human: this one is generated, like the default corpus, and nothing ships.

Task. A prompt names a task and a list of 2-5 distinct words; the response is the transformed list,
words separated by single spaces:

    copy, vaplem bru sia              ->  vaplem bru sia
    reverse, zuma gaiet choo kear     ->  kear choo gaiet zuma
    first, plia tus                   ->  plia
    last, dai romo zisa sia bru       ->  bru

The task is uniform over TASKS, the length uniform over 2..5, the words drawn without replacement from
TASK_WORDS: the 48 commonest nouns of the default corpus (the head of its shared Zipf ranking), so a
tokenizer trained on the corpus encodes each as one piece the pretrained model knows well. Every character
of a prompt or a response occurs in the corpus, so no task text needs byte-fallback pieces (this is why
the separator is a comma and not a colon, which the corpus never uses).

Gold score. `gold_score(prompt, response)` splits the response on whitespace into words r and compares
them with the gold answer g position by position:

    score = #{i : r_i == g_i} / max(|g|, |r|)        in [0, 1], 1.0 exactly for the gold answer

so a wrong word costs 1/|g|, a missing or extra word costs as much, and a shifted tail costs every word
after the shift. E.g. for "reverse, a b c d" (gold "d c b a"): "c d b a" 0.5, "d c b" 0.75,
"d c b a a" 0.8, "a b c d" 0.0. A prompt not of the form above raises ValueError naming it.

Demonstrations (SFT records). A train demonstration is the gold answer, except with probability
SFT_NOISE a corruption of it (the operators below): demonstrations are imperfect, as human-written ones
are, and preferences then carry what the demonstrations lack, which is the premise of RLHF (Ouyang et al.
2022). A policy that imitates them well answers right at temperature 0 (the gold answer is every prompt's
mode) but reproduces the corruptions when it samples; the reward model, trained on pairs that rank gold
above corruptions, is what can teach it not to. Eval demonstrations are always the gold answer, so the SFT
eval loss measures the right answers.

Preference pairs (HH-RLHF shape). Two candidate responses are made from the gold answer: the first is the
gold answer itself with probability GOLD_CHOSEN_FRACTION, otherwise a corruption of it; the second is
always a corruption. A corruption applies 1-3 operators in turn (more operators, lower score: graded
severity), each picked uniformly among those that apply:

    substitute  one word -> a task word not in the prompt
    swap        two words with each other
    drop        one word (never the last one left)
    duplicate   one word, inserted again right after itself
    wrong_task  the answer of another task on the same words (first operator only)

Chosen is the candidate with the higher gold score; candidates are redrawn until the scores differ by at
least MARGIN = 0.2, which keeps every single-word error against the gold answer (1/|g| >= 0.2 for
|g| <= 5) and drops near-ties no scorer could be blamed for. The margin rejects more corrupted-vs-corrupted
draws than gold-vs-corrupted ones, so about two thirds of the chosen answers are the exact gold answer.

Edited answers (Llama 3's third preference grade). A train pair whose chosen answer is a corruption also carries
`"edited"`: the gold answer, as an annotator would edit the chosen one into shape, so the record ranks
edited > chosen > rejected (records.py; a corruption scores at most 5/6, a duplicated word in a list of five,
so the edit's gold-score gap over chosen is at least 1/6, below MARGIN only for such answers). The
eval pairs carry none: held-out accuracy is measured on the same pairs whether training used the edits or not
(`data.use_edited=False` drops them).

Splits. A prompt belongs to the eval split iff the blake2b hash of its text falls in the first
EVAL_PERCENT percent of buckets; each split rejects the other's prompts, so no eval prompt occurs in any
train file (SFT, preferences or prompts). Record i of a file is a pure function of (seed, file, i): its
numpy Generator is seeded with (seed, stream, split, i).

Files. `write_default_task(directory)` writes under `<directory>/default_task/`, one JSON object a line:

    sft_{train,eval}.jsonl          {"prompt": str, "response": str}               (the gold answer)
    preferences_{train,eval}.jsonl  {"prompt": str, "chosen": str, "rejected": str[, "edited": str (train)]}
    prompts_{train,eval}.jsonl      {"prompt": str, "task": str}                   (for PPO, rejection sampling)
    default_task_stats.json         the parameters, record counts and `baseline_scores()`

with DEFAULT_SIZES records each. `iter_records(name)` yields the same records without files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Callable, Iterator

import numpy as np

from llm_jax.data.default_corpus import build_source, default_corpus_dir
from llm_jax.files import write_text_atomic, written_with

TASKS = ("copy", "reverse", "first", "last")
N_TASK_WORDS = 48
# The shared Zipf ranking of the corpus puts the commonest nouns first: they are whole tokenizer pieces.
TASK_WORDS = build_source().words["N"][:N_TASK_WORDS]
MIN_WORDS, MAX_WORDS = 2, 5
MARGIN = 0.2
GOLD_CHOSEN_FRACTION = 0.5
SFT_NOISE = 0.3  # the fraction of train demonstrations that are corruptions (module docstring)
MAX_CORRUPTIONS = 3
EVAL_PERCENT = 10
DEFAULT_SIZES = {
    "sft_train": 20_000, "sft_eval": 1_000,
    "preferences_train": 20_000, "preferences_eval": 1_000,
    "prompts_train": 4_096, "prompts_eval": 512,
}
TASK_DIR = "default_task"
STATS_FILE = "default_task_stats.json"
# Bump when the generated records change, so that caches written by an older version are regenerated.
VERSION = 3

_STREAMS = {"sft": 0, "preferences": 1, "prompts": 2}
_SPLITS = {"train": 0, "eval": 1}
_PROMPT_RE = re.compile(r"([a-z]+), ([a-z]+(?: [a-z]+)*)")
# Scores are ratios of small integers: compare them with a little slack so 1 - 0.8 counts as 0.2.
_EPS = 1e-9


# ---------------------------------------------------------------------------------------------- scoring

def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """"reverse, a b c" -> ("reverse", ["a", "b", "c"]); ValueError naming the prompt if malformed."""
    if not isinstance(prompt, str):
        raise ValueError(f"default-task prompt must be a string, got {type(prompt).__name__}: {prompt!r}")
    match = _PROMPT_RE.fullmatch(prompt)
    if match is None:
        raise ValueError(f"malformed default-task prompt {prompt!r}: expected '<task>, <word> <word> ...' "
                         f"(lowercase words, single spaces) with task one of {list(TASKS)}")
    task, words = match.group(1), match.group(2).split(" ")
    if task not in TASKS:
        raise ValueError(f"default-task prompt {prompt!r} names unknown task {task!r}; known: {list(TASKS)}")
    return task, words


def _answer(task: str, words: list[str]) -> list[str]:
    if task == "copy":
        return list(words)
    if task == "reverse":
        return words[::-1]
    if task == "first":
        return words[:1]
    return words[-1:]


def _score(gold: list[str], response: list[str]) -> float:
    hits = sum(r == g for r, g in zip(response, gold))
    return hits / max(len(gold), len(response))


def gold_answer(prompt: str) -> str:
    """The correct response to `prompt`: its words transformed by its task, joined by single spaces."""
    return " ".join(_answer(*parse_prompt(prompt)))


def gold_score(prompt: str, response: str) -> float:
    """Position-wise word matches over max(len(gold), len(response words)); 1.0 exactly for the gold answer."""
    if not isinstance(response, str):
        raise ValueError(f"response to {prompt!r} must be a string, got {type(response).__name__}")
    return _score(_answer(*parse_prompt(prompt)), response.split())


# ------------------------------------------------------------------------------------------- generation

def _split_of(prompt: str) -> str:
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little") % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


def _rng(seed: int, stream: str, split: str, index: int) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng((seed, _STREAMS[stream], _SPLITS[split], index))


def _draw_prompt(rng: np.random.Generator, split: str) -> tuple[str, str, list[str]]:
    while True:  # rejection: about 1.1 draws for train, 10 for eval
        task = TASKS[rng.integers(len(TASKS))]
        n = int(rng.integers(MIN_WORDS, MAX_WORDS + 1))
        words = [TASK_WORDS[i] for i in rng.choice(N_TASK_WORDS, size=n, replace=False)]
        prompt = f"{task}, {' '.join(words)}"
        if _split_of(prompt) == split:
            return prompt, task, words


# A corruption operator maps (candidate words, prompt task, prompt words, rng) to new words, or None when
# it does not apply (then another operator is drawn).
def _substitute(cand, task, words, rng):
    outside = [w for w in TASK_WORDS if w not in words]
    out = list(cand)
    out[rng.integers(len(out))] = outside[rng.integers(len(outside))]
    return out


def _swap(cand, task, words, rng):
    pairs = [(i, j) for i in range(len(cand)) for j in range(i + 1, len(cand)) if cand[i] != cand[j]]
    if not pairs:
        return None
    i, j = pairs[rng.integers(len(pairs))]
    out = list(cand)
    out[i], out[j] = out[j], out[i]
    return out


def _drop(cand, task, words, rng):
    if len(cand) < 2:
        return None
    i = rng.integers(len(cand))
    return cand[:i] + cand[i + 1:]


def _duplicate(cand, task, words, rng):
    i = rng.integers(len(cand))
    return cand[:i + 1] + cand[i:]


def _wrong_task(cand, task, words, rng):
    others = [t for t in TASKS if _answer(t, words) != _answer(task, words)]
    return _answer(others[rng.integers(len(others))], words)


CORRUPTIONS: dict[str, Callable] = {"substitute": _substitute, "swap": _swap, "drop": _drop,
                                    "duplicate": _duplicate, "wrong_task": _wrong_task}


def corrupt(rng: np.random.Generator, task: str, words: list[str]) -> list[str]:
    """The gold answer of (task, words) with 1-3 corruption operators applied (module docstring)."""
    cand = _answer(task, words)
    for k in range(int(rng.integers(1, MAX_CORRUPTIONS + 1))):
        names = [n for n in CORRUPTIONS if n != "wrong_task" or k == 0]  # another task's answer, then its errors
        while (out := CORRUPTIONS[names[rng.integers(len(names))]](cand, task, words, rng)) is None:
            pass
        cand = out
    return cand


def sft_example(index: int, split: str = "train", seed: int = 0) -> dict:
    rng = _rng(seed, "sft", split, index)
    prompt, task, words = _draw_prompt(rng, split)
    noisy = split == "train" and rng.random() < SFT_NOISE
    return {"prompt": prompt, "response": " ".join(corrupt(rng, task, words) if noisy else _answer(task, words))}


def preference_pair(index: int, split: str = "train", seed: int = 0) -> dict:
    rng = _rng(seed, "preferences", split, index)
    prompt, task, words = _draw_prompt(rng, split)
    gold = _answer(task, words)
    for _ in range(1000):  # a gold-vs-substitution pair always clears the margin: a few draws suffice
        a = gold if rng.random() < GOLD_CHOSEN_FRACTION else corrupt(rng, task, words)
        b = corrupt(rng, task, words)
        score_a, score_b = _score(gold, a), _score(gold, b)
        if abs(score_a - score_b) >= MARGIN - _EPS:
            chosen, rejected = (a, b) if score_a > score_b else (b, a)
            record = {"prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)}
            if split == "train" and chosen != gold:  # the annotator's edit of a flawed chosen answer
                record["edited"] = " ".join(gold)
            return record
    raise AssertionError(f"no pair with gold-score margin {MARGIN} for {prompt!r}")


def task_prompt(index: int, split: str = "train", seed: int = 0) -> dict:
    prompt, task, _ = _draw_prompt(_rng(seed, "prompts", split, index), split)
    return {"prompt": prompt, "task": task}


_MAKERS = {"sft": sft_example, "preferences": preference_pair, "prompts": task_prompt}


def iter_records(name: str, n: int | None = None, seed: int = 0) -> Iterator[dict]:
    """The records of `<name>.jsonl` (e.g. name="sft_train"): n of them, DEFAULT_SIZES[name] by default."""
    if name not in DEFAULT_SIZES:
        raise ValueError(f"unknown default-task file {name!r}; known: {list(DEFAULT_SIZES)}")
    stream, split = name.rsplit("_", 1)
    make = _MAKERS[stream]
    for i in range(DEFAULT_SIZES[name] if n is None else n):
        yield make(i, split, seed)


# -------------------------------------------------------------------------------------------- baselines

def baseline_scores(n: int | None = None, seed: int = 0) -> dict[str, float]:
    """Mean gold score on the eval prompts of trivial policies: the floor a trained policy must beat.

    empty: the empty response. echo: the prompt's words unchanged (always right on copy).
    reverse: the prompt's words reversed. random: as many task words as the gold answer, uniformly drawn.
    """
    rng = np.random.default_rng((seed, len(_STREAMS)))  # a stream of its own
    policies = {
        "empty": lambda task, words: [],
        "echo": lambda task, words: words,
        "reverse": lambda task, words: words[::-1],
        "random": lambda task, words: [TASK_WORDS[i] for i in rng.integers(N_TASK_WORDS, size=len(
            _answer(task, words)))],
    }
    totals = dict.fromkeys(policies, 0.0)
    records = list(iter_records("prompts_eval", n, seed))
    for record in records:
        task, words = parse_prompt(record["prompt"])
        for name, policy in policies.items():
            totals[name] += gold_score(record["prompt"], " ".join(policy(task, words)))
    return {name: total / max(len(records), 1) for name, total in totals.items()}


# ------------------------------------------------------------------------------------------------ files

def write_default_task(directory: str | None = None, seed: int = 0,
                       sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Writes the task files under `<directory>/default_task/` (the default corpus' cache dir by default).

    Returns {name: path} for the six jsonl files and "stats". Skips the work when the stats file beside
    them says they were written with the same seed, sizes and version.
    """
    sizes = dict(DEFAULT_SIZES, **(sizes or {}))
    if set(sizes) != set(DEFAULT_SIZES):
        raise ValueError(f"unknown default-task sizes {sorted(set(sizes) - set(DEFAULT_SIZES))}; "
                         f"known: {list(DEFAULT_SIZES)}")
    task_dir = os.path.join(directory or default_corpus_dir(), TASK_DIR)
    os.makedirs(task_dir, exist_ok=True)
    paths = {name: os.path.join(task_dir, f"{name}.jsonl") for name in DEFAULT_SIZES}
    paths["stats"] = os.path.join(task_dir, STATS_FILE)
    wanted = dict(version=VERSION, seed=seed, sizes=sizes, words=list(TASK_WORDS), margin=MARGIN,
                  sft_noise=SFT_NOISE)
    if written_with(paths.values(), paths["stats"], wanted):
        return paths
    for name in DEFAULT_SIZES:
        write_text_atomic(paths[name], "".join(json.dumps(r) + "\n" for r in iter_records(name, sizes[name], seed)))
    # The stats last: present and matching means the files beside them are complete.
    stats = dict(wanted, baselines=baseline_scores(sizes["prompts_eval"], seed))
    write_text_atomic(paths["stats"], json.dumps(stats, indent=1) + "\n")
    return paths
