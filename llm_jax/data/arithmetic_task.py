"""The embedded arithmetic task: multi-digit addition, graded exactly, where writing the steps helps.

RL with verifiable rewards (GRPO, RLOO, ...) needs prompts a checker grades exactly and on which a small model is
only partly right, so that reward separates its samples; and the question "does a model need tokens to think"
needs a task whose answer can be reached step by step. Addition of multi-digit numbers is both: the most
significant digit of the sum depends on every carry below it, which an answer written first-digit-first must
work out silently, while a model that writes the columns from the least significant one up only ever adds two
digits and a carry. Like the default task (default_task.py) it is generated, deterministic in its seed, and
nothing ships.

Prompts. `"<a>+<b>"`, two operands whose digit counts are drawn uniformly from MIN_DIGITS..MAX_DIGITS (2-4)
and whose values are then uniform over that many digits (no leading zeros), e.g. "347+285", "1206+58".

Responses, two variants of the same demonstration (`VARIANTS`; the spec `arithmetic_task` is `steps`,
`arithmetic_task:direct` the other):

    steps   the columns least significant first, each "<terms>=<sum>" where the terms are the operands' digits
            of that column (those that have one) and the carry in when it is 1; then ", so <answer>":
                347+285   ->  7+5=12, 4+8+1=13, 3+2+1=6, so 632
                1206+58   ->  6+8=14, 0+5+1=6, 2=2, 1=1, so 1264
                999+1     ->  9+1=10, 9+1=10, 9+1=10, so 1000
    direct  the answer alone: "632"

The answer is the response's last number, so `numeric_match` (eval/judges.py) grades both variants against the
record's `reference`: a column sum is at most 19 and every answer at least 20, so a steps response cut off
before its answer is never graded right by accident.

Tokens. The default corpus holds no digits, so the tokenizer trained on it (2048 pieces, byte fallback) writes
every digit, "+" and "=" as one byte piece each: "347+285" is ▁ 3 4 7 + 2 8 5, one piece per digit as
sentencepiece's split_digits would give, never a merged number, and it decodes back exactly. Those pieces are
new to the pretrained model (SFT learns their embeddings); "so" and "," are corpus pieces. A steps response of
two 4-digit operands is about 45 pieces, a direct one at most 6.

Records. Prompt records are `{"prompt": "347+285", "reference": "632"}`, as the judges read them
(records.prompt_record); SFT records `{"prompt", "response", "reference"}`. Index i of the sft files of both
variants is the same prompt, so the variants differ in the responses only.

Splits. A prompt belongs to the eval split iff the blake2b hash of its unordered operand pair falls in the first
EVAL_PERCENT percent of buckets, and each split rejects the other's prompts: no held-out sum is trained on, in
either order ("285+347" is held out with "347+285"). Record i of a file is a pure function of (seed, file, i).

Files. `write_arithmetic_task(directory)` writes under `<directory>/arithmetic_task/` (the default corpus'
cache dir by default), one JSON object a line, DEFAULT_SIZES records each:

    sft_{train,eval}.jsonl          the steps demonstrations
    sft_direct_{train,eval}.jsonl   the same prompts, the answers alone
    prompts_{train,eval}.jsonl      prompt records (for generate, RL, evaluations during training)
    arithmetic_task_stats.json      parameters, counts, response lengths and `baseline_scores()`

`task_file(kind, split, variant)` is the file a record spec names (data/post_training.py `resolve_spec`:
`arithmetic_task`, `arithmetic_task:direct`), `iter_records(name)` yields the same records without files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterator

import numpy as np

from llm_jax.data.default_corpus import default_corpus_dir
from llm_jax.files import write_text_atomic, written_with

MIN_DIGITS, MAX_DIGITS = 2, 4
EVAL_PERCENT = 10
VARIANTS = ("steps", "direct")
DEFAULT_VARIANT = "steps"
KINDS = ("sft", "prompts")  # no preference pairs: a verifiable task is graded, not ranked
SPLITS = ("train", "eval")
DEFAULT_SIZES = {"sft_train": 40_000, "sft_eval": 500, "prompts_train": 4_096, "prompts_eval": 512}
TASK_DIR = "arithmetic_task"
STATS_FILE = "arithmetic_task_stats.json"
# Bump when the generated records change, so that caches written by an older version are regenerated.
VERSION = 1

_STREAMS = {"sft": 0, "prompts": 1}
_PROMPT_RE = re.compile(r"(0|[1-9]\d*)\+(0|[1-9]\d*)")


# ----------------------------------------------------------------------------------------------- answers

def parse_prompt(prompt: str) -> tuple[int, int]:
    """"347+285" -> (347, 285); ValueError naming the prompt if malformed."""
    match = _PROMPT_RE.fullmatch(prompt) if isinstance(prompt, str) else None
    if match is None:
        raise ValueError(f"malformed arithmetic-task prompt {prompt!r}: expected '<a>+<b>' (decimal integers "
                         "without spaces or leading zeros)")
    return int(match.group(1)), int(match.group(2))


def columns(a: int, b: int) -> list[tuple[list[int], int]]:
    """(terms, sum) of each column of a + b, least significant first: the digits of the operands that reach the
    column, then the carry in when it is 1."""
    da, db = [int(c) for c in reversed(str(a))], [int(c) for c in reversed(str(b))]
    out, carry = [], 0
    for i in range(max(len(da), len(db))):
        terms = [d[i] for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        out.append((terms, sum(terms)))
        carry = sum(terms) // 10
    return out


def demonstration(prompt: str, variant: str = DEFAULT_VARIANT) -> str:
    """The response of `variant` (module docstring) to `prompt`; it ends with the answer."""
    a, b = parse_prompt(prompt)
    if variant == "direct":
        return str(a + b)
    if variant != "steps":
        raise ValueError(f"unknown arithmetic-task variant {variant!r}; known: {list(VARIANTS)}")
    steps = ", ".join("+".join(map(str, terms)) + f"={total}" for terms, total in columns(a, b))
    return f"{steps}, so {a + b}"


def gold_answer(prompt: str) -> str:
    """The sum the prompt asks for, as written in a record's `reference`."""
    a, b = parse_prompt(prompt)
    return str(a + b)


# -------------------------------------------------------------------------------------------- generation

def split_of(a: int, b: int) -> str:
    """The split of the prompt a+b, the same for b+a."""
    key = f"{min(a, b)}+{max(a, b)}".encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % 100
    return "eval" if bucket < EVAL_PERCENT else "train"


def _rng(seed: int, stream: str, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng((seed, _STREAMS[stream], SPLITS.index(split), index))


def _operand(rng: np.random.Generator) -> int:
    n = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    return int(rng.integers(10 ** (n - 1), 10 ** n))


def _draw_prompt(rng: np.random.Generator, split: str) -> str:
    while True:  # rejection: about 1.1 draws for train, 10 for eval
        a, b = _operand(rng), _operand(rng)
        if split_of(a, b) == split:
            return f"{a}+{b}"


def sft_example(index: int, split: str = "train", seed: int = 0, variant: str = DEFAULT_VARIANT) -> dict:
    prompt = _draw_prompt(_rng(seed, "sft", split, index), split)
    return {"prompt": prompt, "response": demonstration(prompt, variant), "reference": gold_answer(prompt)}


def task_prompt(index: int, split: str = "train", seed: int = 0) -> dict:
    prompt = _draw_prompt(_rng(seed, "prompts", split, index), split)
    return {"prompt": prompt, "reference": gold_answer(prompt)}


def file_name(kind: str, split: str, variant: str = DEFAULT_VARIANT) -> str:
    """The name (without .jsonl) of the file of `kind` ("sft", "prompts"), `split` and `variant`; prompts are the
    same for every variant."""
    if kind not in KINDS:
        raise ValueError(f"the arithmetic task has no {kind!r} records; it has {list(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown arithmetic-task variant {variant!r}; known: {list(VARIANTS)}")
    return f"sft_{variant}_{split}" if kind == "sft" and variant != DEFAULT_VARIANT else f"{kind}_{split}"


FILES = tuple(dict.fromkeys(file_name(k, s, v) for k in KINDS for v in VARIANTS for s in SPLITS))


def iter_records(name: str, n: int | None = None, seed: int = 0) -> Iterator[dict]:
    """The records of `<name>.jsonl` (one of FILES, e.g. "sft_direct_train"): n of them, the size of its kind and
    split in DEFAULT_SIZES by default."""
    if name not in FILES:
        raise ValueError(f"unknown arithmetic-task file {name!r}; known: {list(FILES)}")
    kind, *variant, split = name.split("_")
    size_key = f"{kind}_{split}"
    for i in range(DEFAULT_SIZES[size_key] if n is None else n):
        if kind == "sft":
            yield sft_example(i, split, seed, variant[0] if variant else DEFAULT_VARIANT)
        else:
            yield task_prompt(i, split, seed)


# -------------------------------------------------------------------------------------------- baselines

def _without_carries(a: int, b: int) -> int:
    out, place = 0, 1
    while a or b:
        out, a, b, place = out + (a % 10 + b % 10) % 10 * place, a // 10, b // 10, place * 10
    return out


def baseline_scores(n: int | None = None, seed: int = 0) -> dict[str, float]:
    """Accuracy on the eval prompts of a policy that adds each column's digits mod 10 and drops every carry: right
    exactly on the sums without a carry, the floor a trained policy must beat (a guess of a number is right with
    probability near 0)."""
    policies = {"no_carry": _without_carries}
    records = list(iter_records("prompts_eval", n, seed))
    hits = dict.fromkeys(policies, 0)
    for record in records:
        a, b = parse_prompt(record["prompt"])
        for name, policy in policies.items():
            hits[name] += policy(a, b) == a + b
    return {name: h / max(len(records), 1) for name, h in hits.items()}


# ------------------------------------------------------------------------------------------------ files

def write_arithmetic_task(directory: str | None = None, seed: int = 0,
                          sizes: dict[str, int] | None = None) -> dict[str, str]:
    """Writes the task files under `<directory>/arithmetic_task/` (the default corpus' cache dir by default).

    Returns {name: path} for every file of FILES and "stats". `sizes` overrides DEFAULT_SIZES (keyed by kind and
    split: both variants of sft_train have sizes["sft_train"] records). Skips the work when the stats file beside
    them says they were written with the same seed, sizes and version.
    """
    sizes = dict(DEFAULT_SIZES, **(sizes or {}))
    if set(sizes) != set(DEFAULT_SIZES):
        raise ValueError(f"unknown arithmetic-task sizes {sorted(set(sizes) - set(DEFAULT_SIZES))}; "
                         f"known: {list(DEFAULT_SIZES)}")
    task_dir = os.path.join(directory or default_corpus_dir(), TASK_DIR)
    os.makedirs(task_dir, exist_ok=True)
    paths = {name: os.path.join(task_dir, f"{name}.jsonl") for name in FILES}
    paths["stats"] = os.path.join(task_dir, STATS_FILE)
    wanted = dict(version=VERSION, seed=seed, sizes=sizes, digits=[MIN_DIGITS, MAX_DIGITS],
                  eval_percent=EVAL_PERCENT)
    if written_with(paths.values(), paths["stats"], wanted):
        return paths
    response_chars = {}
    for name in FILES:
        kind, split = name.split("_")[0], name.split("_")[-1]
        rows = list(iter_records(name, sizes[f"{kind}_{split}"], seed))
        write_text_atomic(paths[name], "".join(json.dumps(r) + "\n" for r in rows))
        if kind == "sft" and split == "train":
            lengths = [len(r["response"]) for r in rows]
            response_chars[name] = dict(mean=float(np.mean(lengths)), max=max(lengths))
    # The stats last: present and matching means the files beside them are complete.
    stats = dict(wanted, response_chars=response_chars, baselines=baseline_scores(sizes["prompts_eval"], seed))
    write_text_atomic(paths["stats"], json.dumps(stats, indent=1) + "\n")
    return paths


def task_file(kind: str, split: str, variant: str = DEFAULT_VARIANT) -> str:
    """The path of the file of `kind`, `split` and `variant` in the default cache dir, written on first use: what
    the record specs `arithmetic_task[:variant]` name (data/post_training.py)."""
    return write_arithmetic_task()[file_name(kind, split, variant)]
