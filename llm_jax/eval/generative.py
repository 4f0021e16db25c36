"""Generative tasks: a run answers a task's prompts, k-shot, and a judge scores the answers.

    evaluate_task(run_dir, "qa.jsonl", "exact_match", k=4)                     chat: 4 demonstrations as turns
    evaluate_task(run_dir, "default_task", "gold", k=2, chat_template=False)   plain text, for a base model
    icl_curve(run_dir, "default_task", ks=(0, 1, 2, 4, 8), chat_template=False)  the score as k grows

Task. A jsonl (or parquet) of prompt records, `{"prompt": str | messages, "reference": answer (optional), ...}`
(data/records.py); every other key is kept and reaches the judge, any `load_judge` spec (eval/judges.py).
`default_task` is the embedded task's held-out prompts; a record with a "task" key and no reference gets
`default_task.gold_answer(prompt)` as its reference.

Demonstrations. Record i's k demonstrations come from the pool (a `pool` file; by default the task file's other
records): the first k of a permutation of the pool drawn by the generator seeded (seed, i). So they depend on the
seed and the record's index alone, never on how many records are evaluated or how they are batched; k < k' gives a
prefix of k''s demonstrations (a curve over k adds examples, it never swaps them); and a record is never its own
demonstration (nor is a pool record with the same prompt). Each shows its prompt and its `reference`. A k larger
than the pool is an error naming the task and the pool size.

Formats.
    chat   (chat_template=True)    the demonstrations as earlier turns (user: its prompt, assistant: its reference),
                                   then the record's own turns, rendered by the run's chat template; a system
                                   message stays first
    plain  (chat_template=False)   no template, for base models: one block per demonstration, then the prompt,

                                       <prompt>\\n<answer>\\n\\n  ...  <prompt>\\n

                                   and the answer is the generated text up to the first of the `stop` strings
                                   (default "\\n", the end of an answer line in the blocks)

Files. The rendered prompts are written as records (`prompt`: the rendering; `source`: the record as read;
`source_where`: its file:line; `shots`: its demonstrations' pool indices) and answered by
`generation_io.generate_file` with the run's chat template or without, which writes one row per prompt (its module
docstring). In plain text a row's `response` is the answer cut at the stop string, `continuation` what was
generated after it, and `stopped` says whether a stop string or an end-of-sequence id ended it. The judge reads the
record as read (`source`) and the answer.

Score. The judge's mean score s̄ = (1/n) Σ_i s_i over the n records it judges, with the percentile interval of the
means of `bootstrap` resamples of those records (scaling/fit.py `estimate`, as arena.py's intervals), and the
fraction of answers that stopped (an answer cut by max_new_tokens is usually a wrong one).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from llm_jax.data import default_task, records
from llm_jax.data.post_training import DEFAULT_TASK_SPEC, resolve_spec
from llm_jax.data.sources import DataError
from llm_jax.eval import judges
from llm_jax.generate import SamplingConfig
from llm_jax.generation_io import default_out_path, generate_file, score_field, write_jsonl
from llm_jax.scaling.fit import Estimate, check_bootstrap, estimate, resample_counts

STOP = ("\n",)
GREEDY = SamplingConfig(max_new_tokens=32, temperature=0.0)
SOURCE, SOURCE_WHERE, SHOTS = "source", "source_where", "shots"


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    where: str     # file:line
    record: dict   # as read, with a gold reference added to embedded-task records


def task_name(spec: str) -> str:
    """A short name of a task spec, for file names: `default_task`, or its first file's name without extensions
    (as generation_io names a prompts file's answers)."""
    if spec.strip() == DEFAULT_TASK_SPEC:
        return DEFAULT_TASK_SPEC
    return os.path.basename(default_out_path("", spec)).removesuffix(".jsonl")


def read_task(spec: str, format: str = "auto") -> list[TaskRecord]:
    """Every record of a task spec (`default_task`: the embedded task's held-out prompts), checked as prompt
    records; a DataError names the file:line of a bad one."""
    found = []
    for where, record in records.iter_records(resolve_spec(spec, "prompts", "eval"), format):
        records.prompt_example(record, where)
        if "task" in record and "reference" not in record:
            try:
                record = {**record, "reference": default_task.gold_answer(records.last_user_turn(record))}
            except ValueError as e:
                raise DataError(f"{where}: the record has a 'task' key, so its reference is the embedded task's gold "
                                f"answer, but {e}") from None
        found.append(TaskRecord(where, record))
    if not found:
        raise DataError(f"task {spec!r}: no records")
    return found


def check_pool(task: str, pool: Sequence[TaskRecord], k: int, pool_is_task: bool) -> None:
    """ValueError when k exceeds the pool; DataError naming a pool record without a reference."""
    if k < 0:
        raise ValueError(f"task {task!r}: k must be ≥ 0, got {k}")
    size = max(len(pool) - (1 if pool_is_task else 0), 0)
    if k > size:
        what = "the task's other records" if pool_is_task else "the pool file"
        raise ValueError(f"task {task!r}: k={k} demonstrations, but its pool ({what}) has only {size} records")
    if k:
        for r in pool:
            if "reference" not in r.record:
                raise DataError(f"{r.where}: a demonstration needs a 'reference', the answer shown after its prompt "
                                f"(keys: {sorted(r.record)[:10]})")


def demonstrations(index: int, question: TaskRecord, pool: Sequence[TaskRecord], k: int, seed: int,
                   pool_is_task: bool) -> list[int]:
    """The pool indices of record `index`'s k demonstrations (module docstring): drawn by (seed, index)."""
    if k == 0:
        return []
    order = np.random.default_rng((seed, index)).permutation(len(pool))
    prompt = question.record["prompt"]
    shots = [int(j) for j in order if not (pool_is_task and j == index) and pool[j].record["prompt"] != prompt][:k]
    if len(shots) < k:
        raise ValueError(f"{question.where}: k={k} demonstrations, but the pool has only {len(shots)} records with "
                         "another prompt")
    return shots


def _turns(record: dict) -> list[records.Message]:
    return [m for m in records.record_messages(record) if m.role != "system"]


def chat_prompt(question: dict, shots: Sequence[dict]) -> dict:
    """The record's prompt with the demonstrations as earlier turns: {"prompt": ..., "system"?: ...}."""
    if not shots:
        return {k: question[k] for k in ("prompt", "system") if k in question}
    system = [m for m in records.record_messages(question) if m.role == "system"]
    messages = list(system)
    for shot in shots:
        messages += _turns(shot) + [records.Message("assistant", str(shot["reference"]))]
    messages += _turns(question)
    return {"prompt": [dataclasses.asdict(m) for m in messages]}


def _plain_text(item: TaskRecord) -> str:
    prompt = item.record["prompt"]
    if not isinstance(prompt, str) or item.record.get("system"):
        raise DataError(f"{item.where}: a plain-text prompt is one text without a system message; this record has "
                        f"{'a list of messages' if not isinstance(prompt, str) else 'a system message'} (use the "
                        "chat format)")
    return prompt


def plain_prompt(question: TaskRecord, shots: Sequence[TaskRecord]) -> str:
    """"<prompt>\\n<answer>\\n\\n" per demonstration, then "<prompt>\\n"."""
    blocks = [f"{_plain_text(s)}\n{s.record['reference']}\n\n" for s in shots]
    return "".join(blocks) + f"{_plain_text(question)}\n"


def fewshot_records(questions: Sequence[TaskRecord], pool: Sequence[TaskRecord], k: int, *, seed: int = 0,
                    chat_template: bool = True, pool_is_task: bool = True, task: str = "task") -> list[dict]:
    """The rendered prompt records of `questions` (record i of the task is questions[i]), k-shot from `pool`."""
    check_pool(task, pool, k, pool_is_task)
    rendered = []
    for i, question in enumerate(questions):
        shots = demonstrations(i, question, pool, k, seed, pool_is_task)
        if chat_template:
            prompt = chat_prompt(question.record, [pool[j].record for j in shots])
        else:
            prompt = {"prompt": plain_prompt(question, [pool[j] for j in shots])}
        rendered.append({**prompt, SOURCE: question.record, SOURCE_WHERE: question.where, SHOTS: shots})
    return rendered


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """(the text before the first stop string, the rest after that stop string) or (text, None) without one."""
    found = [(text.index(s), s) for s in stops if s and s in text]
    if not found:
        return text, None
    at, stop = min(found)
    return text[:at], text[at + len(stop):]


@dataclasses.dataclass(frozen=True)
class SourceJudge:
    """A judge of rendered prompt records: `judge` reads each one's source record and the answer, cut at the
    stop strings in plain text (`stops`; none in chat)."""
    judge: Any
    stops: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.judge.name

    def applies(self, record: dict) -> bool:
        return judges.applies(self.judge, record[SOURCE])

    def check_prompt(self, record: dict, where: str) -> None:
        check = getattr(self.judge, "check_prompt", None)
        if check is not None:
            check(record[SOURCE], record.get(SOURCE_WHERE, where))

    def load(self) -> None:
        load = getattr(self.judge, "load", None)
        if load is not None:
            load()  # a reward model fails before any generation time is spent

    def score(self, prompts: Sequence[dict], responses: Sequence[str]) -> np.ndarray:
        return self.judge.score([p[SOURCE] for p in prompts], [cut_at_stop(r, self.stops)[0] for r in responses])


def as_judge(judge, batch_size: int = 32):
    """A judge object: `judge` itself, or the judge a spec names (judges.load_judge)."""
    return judges.load_judge(judge, batch_size=batch_size) if isinstance(judge, str) else judge


def mean_score(scores, *, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> Estimate:
    """The mean of per-record scores with its bootstrap percentile interval (module docstring)."""
    s = np.asarray(scores, np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"mean_score needs a non-empty vector of scores, got shape {s.shape}")
    check_bootstrap(bootstrap, confidence)
    samples = resample_counts(s.size, bootstrap, seed) @ s / s.size if bootstrap else None
    return estimate(s.mean(), samples, confidence)


def _read_rows(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def answer(run_dir: str, questions: Sequence[TaskRecord], judge, sampling: SamplingConfig, prompts_path: str,
           answers_path: str, *, k: int = 0, pool: Sequence[TaskRecord] | None = None, pool_is_task: bool = True,
           chat_template: bool = True, stop: str | Sequence[str] = STOP, seed: int = 0, batch_size: int = 32,
           task: str = "task", step: int | None = None, mesh=None, rules=None,
           progress: bool = False) -> tuple[list[dict], dict]:
    """The run's rows answering `questions` k-shot (module docstring), judged by `judge` (a judge, or None), and
    generate_file's summary. `pool`: the demonstrations' pool, default the questions; `pool_is_task`: the pool is
    the task file whose first records are the questions (question i is pool record i, never its own example)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not chat_template and not any(stops):
        raise ValueError(f"task {task!r}: plain-text answers need a stop string, got stop={stop!r}")
    rendered = fewshot_records(questions, questions if pool is None else pool, k, seed=seed,
                               chat_template=chat_template, pool_is_task=pool_is_task, task=task)
    write_jsonl(prompts_path, rendered)
    wrapped = None if judge is None else SourceJudge(judge, () if chat_template else stops)
    summary = generate_file(run_dir, prompts_path, answers_path, sampling, batch_size=batch_size, seed=seed,
                            step=step, mesh=mesh, rules=rules, progress=progress, chat_template=chat_template,
                            judge=wrapped)
    rows = _read_rows(answers_path)
    if not chat_template:
        for row in rows:
            row["response"], row["continuation"] = cut_at_stop(row["response"], stops)
            row["stopped"] = row["stopped"] or row["continuation"] is not None
        write_jsonl(answers_path, rows)
    return rows, summary


def scores_of(rows: Sequence[dict], judge) -> np.ndarray:
    """The judge's scores of the rows it judged (generation_io.score_field), in row order."""
    field = score_field(judge)
    return np.asarray([row[field] for row in rows if field in row], np.float64)


def _check_n_prompts(task: str, n_prompts: int | None) -> None:
    if n_prompts is not None and n_prompts < 1:
        raise ValueError(f"task {task!r}: n_prompts must be ≥ 1 (None: every record), got {n_prompts}")


def evaluate_task(run_dir: str, task: str, judge=judges.GOLD, *, k: int = 0, pool: str | None = None,
                  chat_template: bool = True, sampling: SamplingConfig = GREEDY, n_prompts: int | None = None,
                  out_dir: str | None = None, stop: str | Sequence[str] = STOP, seed: int = 0, batch_size: int = 32,
                  bootstrap: int = 1000, confidence: float = 0.95, step: int | None = None, mesh=None, rules=None,
                  progress: bool = False) -> dict:
    """The run's k-shot score on the task's first `n_prompts` records (all by default) under `judge` (a spec or a
    judge), with its bootstrap interval; files under `out_dir` (default <run>/evals/<task name>/)."""
    check_bootstrap(bootstrap, confidence)
    _check_n_prompts(task, n_prompts)
    judge = as_judge(judge, batch_size)
    task_records = read_task(task)
    questions = task_records[:n_prompts]
    out_dir = out_dir or os.path.join(run_dir, "evals", task_name(task))
    fmt = "chat" if chat_template else "plain"
    prompts_path = os.path.join(out_dir, f"{fmt}_k{k}_prompts.jsonl")
    rows, summary = answer(run_dir, questions, judge, sampling, prompts_path, os.path.join(out_dir, f"{fmt}_k{k}.jsonl"),
                           k=k, pool=task_records if pool is None else read_task(pool), pool_is_task=pool is None,
                           chat_template=chat_template, stop=stop, seed=seed, batch_size=batch_size, task=task,
                           step=step, mesh=mesh, rules=rules, progress=progress)
    scores = scores_of(rows, judge)
    if not len(scores):
        raise judges.JudgeError(f"judge {judge.name} judges none of the {len(rows)} records of task {task!r}")
    score = mean_score(scores, bootstrap=bootstrap, confidence=confidence, seed=seed)
    return dict(run=run_dir, task=task, judge=judge.name, k=k, format=fmt, score=score.value,
                interval=None if score.low is None else [score.low, score.high], n=len(scores), count=len(rows),
                stopped=float(np.mean([r["stopped"] for r in rows])), truncated=summary["truncated"],
                rows=summary["out"], prompts=prompts_path, step=summary["step"], seconds=summary["seconds"])


def icl_curve(run_dir: str, task: str = DEFAULT_TASK_SPEC, ks: Sequence[int] = (0, 1, 2, 4, 8), judge=judges.GOLD,
              *, pool: str | None = None, **options) -> dict:
    """In-context learning: `evaluate_task` at each k of `ks` (options as there), the same records and seeds, so
    each k's demonstrations extend the smaller k's. Returns the score per k and each k's evaluation."""
    ks = [int(k) for k in ks]
    if not ks or len(set(ks)) != len(ks) or min(ks) < 0:
        raise ValueError(f"icl_curve: ks must be distinct numbers of demonstrations ≥ 0, got {ks}")
    _check_n_prompts(task, options.get("n_prompts"))
    check_pool(task, read_task(task) if pool is None else read_task(pool), max(ks), pool is None)  # fail before any k
    judge = as_judge(judge, options.get("batch_size", 32))
    points = {k: evaluate_task(run_dir, task, judge, k=k, pool=pool, **options) for k in ks}
    first = points[ks[0]]
    return dict(run=run_dir, task=task, judge=judge.name, format=first["format"], n=first["n"],
                scores={k: p["score"] for k, p in points.items()},
                intervals={k: p["interval"] for k, p in points.items()}, points=points)
