r"""Reward over-optimisation: gold score and reward-model score against the KL PPO spends, at several β.

    python experiments/rlhf/overoptimization.py --policy runs/pipeline/sft --reward runs/pipeline/reward \
        --workdir runs/overopt --betas 0,0.02,0.1 --steps 60 --eval_every 10 [--config.optim.lr=1e-4 ...]

In the spirit of Gao, Schulman & Hilton 2022 ("Scaling laws for reward model overoptimization"): one PPO
run per β (`ppo.kl_coef`) from the same SFT policy against the same reward model (configs/ppo.py:tiny plus the
overrides given), each evaluated every `--eval_every` iterations on the same held-out prompts. Every eval
gives a point (d, gold, proxy) with d = sqrt(KL(π‖π_ref)) (nats, the eval's mean Σ_t log π/π_ref over sampled
answers), gold = the embedded task's gold score of the sampled answers and proxy = the reward model's score of
them. Gao et al.'s functional form for RL,

    Δgold(d)  = d·(α − b·d)          fitted by least squares (linear in α, b) over all runs' points,

is fitted to the gold gain over the SFT policy and, for comparison, to the proxy's gain: a proxy that keeps
rising while the gold turns over (b > 0, peak at d* = α / 2b) is over-optimisation. A run already finished
in the workdir is not rerun, so the command can be extended with more β or steps.

Writes `<workdir>/points.csv`, `<workdir>/fits.json` and `<workdir>/overoptimization.png` (matplotlib), and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POINT_FIELDS = ("beta", "step", "kl", "d", "gold", "proxy", "gold_greedy")


def fit_gao_rl(d: np.ndarray, gain: np.ndarray) -> dict:
    """Least-squares α, b of gain = d·(α − b·d) (no intercept: no gain at d = 0); with the peak d* = α / 2b
    (inf when b <= 0: no turnover seen) and the fit's R²."""
    d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
    if len(d) < 2:
        raise ValueError(f"fitting d·(α − b·d) needs at least 2 points, got {len(d)}")
    design = np.stack([d, -d * d], axis=1)
    (alpha, b), *_ = np.linalg.lstsq(design, gain, rcond=None)
    residual = gain - design @ np.array([alpha, b])
    total = np.sum((gain - gain.mean()) ** 2)
    return dict(alpha=float(alpha), b=float(b), d_peak=float(alpha / (2 * b)) if b > 0 else math.inf,
                r2=float(1 - np.sum(residual ** 2) / total) if total > 0 else float("nan"), n=int(len(d)))


def eval_points(workdir: str, beta: float) -> list[dict]:
    """The (d, gold, proxy) point of every eval a PPO run logged, in step order."""
    from llm_jax.train.metrics import read_metrics
    points = []
    for m in read_metrics(workdir):
        if "eval_gold" in m and "eval_kl" in m:
            kl = float(m["eval_kl"])
            points.append(dict(beta=beta, step=int(m["step"]), kl=kl, d=math.sqrt(max(kl, 0.0)),
                               gold=float(m["eval_gold"]), proxy=float(m["eval_score"]),
                               gold_greedy=float(m.get("eval_gold_greedy", float("nan")))))
    return sorted(points, key=lambda p: p["step"])


def _finished(workdir: str, steps: int) -> bool:
    return any(p["step"] == steps for p in eval_points(workdir, 0.0)) if os.path.exists(
        os.path.join(workdir, "metrics.jsonl")) else False


def run_beta(args, beta: float, overrides: list[str]) -> str:
    from llm_jax.config_lib import load
    from llm_jax import training
    workdir = os.path.join(args.workdir, f"beta_{beta:g}")
    if not _finished(workdir, args.steps):
        config = load(os.path.join(ROOT, "configs/ppo.py:tiny"), [
            f"train.init_from={args.policy}", f"rl.reward_run={args.reward}", f"rl.kl_coef={beta}",
            f"train.steps={args.steps}", f"train.eval_every={args.eval_every}",
            f"train.checkpoint_every={args.steps}", f"seed={args.seed}", *overrides])
        training.run(config, workdir)
    return workdir


def plot(points: list[dict], fits: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    betas = sorted({p["beta"] for p in points})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    d_max = max(p["d"] for p in points) or 1.0
    grid = np.linspace(0, d_max * 1.05, 100)
    for ax, key, label in ((axes[0], "gold", "gold score (sampled)"), (axes[1], "proxy", "reward-model score")):
        base = fits[f"{key}_base"]
        for beta in betas:
            run = [p for p in points if p["beta"] == beta]
            ax.plot([p["d"] for p in run], [p[key] for p in run], "o-", ms=3, label=f"β = {beta:g}")
        fit = fits[key]
        ax.plot(grid, base + grid * (fit["alpha"] - fit["b"] * grid), "k--", lw=1,
                label=f"d(α − b·d): α={fit['alpha']:.3f}, b={fit['b']:.3f}")
        ax.set_xlabel("d = sqrt(KL(π ‖ π_ref)), nats^½")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyse(points: list[dict]) -> dict:
    """The Gao et al. fit of the gold and the proxy gains over all points (the iteration-0 evals are d = 0)."""
    start = [p for p in points if p["step"] == 0]
    if not start:
        raise ValueError("no iteration-0 eval among the points: the gains need the SFT policy's scores")
    fits = {}
    for key in ("gold", "proxy"):
        base = float(np.mean([p[key] for p in start]))
        fits[f"{key}_base"] = base
        fits[key] = fit_gao_rl(np.array([p["d"] for p in points]), np.array([p[key] - base for p in points]))
    return fits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="the SFT run PPO starts from (and its reference)")
    parser.add_argument("--reward", required=True, help="the reward-model run")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--betas", default="0,0.02,0.1", help="comma list of rl.kl_coef values")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    betas = [float(b) for b in args.betas.split(",") if b.strip()]
    if not betas or any(b < 0 for b in betas):
        raise SystemExit(f"--betas must be a comma list of values >= 0, got {args.betas!r}")
    os.makedirs(args.workdir, exist_ok=True)
    points = []
    for beta in betas:
        points += eval_points(run_beta(args, beta, overrides), beta)
    fits = analyse(points)
    with open(os.path.join(args.workdir, "points.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=POINT_FIELDS)
        writer.writeheader()
        writer.writerows(points)
    with open(os.path.join(args.workdir, "fits.json"), "w") as f:
        json.dump(fits, f, indent=1)
    plot(points, fits, os.path.join(args.workdir, "overoptimization.png"))
    print("| β | step | KL | gold (sampled) | gold (greedy) | RM score |\n|---|---|---|---|---|---|")
    for p in points:
        print(f"| {p['beta']:g} | {p['step']} | {p['kl']:.3f} | {p['gold']:.3f} | {p['gold_greedy']:.3f} | "
              f"{p['proxy']:.3f} |")
    print(json.dumps(fits))
    return dict(points=points, fits=fits)


if __name__ == "__main__":
    main()
