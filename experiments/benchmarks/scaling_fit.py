r"""Wall time of the Approach 3 fit (`llm_jax/scaling/fit.py`): the full 4,500-start grid on ~250 runs, and its bootstrap.

    python experiments/benchmarks/scaling_fit.py [--sizes 16] [--noise 0.01] [--repeats 3] [--bootstrap 1000]

The runs are `--sizes`² points of the Chinchilla law (E 1.69, A 406.4, B 410.7, α 0.34, β 0.28) over N 50M–16B
and D 5B–500B, with multiplicative log-normal noise of `--noise`. The first fit in the process is timed apart:
it includes compiling the objective for each batch size the solver uses, as a user's first `llm-jax
scaling-fit` does. Then `--repeats` fits are timed and the median reported, then one bootstrap of `--bootstrap`
resamples alone (refits from the full-data optimum). Prints one JSON line: the times, the fitted coefficients,
the solver's summary (objective evaluations over all starts), machine, load average, jax version and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from llm_jax.scaling import fit
from llm_jax.scaling.results import make_runs

TRUTH = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def chinchilla_runs(sizes: int, noise: float, seed: int):
    n, d = (x.ravel() for x in np.meshgrid(np.geomspace(5e7, 1.6e10, sizes), np.geomspace(5e9, 5e11, sizes)))
    loss = TRUTH["E"] + TRUTH["A"] / n ** TRUTH["alpha"] + TRUTH["B"] / d ** TRUTH["beta"]
    return make_runs(n, d, loss * np.exp(noise * np.random.default_rng(seed).standard_normal(n.size)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, default=16, help="model sizes and token counts: sizes² runs")
    parser.add_argument("--noise", type=float, default=0.01, help="log-normal noise on the loss")
    parser.add_argument("--repeats", type=int, default=3, help="timed fits after the first")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of the timed bootstrap (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result as JSON to this path")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.sizes < 3 or args.repeats < 1:
        parser.error(f"--sizes must be ≥ 3 and --repeats ≥ 1 (got {args.sizes}, {args.repeats})")

    runs = chinchilla_runs(args.sizes, args.noise, args.seed)
    load_before = os.getloadavg()[0]
    first, first_s = timed(lambda: fit.fit_approach3(runs))
    repeats = [timed(lambda: fit.fit_approach3(runs))[1] for _ in range(args.repeats)]
    boot_s = None
    if args.bootstrap:
        boot, total_s = timed(lambda: fit.fit_approach3(runs, bootstrap=args.bootstrap, seed=args.seed))
        boot_s = total_s - float(np.median(repeats))
    result = {
        "runs": len(runs), "starts": first.solver["starts"], "noise": args.noise,
        "first_fit_s": round(first_s, 3), "fit_s_median": round(float(np.median(repeats)), 3),
        "fit_s": [round(t, 3) for t in repeats],
        "bootstrap": args.bootstrap, "bootstrap_s": None if boot_s is None else round(boot_s, 3),
        "coefficients": {k: round(v, 5) for k, v in zip(TRUTH, first.params().tolist())},
        "solver": first.solver,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "devices": str(jax.devices()[0].platform),
        "jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version(),
        "load_avg_before": round(load_before, 2), "load_avg_after": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
