r"""PPO, GRPO, Dr. GRPO, RLOO and REINFORCE++ side by side: each algorithm's preset from the same SFT model, the
same responses per iteration, several seeds; held-out score and KL before → after, and the wall time per iteration.

    python experiments/rlhf/compare_algorithms.py --task default --policy runs/pipeline/sft \
        --reward runs/pipeline/reward --workdir runs/compare_default [--seeds 0,1,2] [--steps 40]
    python experiments/rlhf/compare_algorithms.py --task arithmetic --policy runs/sft_arithmetic \
        --workdir runs/compare_arith [--config.rl.max_new_tokens=64 ...]

Every run is `llm-jax train --config configs/<preset>:size=tiny,task=<task>,seed=<s>` in its own directory
`<workdir>/<algorithm>_s<seed>` (a finished run is read back, not run again; an interrupted one resumes), with
`train.init_from=--policy`, `rl.reward_run=--reward` (the default task's reward model; the arithmetic task is paid
by `numeric_match` and has none), `train.steps=--steps`, then the `--config.x=y` overrides. The presets
(configs/ppo.py, grpo.py, rloo.py, reinforce_pp.py) all sample 128 responses an iteration: equal sample budgets.

The score is the task's: the gold judge on the default task (`eval_gold`, partial credit in [0, 1]), exact
accuracy on the arithmetic task (`eval_reward`, numeric_match), on the run's `rl.n_eval_prompts` held-out prompts,
one sampled answer each (`sampled`, the distribution RL optimises) and greedy. KL is the eval's mean Σ_t log π −
log π_ref over sampled answers (nats per response). Seconds per iteration: the mean over iterations of the loop's
own role timings (generate + reward + score + train).

Writes `<workdir>/results.json` (every run's figures and the means ± std over seeds), `<workdir>/results.md` (the
table) and `<workdir>/curves.png` (sampled score and KL against the iteration, mean over seeds, min–max band).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALGORITHMS = {  # name -> config spec (before `:`'s arguments)
    "ppo": ("ppo.py", ""),
    "grpo": ("grpo.py", ""),
    "dr_grpo": ("grpo.py", "variant=dr_grpo"),
    "rloo": ("rloo.py", ""),
    "reinforce_pp": ("reinforce_pp.py", ""),
}
SCORE_KEY = {"default": "eval_gold", "arithmetic": "eval_reward"}


def spec(algorithm: str, task: str, seed: int) -> str:
    file, variant = ALGORITHMS[algorithm]
    args = ",".join(a for a in ("size=tiny", f"task={task}", f"seed={seed}", variant) if a)
    return f"{os.path.join(REPO, 'configs', file)}:{args}"


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(run_dir: str, steps: int) -> bool:
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return False
    return any(m["step"] == steps and "eval_kl" in m for m in read_metrics(run_dir))


def train(algorithm: str, task: str, seed: int, run_dir: str, args, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "llm_jax.cli", "train", "--config", spec(algorithm, task, seed),
               "--workdir", run_dir, f"--config.train.init_from={args.policy}", f"--config.train.steps={args.steps}",
               f"--config.train.eval_every={args.eval_every}", "--config.train.progress_bar=False"]
    if args.reward:
        command.append(f"--config.rl.reward_run={args.reward}")
    command += [f"--config.{o}" for o in overrides]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train.log"), "a", encoding="utf-8") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{algorithm} seed {seed} failed (exit {code}): see {run_dir}/train.log")


def figures(run_dir: str, task: str) -> dict:
    """One run's before/after scores, KL, seconds per iteration and its eval curve."""
    logged = read_metrics(run_dir)
    evals = [m for m in logged if "eval_kl" in m]
    iterations = [m for m in logged if "seconds_train" in m]
    key = SCORE_KEY[task]
    seconds = [sum(m[f"seconds_{role}"] for role in ("generate", "reward", "score", "train")) for m in iterations]
    return dict(
        sampled_before=evals[0][key], sampled_after=evals[-1][key],
        greedy_before=evals[0][f"{key}_greedy"], greedy_after=evals[-1][f"{key}_greedy"],
        kl=evals[-1]["eval_kl"], response_length=evals[-1]["eval_response_length"],
        seconds_per_iteration=float(np.mean(seconds[1:] or seconds)),  # the first iteration compiles
        curve=[(m["step"], m[key], m["eval_kl"]) for m in evals])


def mean_std(values) -> dict:
    values = np.asarray(values, np.float64)
    return dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0)


def table(results: dict, task: str) -> str:
    score = "gold" if task == "default" else "accuracy"
    lines = [f"| algorithm | sampled {score} before → after | gain | greedy {score} after | KL (nats) | "
             "s / iteration |", "|---|---|---|---|---|---|"]
    for algorithm, r in results.items():
        runs = r["runs"]
        gain = mean_std([x["sampled_after"] - x["sampled_before"] for x in runs])
        before = mean_std([x["sampled_before"] for x in runs])  # each seed samples its eval answers its own way
        after = mean_std([x["sampled_after"] for x in runs])
        greedy = mean_std([x["greedy_after"] for x in runs])
        kl = mean_std([x["kl"] for x in runs])
        sec = mean_std([x["seconds_per_iteration"] for x in runs])
        lines.append(f"| {algorithm} | {before['mean']:.3f} → {after['mean']:.3f} ± {after['std']:.3f} | "
                     f"{gain['mean']:+.3f} ± {gain['std']:.3f} | {greedy['mean']:.3f} ± {greedy['std']:.3f} | "
                     f"{kl['mean']:.3f} ± {kl['std']:.3f} | {sec['mean']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, task: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_score, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm, r in results.items():
        curves = np.array([[point[1:] for point in run["curve"]] for run in r["runs"]])  # (seeds, evals, 2)
        steps = [point[0] for point in r["runs"][0]["curve"]]
        for ax, index in ((ax_score, 0), (ax_kl, 1)):
            values = curves[:, :, index]
            line, = ax.plot(steps, values.mean(axis=0), marker="o", label=algorithm)
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    ax_score.set(xlabel="iteration", ylabel="sampled " + ("gold score" if task == "default" else "accuracy"),
                 title=f"{task} task: held-out score")
    ax_kl.set(xlabel="iteration", ylabel="KL(π ‖ π_ref), nats per response", title="KL to the SFT reference")
    ax_score.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(SCORE_KEY), required=True)
    parser.add_argument("--policy", required=True, help="the SFT run every algorithm starts from")
    parser.add_argument("--reward", default="", help="the reward run (the default task); empty: none")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval_every", type=int, default=10)
    args = parser.parse_args(rest)
    algorithms = args.algorithms.split(",")
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        parser.error(f"unknown algorithms {unknown}; known: {sorted(ALGORITHMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for algorithm in algorithms:
        runs = []
        for seed in seeds:
            run_dir = os.path.join(args.workdir, f"{algorithm}_s{seed}")
            if not finished(run_dir, args.steps):
                print(f"training {algorithm} seed {seed} in {run_dir}", flush=True)
                train(algorithm, args.task, seed, run_dir, args, overrides)
            runs.append(dict(seed=seed, **figures(run_dir, args.task)))
        results[algorithm] = dict(spec=spec(algorithm, args.task, 0), runs=runs)
    out = dict(task=args.task, policy=args.policy, reward=args.reward, steps=args.steps, overrides=overrides,
               results=results)
    with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    text = table(results, args.task)
    with open(os.path.join(args.workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    plot(results, args.task, os.path.join(args.workdir, "curves.png"))
    print(text)
    return out


if __name__ == "__main__":
    main()
