"""`llm-jax scaling-fit`: one approach fitted to a results CSV, printed as JSON, drawn as PNGs.

    llm-jax scaling-fit runs.csv --approach 3 --bootstrap 1000              # Chinchilla's parametric law
    llm-jax scaling-fit runs.csv --approach 2 --isoflop-window 5            # IsoFLOP parabolas
    llm-jax scaling-fit runs.csv --approach kaplan --n-col N --loss-col best_loss
    llm-jax scaling-fit runs.csv --compute 1e21 --predict 1e9,2e10 --holdout-fraction 0.25

Approach 3 prints E, A, B, alpha and beta (each {"value", "ci"}), the allocation exponents a, b and G, N_opt and
D_opt at each `--compute` budget (default: the largest run's), the loss at each `--predict N,D`, and the
extrapolation check (fit below the compute cutoff, predict the runs above it). `--fixed-E` holds E at a known
irreducible loss (a synthetic corpus's entropy floor) and fits the other four. Plots go to `--plots-dir`
(default: `<csv name>_plots/` beside the CSV). The equations are in `fit.py`.
"""
from __future__ import annotations

import math
from pathlib import Path

from llm_jax.scaling import fit as fits
from llm_jax.scaling import kaplan
from llm_jax.scaling.results import FitError, Runs, read_runs

APPROACHES = ("kaplan", "1", "2", "3")


def default_plots_dir(csv_path) -> Path:
    path = Path(csv_path)
    return path.with_name(f"{path.stem}_plots")


def parse_point(text: str) -> tuple[float, float]:
    """'N,D' → (N, D)."""
    parts = text.split(",")
    try:
        n, d = (float(p) for p in parts)
    except ValueError:
        raise FitError(f"--predict {text!r}: expected N,D (two numbers separated by a comma)") from None
    return n, d


def scaling_fit(csv_path, *, approach: str = "3", n_col: str = "N", d_col: str = "D", loss_col: str = "loss",
                flops_col: str | None = None, bootstrap: int = 1000, confidence: float = fits.CONFIDENCE,
                seed: int = 0, holdout_fraction: float = 0.2, outlier_z: float | None = None,
                fixed_E: float | None = None,
                isoflop_tolerance: float = 0.1, isoflop_window: int = 0, compute=(), predict=(),
                plots_dir=None) -> dict:
    """Fits `approach` to the CSV; returns the JSON-ready result. `plots_dir=None` draws nothing."""
    if approach not in APPROACHES:
        raise FitError(f"approach {approach!r} is not one of {', '.join(APPROACHES)}")
    for c in compute:
        if not (math.isfinite(c) and c > 0):
            raise FitError(f"the compute budget is {c}: it must be finite and positive")
    for n, d in predict:
        if not (math.isfinite(n) and math.isfinite(d) and n > 0 and d > 0):
            raise FitError(f"cannot predict the loss at N = {n}, D = {d}: both must be finite and positive")
    if not 0 <= holdout_fraction < 1:
        raise FitError(f"the holdout fraction is {holdout_fraction}: use 0 (no extrapolation check) or a "
                       f"fraction below 1")
    if plots_dir is not None:
        from llm_jax.scaling.plots import require_matplotlib
        require_matplotlib()                    # before the fit, not after it
    runs = read_runs(csv_path, n_col, d_col, loss_col, flops_col)
    result = {"source": str(csv_path), "runs": len(runs), "approach": approach,
              "columns": {"N": n_col, "D": d_col, "loss": loss_col, "flops": runs.flops_from},
              "bootstrap": bootstrap, "confidence": confidence}
    options = dict(bootstrap=bootstrap, seed=seed, confidence=confidence)
    plots = Path(plots_dir) if plots_dir is not None else None
    if approach == "3":
        result |= _approach3(runs, options, dict(outlier_z=outlier_z, fixed_E=fixed_E), compute, predict,
                             holdout_fraction, plots)
    elif approach == "kaplan":
        result |= _kaplan(runs, options, holdout_fraction, plots)
    elif approach == "1":
        result |= _approach1(runs, options, plots)
    else:
        result |= _approach2(runs, options, isoflop_tolerance, isoflop_window, plots)
    return result


def _extrapolation(runs: Runs, fit, holdout_fraction: float) -> dict | None:
    if not holdout_fraction:
        return None
    try:
        return fits.extrapolation_check(runs, fit, holdout_fraction)
    except FitError as e:                       # too few small runs to refit on is a finding, not a failure
        return {"skipped": str(e)}


def _approach3(runs, options, fit_options, compute, predict, holdout_fraction, plots) -> dict:
    fit = fits.fit_approach3(runs, **fit_options, **options)
    budgets = list(compute) or [float(runs.flops.max())]
    result = fit.to_json()
    confidence = options["confidence"]
    as_json = lambda value: value.to_json() if isinstance(value, fits.Estimate) else value
    result["allocation"] = {name: e.to_json() for name, e in fits.allocation_exponents(fit, confidence).items()}
    result["allocation"]["budgets"] = [{key: as_json(value) for key, value in
                                        fits.optimal_allocation(fit, c, confidence).items()} for c in budgets]
    result["predictions"] = [{"N": n, "D": d, "loss": fits.predict_loss(fit, n, d, confidence).to_json()}
                             for n, d in predict]
    result["extrapolation"] = _extrapolation(
        runs, lambda part: fits.fit_approach3(part, **fit_options, seed=options["seed"]), holdout_fraction)
    if plots is not None:
        from llm_jax.scaling import plots as draw
        frontier = fits.compute_frontier(runs.flops, runs.loss)

        def along_optimum(c):
            n, d = fit.allocation(c)
            return fit.predict(n, d), fit.band(n, d, options["confidence"])

        def optimum_curves(c):
            (n, d), bands = fit.allocation(c), fit.allocation_band(c, options["confidence"]) or (None, None)
            return (n, bands[0]), (d, bands[1])

        result["plots"] = [
            draw.loss_vs_compute(runs, frontier, plots / "loss_vs_compute.png", along_optimum,
                                 "L(N_opt(C), D_opt(C)) of the fitted law"),
            draw.fitted_law(runs, fit, plots / "fitted_law.png", "L(N, D) = E + A/N^α + B/D^β"),
            draw.allocation(runs.flops[frontier], runs.n[frontier], runs.d[frontier], None, None,
                            plots / "allocation.png", "Approach 3 allocation", curves=optimum_curves,
                            points_label="frontier runs")]
    return result


def _kaplan(runs, options, holdout_fraction, plots) -> dict:
    fit = kaplan.fit_kaplan(runs, **options)
    result = fit.to_json()
    result["extrapolation"] = _extrapolation(
        runs, lambda part: kaplan.fit_kaplan_joint(part, seed=options["seed"]), holdout_fraction)
    if plots is not None:
        from llm_jax.scaling import plots as draw
        along = None if fit.L_C is None else lambda c: (fit.L_C(c), fit.L_C.law.band(c))
        result["plots"] = [
            draw.loss_vs_compute(runs, fit.frontier, plots / "loss_vs_compute.png", along, "L(C) = (C_c/C)^α_C"),
            draw.kaplan_laws(runs, fit, plots / "kaplan_laws.png"),
            draw.fitted_law(runs, fit.joint, plots / "fitted_law.png", "L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D")]
    return result


def _approach1(runs, options, plots) -> dict:
    fit = fits.fit_approach1(runs, **options)
    result = fit.to_json(runs)
    if plots is not None:
        from llm_jax.scaling import plots as draw
        f = fit.frontier
        result["plots"] = [
            draw.loss_vs_compute(runs, f, plots / "loss_vs_compute.png"),
            draw.allocation(runs.flops[f], runs.n[f], runs.d[f], fit.n_opt, fit.d_opt, plots / "allocation.png",
                            "Approach 1: the frontier", points_label="frontier runs")]
    return result


def _approach2(runs, options, tolerance, window, plots) -> dict:
    fit = fits.fit_approach2(runs, tolerance=tolerance, window=window, **options)
    result = fit.to_json()
    if plots is not None:
        from llm_jax.scaling import plots as draw
        c = [p.budget for p in fit.profiles]
        result["plots"] = [
            draw.loss_vs_compute(runs, fits.compute_frontier(runs.flops, runs.loss), plots / "loss_vs_compute.png"),
            draw.isoflops(runs, fit, plots / "isoflops.png"),
            draw.allocation(c, [p.n_opt for p in fit.profiles], [p.d_opt for p in fit.profiles], fit.n_opt,
                            fit.d_opt, plots / "allocation.png", "Approach 2: IsoFLOP minima")]
    return result
