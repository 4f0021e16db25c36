"""PNG plots of scaling-law fits (`fit.py`, `kaplan.py`), drawn with matplotlib's object API (no pyplot state).

matplotlib is imported only when a plot is drawn: the fits, the JSON they print and everything else in llm_jax
run without it, and training hosts need not install a plotting stack. `pip install 'llm_jax[plots]'` adds it.

    loss_vs_compute.png   every run's loss against its compute, coloured by N, with the compute frontier
    isoflops.png          Approach 2: each budget's runs against N, its parabola and minimum
    fitted_law.png        Approach 3 or Kaplan's L(N, D): the law over the runs, one curve per model size, with
                          the bootstrap band of the law
    kaplan_laws.png       Kaplan's L(N), L(D), L(C) with the points each was fitted on
    allocation.png        N_opt and D_opt against C: the points an approach found and its power laws (bands)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llm_jax.scaling.fit import CONFIDENCE, PowerLaw
from llm_jax.scaling.results import Runs

MAX_CURVES = 8


def require_matplotlib():
    """The matplotlib module, or an ImportError that says how to get it."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401  (the part the plots use)
    except ImportError as e:
        raise ImportError("scaling-fit plots need matplotlib: pip install 'llm_jax[plots]' (or pass --no-plots "
                          "for the JSON alone)") from e
    return matplotlib


def _figure(columns: int = 1):
    require_matplotlib()
    from matplotlib.figure import Figure
    figure = Figure(figsize=(5.5 * columns, 4.2), layout="constrained")
    return figure, [figure.add_subplot(1, columns, i + 1) for i in range(columns)]


def _plain_loss_axis(ax) -> None:
    """Loss ticks as plain numbers (a log axis over one decade would label them 3×10⁰)."""
    from matplotlib.ticker import ScalarFormatter
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())


def _save(figure, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return str(path)


def _size_colours(n):
    from matplotlib import colormaps
    ln_n = np.log(np.asarray(n))
    span = max(ln_n.max() - ln_n.min(), 1e-12)
    return colormaps["viridis"]((ln_n - ln_n.min()) / span)


def _size_groups(runs: Runs):
    """(run indices, N) per curve: every size when there are few; else MAX_CURVES sizes spread over the range
    (a sweep: several runs per size), or bins of ln N at their median N (sizes that rarely repeat)."""
    sizes, counts = np.unique(runs.n, return_counts=True)
    if sizes.size <= MAX_CURVES:
        return [(np.flatnonzero(runs.n == s), s) for s in sizes]
    if np.median(counts) >= 2:
        chosen = sizes[np.round(np.linspace(0, sizes.size - 1, MAX_CURVES)).astype(int)]
        return [(np.flatnonzero(runs.n == s), s) for s in chosen]
    edges = np.quantile(np.log(runs.n), np.linspace(0, 1, MAX_CURVES + 1))
    bins = np.clip(np.searchsorted(edges, np.log(runs.n), side="right") - 1, 0, MAX_CURVES - 1)
    return [(np.flatnonzero(bins == b), float(np.median(runs.n[bins == b]))) for b in range(MAX_CURVES)
            if (bins == b).any()]


def loss_vs_compute(runs: Runs, frontier, path: Path, law=None, law_label: str = "") -> str:
    """Runs' loss against C with the frontier; `law(C) -> (loss, band or None)` adds a fitted curve."""
    figure, (ax,) = _figure()
    ax.scatter(runs.flops, runs.loss, c=_size_colours(runs.n), s=14, alpha=0.8, label="runs (colour: ln N)")
    ax.plot(runs.flops[frontier], runs.loss[frontier], "k.-", lw=1, ms=5, label="frontier")
    if law is not None:
        c = np.geomspace(runs.flops.min(), runs.flops.max(), 200)
        value, band = law(c)
        ax.plot(c, value, "C3-", lw=1.5, label=law_label)
        if band is not None:
            ax.fill_between(c, band[0], band[1], color="C3", alpha=0.25, lw=0)
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="loss",
           title="loss against compute")
    _plain_loss_axis(ax)
    ax.legend(fontsize=8)
    return _save(figure, path)


def isoflops(runs: Runs, approach2, path: Path) -> str:
    figure, (ax,) = _figure()
    for i, profile in enumerate(approach2.profiles):
        colour = f"C{i % 10}"
        n = runs.n[profile.members]
        ax.scatter(n, runs.loss[profile.members], color=colour, s=14)
        grid = np.linspace(np.log(n.min()), np.log(n.max()), 100)
        c0, c1, c2 = profile.coefficients
        ax.plot(np.exp(grid), c0 + c1 * grid + c2 * grid ** 2, color=colour, lw=1, label=f"C = {profile.budget:.2g}")
        ax.plot(profile.n_opt, profile.loss_opt, marker="*", color=colour, ms=10, mec="k", mew=0.5)
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP profiles (★: fitted minimum)")
    ax.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def fitted_law(runs: Runs, law, path: Path, title: str, confidence: float = CONFIDENCE) -> str:
    """The runs' loss against D by model size, with `law.predict(N, D)` and `law.band(N, D)` per size."""
    figure, (ax,) = _figure()
    groups = _size_groups(runs)
    shown = np.concatenate([members for members, _ in groups])
    others = np.setdiff1d(np.arange(len(runs)), shown)
    if others.size:
        ax.scatter(runs.d[others], runs.loss[others], color="0.8", s=8, label="other sizes")
    colours = _size_colours([size for _, size in groups])
    for (members, size), colour in zip(groups, colours):
        ax.scatter(runs.d[members], runs.loss[members], color=colour, s=14)
        d = np.geomspace(runs.d[members].min(), runs.d[members].max(), 100)
        n = np.full_like(d, size)
        ax.plot(d, law.predict(n, d), color=colour, lw=1.2, label=f"N = {size:.3g}")
        band = law.band(n, d, confidence)
        if band is not None:
            ax.fill_between(d, band[0], band[1], color=colour, alpha=0.3, lw=0)
    ax.set(xscale="log", yscale="log", xlabel="training tokens D", ylabel="loss", title=title)
    _plain_loss_axis(ax)
    ax.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def kaplan_laws(runs: Runs, kaplan_fit, path: Path, confidence: float = CONFIDENCE) -> str:
    from llm_jax.scaling.kaplan import lowest_per_value
    figure, axes = _figure(3)
    per_n, per_d = lowest_per_value(runs.n, runs.loss), lowest_per_value(runs.d, runs.loss)
    panels = ((axes[0], runs.n[per_n], runs.loss[per_n], kaplan_fit.L_N, "parameters N", "L(N) = (N_c/N)^α_N"),
              (axes[1], runs.d[per_d], runs.loss[per_d], kaplan_fit.L_D, "tokens D", "L(D) = (D_c/D)^α_D"),
              (axes[2], runs.flops[kaplan_fit.frontier], runs.loss[kaplan_fit.frontier], kaplan_fit.L_C,
               "compute C (FLOPs)", "L(C) = (C_c/C)^α_C"))
    for ax, x, loss, law, xlabel, title in panels:
        ax.scatter(x, loss, s=14, color="C0", label="lowest loss" if law is None else None)
        grid = np.geomspace(x.min(), x.max(), 100)
        if law is None:  # the runs do not support this law (KaplanFit.skipped says why): show the points alone
            title += " (not fitted)"
        else:
            ax.plot(grid, law(grid), "C3-", lw=1.2, label=f"α = {law.alpha.value:.3f}")
            band = law.law.band(grid, confidence)
            if band is not None:
                ax.fill_between(grid, band[0], band[1], color="C3", alpha=0.25, lw=0)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="loss", title=title)
        _plain_loss_axis(ax)
        ax.legend(fontsize=8)
    return _save(figure, path)


def allocation(points_c, points_n, points_d, n_law: PowerLaw | None, d_law: PowerLaw | None, path: Path,
               title: str, curves=None, points_label: str = "measured optimum",
               confidence: float = CONFIDENCE) -> str:
    """N_opt and D_opt against C. `points_*`: runs to show (may be empty); `*_law`: the approach's power laws;
    `curves(C) -> ((n, n_band), (d, d_band))`: a law given as a function instead (Approach 3)."""
    figure, axes = _figure(2)
    c_all = np.asarray(points_c, np.float64)
    c = np.geomspace(c_all.min() if c_all.size else 1e18, c_all.max() if c_all.size else 1e24, 200)
    fitted = curves(c) if curves is not None else None
    for i, (ax, points, law, name) in enumerate(((axes[0], points_n, n_law, "N_opt"),
                                                  (axes[1], points_d, d_law, "D_opt"))):
        if len(points):
            ax.scatter(points_c, points, color="C0", s=20, zorder=3, label=points_label)
        if law is not None:
            ax.plot(c, law(c), "C3-", lw=1.2, label=f"{name} ∝ C^{law.p.value:.3f}")
            band = law.band(c, confidence)
        else:
            value, band = fitted[i]
            ax.plot(c, value, "C3-", lw=1.2, label=f"{name} of the fitted law")
        if band is not None:
            ax.fill_between(c, band[0], band[1], color="C3", alpha=0.25, lw=0)
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=name, title=title)
        ax.legend(fontsize=8)
    return _save(figure, path)
