"""Head-to-head evaluation of runs: every competitor answers the same prompts, one judge scores every answer, and
the scores give each competitor's win rate against a baseline and arena ratings for all (arena.py).

    compare([Competitor("base", "runs/p/pretrain", chat_template=False, few_shot=4), Competitor("sft", "runs/p/sft"),
             Competitor("ppo", "runs/p/ppo"), Competitor("dpo", "runs/p/dpo")],
            "default_task", "gold", SamplingConfig(max_new_tokens=16, temperature=0.0), "evals/arena",
            baseline="sft", n_prompts=256)

Prompts. `prompts_spec` is a task of generative.py (`default_task`: the embedded task's held-out prompts, each with
its gold answer as reference). Its first `n_prompts` records (all by default) are written to `prompts.jsonl`, and
every competitor answers exactly those, in that order: a chat model through its run's chat template (`few_shot` k:
after k demonstrations as earlier turns), a base model (`chat_template=False`) through generative.py's plain-text
k-shot prompts, its answer cut at the first `stop` string. Demonstrations are the task file's other records, drawn
by (seed, prompt) alone, so competitors with the same k are shown the same ones.

Scores. The judge scores every answer, scores_mp[m, p] for competitor m on prompt p, and must judge every prompt
(the first it does not is named). Then, with `bootstrap` prompt resamples drawn by `seed`,

    arena.arena(scores_mp, names)             Elo-scale Bradley–Terry ratings with intervals, the matrix of win shares
    arena.win_rate(scores_mp[m], scores_mp[b])  competitor m's win rate against the baseline b (ties count half)
    generative.mean_score(scores_mp[m])       m's mean score with its interval

Two competitors are one win rate, A's against B: the baseline is the last competitor unless named.

Files under out_dir:

    prompts.jsonl          the prompts as read
    <name>.jsonl           the competitor's answers (generation_io's rows; `metadata.source`: the prompt as read)
    <name>.prompts.jsonl   its rendered prompts (generative.py)
    arena.md               the arena table (best first, win shares) and the table of win rates against the baseline
    arena.json             ratings and intervals, win matrix, win rates, mean scores, the competitors and settings
    arena.png              the ratings with their interval bars, best first (matplotlib is imported only to draw
                           it; `plots=False` skips it)
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence

import numpy as np

from llm_jax.data.sources import DataError
from llm_jax.eval import judges
from llm_jax.eval.arena import Arena, arena, win_rate
from llm_jax.eval.generative import STOP, answer, as_judge, fewshot_records, mean_score, read_task, scores_of
from llm_jax.files import write_json_atomic, write_text_atomic
from llm_jax.generate import SamplingConfig
from llm_jax.generation_io import write_jsonl
from llm_jax.scaling.fit import check_bootstrap

PROMPTS_FILE, TABLE_FILE, JSON_FILE, PLOT_FILE = "prompts.jsonl", "arena.md", "arena.json", "arena.png"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a competitor's name is the name of its answers file


@dataclasses.dataclass(frozen=True)
class Competitor:
    name: str
    run: str                    # a run directory
    chat_template: bool = True  # False: plain-text prompts, for a base model
    few_shot: int = 0           # demonstrations before each prompt


class CompareError(ValueError):
    """Competitors or a baseline that cannot be compared (named)."""


def check_competitors(competitors: Sequence[Competitor], baseline: str | None) -> str:
    """The baseline's name (default: the last competitor), after checking names, options and run directories."""
    if len(competitors) < 2:
        raise CompareError(f"compare needs at least 2 competitors, got {len(competitors)}")
    names = [c.name for c in competitors]
    for c in competitors:
        if not isinstance(c.name, str) or not _NAME.match(c.name) or c.name == PROMPTS_FILE.split(".")[0]:
            raise CompareError(f"competitor name {c.name!r} must be letters, digits, _ . - (it names its answers "
                               "file) and not 'prompts'")
        if names.count(c.name) > 1:
            raise CompareError(f"competitor name {c.name!r} is given {names.count(c.name)} times")
        if isinstance(c.few_shot, bool) or not isinstance(c.few_shot, int) or c.few_shot < 0:
            raise CompareError(f"competitor {c.name!r}: few_shot must be a number ≥ 0, got {c.few_shot!r}")
        if not os.path.isdir(c.run):
            raise CompareError(f"competitor {c.name!r}: run directory {c.run!r} does not exist")
    baseline = names[-1] if baseline is None else baseline
    if baseline not in names:
        raise CompareError(f"baseline {baseline!r} is not a competitor; competitors: {names}")
    return baseline


def _interval(estimate, spec: str) -> str:
    return "" if estimate.low is None else f" [{estimate.low:{spec}}, {estimate.high:{spec}}]"


def win_rate_table(board: Arena, baseline: str, win_rates: dict, means: dict, stopped: dict) -> str:
    """Markdown, best rated first: each competitor's win rate against the baseline, its mean score, stopped share."""
    order = sorted(range(len(board.names)), key=lambda i: -board.ratings[i].value)
    rows = [f"| model | win rate vs {baseline} | wins / ties / losses | mean score | stopped |",
            "|---|---:|---:|---:|---:|"]
    for i in order:
        name = board.names[i]
        mean = f"{means[name].value:.3f}{_interval(means[name], '.3f')}"
        if name == baseline:
            rows.append(f"| {name} (baseline) | | | {mean} | {stopped[name]:.2f} |")
            continue
        w = win_rates[name]
        rows.append(f"| {name} | {w.rate.value:.3f}{_interval(w.rate, '.3f')} | {w.wins} / {w.ties} / {w.losses} | "
                    f"{mean} | {stopped[name]:.2f} |")
    return "\n".join(rows) + "\n"


def plot_ratings(board: Arena, path: str, title: str) -> str:
    """arena.png: each rating with its interval bar, best first (top)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("arena.png needs matplotlib: pip install 'llm_jax[plots]' (or plots=False)") from e
    order = sorted(range(len(board.names)), key=lambda i: -board.ratings[i].value)
    values = np.array([board.ratings[i].value for i in order])
    low = np.array([board.ratings[i].low if board.ratings[i].low is not None else board.ratings[i].value
                    for i in order])
    high = np.array([board.ratings[i].high if board.ratings[i].high is not None else board.ratings[i].value
                     for i in order])
    figure = Figure(figsize=(6.0, 1.0 + 0.45 * len(order)), layout="constrained")
    ax = figure.add_subplot()
    y = np.arange(len(order))[::-1]
    ax.errorbar(values, y, xerr=[values - low, high - values], fmt="o", capsize=4)
    ax.set_yticks(y, [board.names[i] for i in order])
    ax.axvline(1000.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("rating (Elo scale, Bradley–Terry; bars: bootstrap interval)")
    ax.set_title(title)
    figure.savefig(path, dpi=110)
    return path


def compare(competitors: Sequence[Competitor], prompts_spec: str, judge, sampling: SamplingConfig, out_dir: str, *,
            baseline: str | None = None, n_prompts: int | None = None, batch_size: int = 32, seed: int = 0,
            bootstrap: int = 1000, confidence: float = 0.95, stop: str | Sequence[str] = STOP, plots: bool = True,
            mesh=None, rules=None, progress: bool = False) -> dict:
    """Every competitor answers the same prompts, the judge (a spec or a judge) scores them; win rates against the
    baseline and arena ratings, written under out_dir (module docstring). Returns the summary (`table`: arena.md)."""
    competitors = list(competitors)
    baseline = check_competitors(competitors, baseline)
    check_bootstrap(bootstrap, confidence)
    if n_prompts is not None and n_prompts < 1:
        raise CompareError(f"n_prompts must be ≥ 1 (None: every prompt), got {n_prompts}")
    judge = as_judge(judge, batch_size)
    task_records = read_task(prompts_spec)
    questions = task_records[:n_prompts]
    for q in questions:
        if not judges.applies(judge, q.record):
            raise judges.JudgeError(f"{q.where}: judge {judge.name} does not judge this prompt, and every competitor "
                                    f"must be scored on every prompt (keys: {sorted(q.record)[:10]})")
    for c in competitors:  # a k too large for the pool, a prompt plain text cannot show: named before generating
        fewshot_records(questions, task_records, c.few_shot, seed=seed, chat_template=c.chat_template,
                        task=prompts_spec)
    os.makedirs(out_dir, exist_ok=True)
    write_jsonl(os.path.join(out_dir, PROMPTS_FILE), [q.record for q in questions])

    rows = {}
    for c in competitors:
        try:
            rows[c.name], _ = answer(c.run, questions, judge, sampling,
                                     os.path.join(out_dir, f"{c.name}.prompts.jsonl"),
                                     os.path.join(out_dir, f"{c.name}.jsonl"), k=c.few_shot, pool=task_records,
                                     chat_template=c.chat_template, stop=stop, seed=seed, batch_size=batch_size,
                                     task=prompts_spec, mesh=mesh, rules=rules, progress=progress)
        except DataError as e:  # e.g. a k-shot prompt longer than the run's context
            raise DataError(f"competitor {c.name!r} ({c.run}): {e}") from e
    names = [c.name for c in competitors]
    scores_mp = np.stack([scores_of(rows[n], judge) for n in names])
    options = dict(bootstrap=bootstrap, confidence=confidence, seed=seed)
    board = arena(scores_mp, names, **options)
    b = names.index(baseline)
    win_rates = {n: win_rate(scores_mp[m], scores_mp[b], **options) for m, n in enumerate(names) if m != b}
    means = {n: mean_score(scores_mp[m], **options) for m, n in enumerate(names)}
    stopped = {n: float(np.mean([r["stopped"] for r in rows[n]])) for n in names}

    table = (board.table() + "\n" + win_rate_table(board, baseline, win_rates, means, stopped) + "\n"
             f"{len(questions)} prompts of {prompts_spec}, judge {judge.name}; intervals: {bootstrap} prompt "
             f"bootstraps at {confidence:.0%}; ties count half.\n")
    files = {name: os.path.join(out_dir, name) for name in (TABLE_FILE, JSON_FILE)}
    summary = dict(out_dir=out_dir, prompts=prompts_spec, n_prompts=len(questions), judge=judge.name,
                   baseline=baseline, competitors=[dataclasses.asdict(c) for c in competitors], **board.to_json(),
                   win_rates={n: w.to_json() for n, w in win_rates.items()},
                   mean_scores={n: e.to_json() for n, e in means.items()}, stopped=stopped,
                   sampling=dataclasses.asdict(sampling), seed=seed, bootstrap=bootstrap, confidence=confidence)
    if len(names) == 2:  # one comparison: the other competitor's win rate against the baseline
        summary["win_rate"] = next(iter(win_rates.values())).to_json()
    if plots:
        files[PLOT_FILE] = plot_ratings(board, os.path.join(out_dir, PLOT_FILE),
                                        f"{len(questions)} prompts, judge {judge.name}")
    write_text_atomic(files[TABLE_FILE], table)
    write_json_atomic(files[JSON_FILE], summary)
    return dict(summary, table=table, files=files)

