"""Every fit of a sweep's results table, with plots, as the README of this folder reports them.

    python experiments/scaling_laws/fits.py [--results experiments/scaling_laws/results.csv] [--bootstrap 1000]

Runs `llm-jax scaling-fit`'s four approaches (Kaplan's forms on the non-embedding N, Chinchilla's 1–3 on
N_total) and writes `fits.json` and the PNGs of each under `plots/<approach>/` beside the results table; prints
a markdown summary: the coefficients with their intervals, the fitted E against the corpus's entropy floor, the
extrapolation checks and the compute-optimal allocation at 10 and 100 times the sweep's largest budget.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from llm_jax.scaling.report import scaling_fit

HERE = Path(__file__).resolve().parent


def _ci(estimate: dict, digits: int = 4) -> str:
    value, ci = estimate["value"], estimate["ci"]
    text = f"{value:.{digits}g}"
    return text if ci is None else f"{text} [{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(HERE / "results.csv"))
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    results = Path(args.results)
    with results.open(newline="") as f:
        rows = list(csv.DictReader(f))
    floor = float(rows[0]["entropy_floor"])
    largest = max(float(r["flops"]) for r in rows)
    common = dict(bootstrap=args.bootstrap, loss_col="loss")
    plots = results.parent / "plots"
    fits = {
        "kaplan": scaling_fit(results, approach="kaplan", n_col="N", plots_dir=plots / "kaplan", **common),
        "1": scaling_fit(results, approach="1", n_col="N_total", plots_dir=plots / "approach1", **common),
        "2": scaling_fit(results, approach="2", n_col="N_total", plots_dir=plots / "approach2", **common),
        "3": scaling_fit(results, approach="3", n_col="N_total", plots_dir=plots / "approach3",
                         compute=[10 * largest, 100 * largest], **common),
        "3_floor": scaling_fit(results, approach="3", n_col="N_total", plots_dir=plots / "approach3_floor",
                               compute=[10 * largest, 100 * largest], fixed_E=floor, **common),
    }
    fits["entropy_floor"] = floor
    (results.parent / "fits.json").write_text(json.dumps(fits, indent=1) + "\n")

    three, two, one, kaplan = fits["3"], fits["2"], fits["1"], fits["kaplan"]
    print(f"{len(rows)} runs; entropy floor {floor:.4f} nats/token\n")
    print("| approach | N_opt ∝ C^a | D_opt ∝ C^b |\n|---|---|---|")
    print(f"| 1 (frontier) | {_ci(one['a'], 3)} | {_ci(one['b'], 3)} |")
    print(f"| 2 (IsoFLOP) | {_ci(two['a'], 3)} | {_ci(two['b'], 3)} |")
    floored = fits["3_floor"]
    print(f"| 3 (parametric) | {_ci(three['allocation']['a'], 3)} | {_ci(three['allocation']['b'], 3)} |")
    print(f"| 3, E = floor | {_ci(floored['allocation']['a'], 3)} | {_ci(floored['allocation']['b'], 3)} |\n")
    for name, fit in (("Approach 3", three), ("Approach 3, E = floor", floored)):
        print(f"{name}: " + ", ".join(f"{k} = {_ci(fit[k])}" for k in ("E", "A", "B", "alpha", "beta")))
        print(f"  E − floor = {fit['E']['value'] - floor:+.4f} nats; Huber objective {fit['objective']:.4g}")
        for budget in fit["allocation"]["budgets"]:
            print(f"  C = {budget['C']:.3g}: N_opt {_ci(budget['N_opt'], 3)}, D_opt {_ci(budget['D_opt'], 3)}, "
                  f"loss {_ci(budget['loss'])}")
    for name, fit in (("Approach 3", three), ("Approach 3, E = floor", floored), ("Kaplan L(N, D)", kaplan)):
        check = fit["extrapolation"]
        if check and "skipped" not in check:
            print(f"{name} extrapolation: fit on {check['fit_runs']} runs below C = {check['compute_cutoff']:.3g}, "
                  f"{check['held_out_runs']} held out: mean |error| {check['mean_abs_relative_error']:.2%}, "
                  f"max {check['max_abs_relative_error']:.2%}")
    print("IsoFLOP minima: " + "; ".join(f"C = {b['C']:.3g}: N_opt {b['N_opt']:,.0f}"
                                         f"{'' if b['minimum_inside_range'] else ' (outside)'}"
                                         for b in two["budgets"]))
    print("Kaplan: " + ", ".join(f"{k} α = {_ci(kaplan[k]['alpha'], 3)}" for k in ("L(N)", "L(D)", "L(C)")
                                 if k in kaplan))
    joint = kaplan["L(N,D)"]
    print("Kaplan L(N, D): " + ", ".join(f"{k} = {_ci(v, 3)}" for k, v in joint.items() if isinstance(v, dict)))
    for name, why in kaplan["skipped"].items():
        print(f"Kaplan {name} not fitted: {why}")


if __name__ == "__main__":
    main()
