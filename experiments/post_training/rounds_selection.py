r"""Best-model selection in Llama 3's rounds, against the plain loop: two rounds of configs/rounds.py for each seed,
once with each round starting from the model its select stage chose (`best`), once from the last DPO model
(`last`, select=False); gold scores of every round's candidates, the model each selection chose, the final model.

    python experiments/post_training/rounds_selection.py --base /tmp/cc19b/runs/pipeline \
        --workdir runs/rounds_selection [--seeds 0,1,2] [--n-prompts 1024] [--sft-steps 100] [--dpo-steps 200]
    python experiments/post_training/rounds_selection.py --size small --seeds 0 --n-prompts 0 \
        --workdir /tmp/rs_small --rounds-args pairs_judge=reward,select_judge=reward   # minutes; numbers mean nothing

Every run is `llm-jax pipeline --config configs/rounds.py:size=<size>,seed=<s>,rounds=<rounds>,select=...` in
`<workdir>/<arm>_s<seed>/` (its log in pipeline.log there; a finished stage is skipped, so an interrupted
experiment continues where it stopped). The base stages (pretrain, sft, pairs, reward) are the finished
configs/pipeline.py run `--base`, linked into every workdir; without `--base`, the first seed's `last` run makes
them and every other run links to those. The two arms of a seed run the same round 1 (same stages, seeds and
settings: only where round 2 starts differs), so the `best` run links round 1's rs1, sft1, pairs1 and dpo1 from
the `last` run of its seed and runs only select1 and round 2 (and, for `average`, avg1).

Shrinking, so that six two-round runs fit in about an hour of a shared 2-core CPU: `--n-prompts` (train prompts
that each rs<r> and pairs<r> stage samples, 8 answers each; default 1024 of the 4,096), `--sft-steps` and
`--dpo-steps` (each round's SFT and DPO steps), `--eval-prompts` (held-out prompts of every stage's gold evals),
`--select-prompts` (the select arenas'); each 0 leaves the config's own (tiny: all 4,096 prompts, 100 SFT and 200
DPO steps, all 512 held-out prompts, 256 select prompts). `--rounds-args` adds arguments to the config spec
(`average=True`, `select_judge=reward`, ...).

Writes `<workdir>/results.json` (every run's rounds: each candidate's gold greedy and sampled score, each
selection's ratings and choice, the final model and its gold; and per arm the mean ± std over seeds) and
`<workdir>/results.md` (the table).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_STAGES = ("pretrain", "sft", "pairs", "reward")
ARMS = {"last": "select=False", "best": "select=True"}


def spec(args, arm: str, seed: int) -> str:
    parts = [f"size={args.size}", f"seed={seed}", f"rounds={args.rounds}", ARMS[arm]]
    if args.select_prompts:
        parts.append(f"select_prompts={args.select_prompts}")
    if args.rounds_args:
        parts.append(args.rounds_args)
    return f"{os.path.join(REPO, 'configs', 'rounds.py')}:{','.join(parts)}"


def overrides(args) -> list[str]:
    """The shrinking options as config overrides of the rounds' stages."""
    out = []
    for r in range(1, args.rounds + 1):
        if args.n_prompts:
            out += [f"stages.rs{r}.n_prompts={args.n_prompts}", f"stages.pairs{r}.n_prompts={args.n_prompts}"]
        for stage, steps in ((f"sft{r}", args.sft_steps), (f"dpo{r}", args.dpo_steps)):
            if steps:
                every = max(1, steps // 2)
                out.append(f"stages.{stage}.extra=train.steps={steps} train.eval_every={every} "
                           f"train.checkpoint_every={every}")
    if args.eval_prompts:
        out.append(f"eval.n_prompts={args.eval_prompts}")
    return out


def link(source: str, target: str) -> None:
    """`target` → `source` (a finished stage), unless `target` is already there."""
    if not os.path.lexists(target):
        os.symlink(source, target)


def run_pipeline(args, arm: str, seed: int, workdir: str) -> None:
    command = [sys.executable, "-m", "llm_jax.cli", "pipeline", "--config", spec(args, arm, seed),
               "--workdir", workdir, *[f"--config.{o}" for o in overrides(args)]]
    print(f"[{time.strftime('%H:%M:%S')}] {arm} seed {seed}: {' '.join(command)}", flush=True)
    with open(os.path.join(workdir, "pipeline.log"), "a", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code:
        raise SystemExit(f"{arm} seed {seed} failed (exit {code}): see {workdir}/pipeline.log")


def own_seconds(workdir: str, summary: dict) -> float:
    """The recorded wall time of the stages this run ran itself (not the ones linked from another run), however
    many times the command was rerun."""
    return sum(stage["seconds"] for name, stage in summary["stages"].items()
               if not os.path.islink(os.path.join(workdir, name)))


def gold_of(summary: dict) -> dict:
    """{stage: dict(greedy, sampled)} of every stage of the run that has gold scores."""
    return {name: g for r in summary["rounds"] for name, g in r["gold"].items()}


def figures(summary: dict, arm: str, rounds: int) -> dict:
    """One run's rounds (each candidate's gold, the selection), its final model and that model's gold."""
    gold = gold_of(summary)
    per_round = []
    for r in summary["rounds"][1:]:
        selection = r.get("selection")
        per_round.append(dict(gold=r["gold"], kept_gold=next(iter(r["rejection"].values()))["gold_score_kept"],
                              selected=selection["winner"] if selection else None,
                              ratings={n: m["rating"] for n, m in selection["models"].items()} if selection else None))
    final = per_round[-1]["selected"] if arm == "best" else f"dpo{rounds}"
    return dict(rounds=per_round, final=final, final_gold=gold[final])


def mean_std(values) -> dict:
    values = np.asarray([v for v in values if v is not None], np.float64)
    if not len(values):
        return dict(mean=None, std=None, n=0)
    return dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0, n=len(values))


def aggregate(runs: list[dict], rounds: int) -> dict:
    """Per arm, over seeds: every candidate's gold greedy and sampled, the final model's, and what was selected."""
    out = {}
    for arm in ARMS:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        stats, names = {}, [list(r["gold"]) for r in mine[0]["figures"]["rounds"]]
        for i in range(rounds):
            for name in names[i]:
                for kind in ("greedy", "sampled"):
                    stats[f"{name}_{kind}"] = mean_std(m["figures"]["rounds"][i]["gold"][name][kind] for m in mine)
        for kind in ("greedy", "sampled"):
            stats[f"final_{kind}"] = mean_std(m["figures"]["final_gold"][kind] for m in mine)
        selected = [[m["figures"]["rounds"][i]["selected"] for m in mine] for i in range(rounds)]
        out[arm] = dict(names=names, stats=stats, selected=selected, seconds=mean_std(m["seconds"] for m in mine))
    return out


def _pm(s: dict, spec: str = ".3f") -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:{spec}} ± {s['std']:{spec}}" if s["n"] > 1 else f"{s['mean']:{spec}}"


def table(runs: list[dict], means: dict, rounds: int) -> str:
    """Markdown: one row a run, then one row an arm with the means ± std over seeds. Seconds are the recorded wall
    times of the stages a run ran itself: a `best` run's select stages and round 2 (round 1 is its seed's `last`
    run's)."""
    head = "| arm | seed | " + " | ".join(f"round {i + 1}: gold greedy (sampled) → selected" for i in range(rounds)) \
        + " | final model: greedy (sampled) | seconds |"
    lines = [head, "|---|---:|" + "---|" * rounds + "---|---:|"]
    for run in runs:
        f = run["figures"]
        cells = []
        for r in f["rounds"]:
            gold = ", ".join(f"{n} {g['greedy']:.3f} ({g['sampled']:.3f})" for n, g in r["gold"].items())
            cells.append(gold + (f" → **{r['selected']}**" if r["selected"] else ""))
        final = f"{f['final']} {f['final_gold']['greedy']:.3f} ({f['final_gold']['sampled']:.3f})"
        lines.append(f"| {run['arm']} | {run['seed']} | " + " | ".join(cells) + f" | {final} | {run['seconds']:.0f} |")
    for arm, m in means.items():
        cells = []
        for i in range(rounds):
            gold = ", ".join(f"{n} {_pm(m['stats'][f'{n}_greedy'])} ({_pm(m['stats'][f'{n}_sampled'])})"
                             for n in m["names"][i])
            chosen = [s for s in m["selected"][i] if s]
            counts = ", ".join(f"{n} ×{chosen.count(n)}" for n in sorted(set(chosen)))
            cells.append(gold + (f" → {counts}" if counts else ""))
        final = f"{_pm(m['stats']['final_greedy'])} ({_pm(m['stats']['final_sampled'])})"
        lines.append(f"| **{arm}, mean** | | " + " | ".join(cells) + f" | {final} | {_pm(m['seconds'], '.0f')} |")
    return "\n".join(lines) + "\n"


def prepare(args, arm: str, seed: int, base: str) -> str:
    """The run's workdir with the base stages (and for `best`, round 1 of its seed's `last` run) linked in."""
    workdir = os.path.join(args.workdir, f"{arm}_s{seed}")
    os.makedirs(workdir, exist_ok=True)
    if base:
        for stage in BASE_STAGES:
            link(os.path.join(base, stage), os.path.join(workdir, stage))
    if arm == "best":
        last = os.path.join(args.workdir, f"last_s{seed}")
        for stage in ("rs1", "sft1", "pairs1", "dpo1", "avg1"):
            if os.path.isdir(os.path.join(last, stage)):
                link(os.path.join("..", f"last_s{seed}", stage), os.path.join(workdir, stage))
    return workdir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="", help="a finished configs/pipeline.py run (its pretrain, sft, pairs, "
                                                   "reward stages); empty: the first run makes them")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-prompts", type=int, default=1024)
    parser.add_argument("--sft-steps", type=int, default=0)
    parser.add_argument("--dpo-steps", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=0)
    parser.add_argument("--select-prompts", type=int, default=0)
    parser.add_argument("--rounds-args", default="", help="more arguments of configs/rounds.py, comma-separated")
    args = parser.parse_args(argv)
    args.workdir = os.path.abspath(args.workdir)
    base = os.path.abspath(args.base) if args.base else ""
    if base and not all(os.path.isfile(os.path.join(base, s, "stage.json")) for s in BASE_STAGES):
        raise SystemExit(f"--base {base} must hold the finished stages {', '.join(BASE_STAGES)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    runs = []
    for seed in seeds:
        for arm in ("last", "best"):  # `best` reuses round 1 of `last`
            workdir = prepare(args, arm, seed, base)
            run_pipeline(args, arm, seed, workdir)
            if not base:  # the first run made the base stages: every later run links them
                base = workdir
            with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
                summary = json.load(f)
            runs.append(dict(arm=arm, seed=seed, workdir=workdir, seconds=own_seconds(workdir, summary),
                             figures=figures(summary, arm, args.rounds)))
    means = aggregate(runs, args.rounds)
    settings = dict(vars(args))
    with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(dict(settings=settings, base=base, runs=runs, means=means), f, indent=1)
    text = table(runs, means, args.rounds)
    with open(os.path.join(args.workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
