"""Scaling-law fits over a sweep of runs (Kaplan et al. 2020; Hoffmann et al. 2022), with bootstrap intervals.

Every fit reads `Runs` (N parameters, D tokens, C FLOPs, loss; `scaling/results.py`) and returns its coefficients
as `Estimate`s: the value fitted to all runs, and with `bootstrap=B` a percentile interval from B refits to runs
resampled with replacement (B = 1000 in the papers; intervals describe the fitted law, not a new run's noise).

Kaplan et al. 2020 (eqs. 1.1–1.5; `kaplan.py`), each fitted by least squares on ln L:
    L(N) = (N_c / N)^α_N        on the lowest loss at each N (each size's longest run)
    L(D) = (D_c / D)^α_D        on the lowest loss at each D (the largest model trained on D tokens)
    L(C) = (C_c / C)^α_C        on the compute frontier (below)
    L(N, D) = [(N_c / N)^(α_N/α_D) + D_c / D]^α_D      on every run, by L-BFGS from a grid of starts

Hoffmann et al. 2022 (Chinchilla), section 3:
    Approach 1  the frontier: the runs whose loss is below every run with less compute (the lower envelope of
                loss against C); N_opt(C) = k_N·C^a and D_opt(C) = k_D·C^b fitted on its points.
    Approach 2  IsoFLOP profiles: runs whose compute agrees within a tolerance form one budget; per budget a
                parabola L = c₀ + c₁·ln N + c₂·(ln N)² has its minimum at ln N_opt = −c₁ / (2c₂) (D_opt read off
                the budget's own ln D–ln N line there, C/(6·N_opt) when C = 6ND); the minima give a and b as above.
                Bootstrap resamples within each budget.
    Approach 3  L(N, D) = E + A / N^α + B / D^β, minimising Σᵢ Huber_δ(LSE(a − α ln Nᵢ, b − β ln Dᵢ, e) − ln Lᵢ)
                with δ = 1e-3, A = eᵃ, B = eᵇ, E = eᵉ, by L-BFGS from every point of the grid α, β ∈ {0, 0.5, …, 2},
                e ∈ {−1, −0.5, …, 1}, a, b ∈ {0, 5, …, 25} (4,500 starts), keeping the lowest objective. The
                solver works in standardised coordinates (ln N and ln D centred and scaled), where the grid's
                (a, α) pairs are no longer nearly collinear. Its tolerances are tight (max |∇| ≤ 1e-10, or a step
                gaining at most 1e-9 of the objective; `lbfgs.py`), since the Huber objective is small: a
                tolerance sized for objectives of order one is met at the starting point. Optional outlier removal:
                runs whose log residual lies more than z robust standard deviations (1.4826·MAD) from the median
                are dropped and the fit repeated. Bootstrap refits start from the full-data optimum.
    Compute-optimal allocation (Approach 3, with C = 6ND):
                N_opt(C) = G·(C/6)^(β/(α+β)),  D_opt(C) = G⁻¹·(C/6)^(α/(α+β)),  G = (αA / (βB))^(1/(α+β))
    `predict_loss(fit, N, D)` gives L(N, D) with the bootstrap interval of the fitted law.

`extrapolation_check` fits on the runs below a compute cutoff and reports the error of its predictions on the
held-out larger runs: the test a scaling law exists for.

    llm-jax scaling-fit RESULTS.csv --n-col N --d-col D --loss-col loss --approach 3 --bootstrap 1000
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import jax.numpy as jnp
import numpy as np

from llm_jax.scaling import lbfgs
from llm_jax.scaling.results import FitError, Runs

CONFIDENCE = 0.95
HUBER_DELTA = 1e-3
APPROACH3_GRID = dict(a=np.arange(0.0, 25.1, 5.0), b=np.arange(0.0, 25.1, 5.0), e=np.arange(-1.0, 1.01, 0.5),
                      alpha=np.arange(0.0, 2.01, 0.5), beta=np.arange(0.0, 2.01, 0.5))
GTOL = 1e-10         # max |gradient| of the summed Huber objective in the solver's standardised coordinates
FTOL = 1e-9          # an accepted step lowering the objective by at most FTOL·|objective| ends a start
MAX_EVALS = 1000
POINTS_QUANTUM = 64  # data padded (with zero weight) to a multiple of this, so fits of similar size share a compile


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A fitted value and its bootstrap percentile interval (None without a bootstrap)."""
    value: float
    low: float | None = None
    high: float | None = None

    def to_json(self) -> dict:
        return {"value": self.value, "ci": None if self.low is None else [self.low, self.high]}


def estimate(value, samples=None, confidence: float = CONFIDENCE) -> Estimate:
    samples = None if samples is None else np.asarray(samples, np.float64)
    if samples is None or not np.isfinite(samples).any():
        return Estimate(float(value))
    tail = (1.0 - confidence) / 2.0
    low, high = np.nanquantile(samples, [tail, 1.0 - tail])
    return Estimate(float(value), float(low), float(high))


def resample_counts(size: int, bootstrap: int, seed: int) -> np.ndarray:
    """(bootstrap, size) multiplicities of a resample with replacement: a weighted fit equals a refit."""
    return np.random.default_rng(seed).multinomial(size, np.full(size, 1.0 / size), size=bootstrap)


def check_bootstrap(bootstrap: int, confidence: float) -> None:
    if bootstrap < 0 or bootstrap == 1:
        raise FitError(f"bootstrap is {bootstrap}: use 0 (no intervals) or at least 2 resamples")
    if not 0.0 < confidence < 1.0:
        raise FitError(f"confidence is {confidence}: it must lie strictly between 0 and 1")


# ---------------------------------------------------------------------------------------------- power laws

def _line_fits(x_N, y_N, w_BN):
    """Weighted least-squares lines y = c + s·x, one per weight row (y may differ per row too, as y_BN; entries
    with zero weight are ignored, nan included): (intercept_B, slope_B), nan where x does not vary."""
    w_BN = np.asarray(w_BN, np.float64)
    y_BN = np.where(w_BN > 0, np.broadcast_to(y_N, w_BN.shape), 0.0)
    sw = w_BN.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx, my = (w_BN * x_N).sum(1) / sw, (w_BN * y_BN).sum(1) / sw
        sxx = (w_BN * (x_N - mx[:, None]) ** 2).sum(1)
        sxy = (w_BN * (x_N - mx[:, None]) * (y_BN - my[:, None])).sum(1)
        slope = np.where(sxx > 1e-12 * np.maximum(sw, 1.0), sxy / sxx, np.nan)
    return my - slope * mx, slope


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = k·x^p, fitted by least squares on ln y = ln k + p·ln x."""
    k: Estimate
    p: Estimate
    samples: np.ndarray      # (B, 2): ln k and p of each bootstrap refit

    def __call__(self, x):
        return self.k.value * np.asarray(x, np.float64) ** self.p.value

    def band(self, x, confidence: float = CONFIDENCE):
        """The bootstrap interval of y(x) (None without a bootstrap)."""
        if not len(self.samples):
            return None
        y = np.exp(self.samples[:, :1] + self.samples[:, 1:] * np.log(np.asarray(x, np.float64))[None])
        tail = (1.0 - confidence) / 2.0
        return np.nanquantile(y, [tail, 1.0 - tail], axis=0)

    def to_json(self) -> dict:
        return {"k": self.k.to_json(), "p": self.p.to_json()}


def fit_power_law(x, y, *, bootstrap: int = 0, seed: int = 0, confidence: float = CONFIDENCE,
                  what: str = "power law") -> PowerLaw:
    x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    check_bootstrap(bootstrap, confidence)
    for name, values in (("x", x), ("y", y)):
        bad = np.flatnonzero(~(np.isfinite(values) & (values > 0)))
        if bad.size:
            raise FitError(f"{what}: {name}[{bad[0]}] is {values[bad[0]]}; a power law needs finite positive values")
    if x.size != y.size:
        raise FitError(f"{what}: {x.size} x values but {y.size} y values")
    if np.unique(x).size < 2:
        raise FitError(f"{what}: needs at least 2 distinct x values, got {np.unique(x).size}")
    lx, ly = np.log(x), np.log(y)
    c, s = _line_fits(lx, ly, np.ones((1, x.size)))
    samples = np.zeros((0, 2))
    if bootstrap:
        cb, sb = _line_fits(lx, ly, resample_counts(x.size, bootstrap, seed).astype(np.float64))
        samples = np.stack([cb, sb], 1)
    return PowerLaw(estimate(np.exp(c[0]), np.exp(samples[:, 0]) if bootstrap else None, confidence),
                    estimate(s[0], samples[:, 1] if bootstrap else None, confidence), samples)


def compute_frontier(flops, loss) -> np.ndarray:
    """Indices of the runs whose loss is below that of every run with less (or equal) compute, by compute."""
    flops, loss = np.asarray(flops), np.asarray(loss)
    order = np.lexsort((loss, flops))
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(loss[order])[:-1]])
    return order[loss[order] < best_before]


# ------------------------------------------------------------------------------- Chinchilla, Approach 1

@dataclasses.dataclass(frozen=True)
class Approach1:
    frontier: np.ndarray     # indices of the frontier runs, by compute
    n_opt: PowerLaw          # N_opt = k·C^a
    d_opt: PowerLaw          # D_opt = k·C^b

    def to_json(self, runs: Runs) -> dict:
        return {"frontier_rows": runs.rows[self.frontier].tolist(), "N_opt": self.n_opt.to_json(),
                "D_opt": self.d_opt.to_json(), "a": self.n_opt.p.to_json(), "b": self.d_opt.p.to_json()}


def _frontier_laws(runs: Runs, frontier_BN, frontier, confidence):
    """N_opt and D_opt power laws on the frontier, with samples from per-resample frontier masks (B, N)."""
    ln_c = np.log(runs.flops)
    laws = []
    for y in (runs.n, runs.d):
        c, s = _line_fits(ln_c[frontier], np.log(y[frontier]), np.ones((1, frontier.size)))
        cb, sb = _line_fits(ln_c, np.log(y), frontier_BN)
        samples = np.stack([cb, sb], 1)
        boot = len(samples) > 0
        laws.append(PowerLaw(estimate(np.exp(c[0]), np.exp(cb) if boot else None, confidence),
                             estimate(s[0], sb if boot else None, confidence), samples))
    return laws


def fit_approach1(runs: Runs, *, bootstrap: int = 0, seed: int = 0, confidence: float = CONFIDENCE) -> Approach1:
    check_bootstrap(bootstrap, confidence)
    frontier = compute_frontier(runs.flops, runs.loss)
    if frontier.size < 3:
        raise FitError(f"Approach 1 needs at least 3 runs on the compute frontier (each with a lower loss than "
                       f"every run with less compute); {runs.source} has {frontier.size} "
                       f"(rows {runs.rows[frontier].tolist()})")
    masks = np.zeros((bootstrap, len(runs)))
    for b, counts in enumerate(resample_counts(len(runs), bootstrap, seed) if bootstrap else ()):
        present = np.flatnonzero(counts)
        masks[b, present[compute_frontier(runs.flops[present], runs.loss[present])]] = 1.0
    n_opt, d_opt = _frontier_laws(runs, masks, frontier, confidence)
    return Approach1(frontier, n_opt, d_opt)


# ------------------------------------------------------------------------------- Chinchilla, Approach 2

def isoflop_groups(flops, tolerance: float) -> list[np.ndarray]:
    """Runs grouped by compute: a group holds the runs within a factor (1 + tolerance) of its smallest."""
    if not 0 < tolerance < 1:
        raise FitError(f"the IsoFLOP tolerance is {tolerance}: it must lie strictly between 0 and 1")
    order = np.argsort(flops, kind="stable")
    groups, start = [], 0
    for i in range(1, order.size + 1):
        if i == order.size or flops[order[i]] > flops[order[start]] * (1 + tolerance):
            groups.append(order[start:i])
            start = i
    return groups


def _parabola_minima(x_M, y_M, w_BM):
    """Per weight row, the vertex of the least-squares parabola y = c₀ + c₁x + c₂x² (nan if c₂ ≤ 0), and the
    coefficients (B, 3) in x itself."""
    shift = x_M.mean()
    X = np.stack([np.ones_like(x_M), x_M - shift, (x_M - shift) ** 2], 1)       # (M, 3), centred for conditioning
    gram = np.einsum("bm,mi,mj->bij", w_BM, X, X)
    rhs = np.einsum("bm,mi,m->bi", w_BM, X, y_M)
    singular = np.abs(np.linalg.det(gram)) < 1e-12
    coef = np.linalg.solve(np.where(singular[:, None, None], np.eye(3), gram), rhs[..., None])[..., 0]
    coef[singular] = np.nan
    c0, c1, c2 = coef.T
    with np.errstate(invalid="ignore", divide="ignore"):
        vertex = np.where(c2 > 0, shift - c1 / (2 * c2), np.nan)
    # back to powers of x: c₀ − c₁·shift + c₂·shift², c₁ − 2c₂·shift, c₂
    return vertex, np.stack([c0 - c1 * shift + c2 * shift ** 2, c1 - 2 * c2 * shift, c2], 1)


@dataclasses.dataclass(frozen=True)
class IsoFLOPProfile:
    budget: float            # geometric mean compute of its runs
    members: np.ndarray      # run indices
    coefficients: np.ndarray  # c₀, c₁, c₂ of L = c₀ + c₁·ln N + c₂·(ln N)²
    n_opt: float
    d_opt: float
    loss_opt: float
    inside: bool             # the minimum lies within the budget's range of N

    def to_json(self) -> dict:
        return {"C": self.budget, "runs": int(self.members.size), "N_opt": self.n_opt, "D_opt": self.d_opt,
                "loss_opt": self.loss_opt, "minimum_inside_range": self.inside}


@dataclasses.dataclass(frozen=True)
class Approach2:
    profiles: list[IsoFLOPProfile]
    skipped: list[str]       # budgets that gave no minimum, with why
    n_opt: PowerLaw
    d_opt: PowerLaw

    def to_json(self) -> dict:
        return {"N_opt": self.n_opt.to_json(), "D_opt": self.d_opt.to_json(), "a": self.n_opt.p.to_json(),
                "b": self.d_opt.p.to_json(), "budgets": [p.to_json() for p in self.profiles],
                "skipped": self.skipped}


def _around_the_lowest(members: np.ndarray, ln_n: np.ndarray, loss: np.ndarray, window: int) -> np.ndarray:
    """The `window` sizes of a budget centred (in ln N order) on its lowest loss; all of them when window is 0."""
    if not window or members.size <= window:
        return members
    ordered = members[np.argsort(ln_n[members], kind="stable")]
    lowest = int(np.argmin(loss[ordered]))
    start = min(max(lowest - window // 2, 0), ordered.size - window)
    return ordered[start:start + window]


def fit_approach2(runs: Runs, *, tolerance: float = 0.1, bootstrap: int = 0, seed: int = 0,
                  confidence: float = CONFIDENCE, window: int = 0) -> Approach2:
    """`window` (≥ 3, or 0 for all) fits each budget's parabola to that many sizes around its lowest loss: a
    profile far from its minimum is not a parabola in ln N (an undertrained arm rises steeply), and its far
    points would pull the vertex."""
    check_bootstrap(bootstrap, confidence)
    if window and window < 3:
        raise FitError(f"the IsoFLOP window is {window}: a parabola needs 3 or more sizes (0: every size)")
    rng = np.random.default_rng(seed)
    ln_n, ln_d = np.log(runs.n), np.log(runs.d)
    profiles, skipped, boot_n, boot_d = [], [], [], []
    for members in isoflop_groups(runs.flops, tolerance):
        budget = float(np.exp(np.log(runs.flops[members]).mean()))
        members = _around_the_lowest(members, ln_n, runs.loss, window)
        if np.unique(runs.n[members]).size < 3:
            skipped.append(f"C={budget:.4g}: {np.unique(runs.n[members]).size} model sizes (a parabola needs 3)")
            continue
        x, m = ln_n[members], members.size
        weights = np.concatenate([np.ones((1, m)), rng.multinomial(m, np.full(m, 1 / m), size=bootstrap)])
        vertex, coef = _parabola_minima(x, runs.loss[members], weights)
        if not np.isfinite(vertex[0]):
            skipped.append(f"C={budget:.4g}: the loss has no minimum over ln N (the parabola opens downward)")
            continue
        intercept, slope = _line_fits(x, ln_d[members], weights)         # the budget's own ln D against ln N
        ln_d_opt = intercept + slope * vertex
        c = coef[0]
        profiles.append(IsoFLOPProfile(budget, members, c, float(np.exp(vertex[0])), float(np.exp(ln_d_opt[0])),
                                       float(c[0] + c[1] * vertex[0] + c[2] * vertex[0] ** 2),
                                       bool(x.min() <= vertex[0] <= x.max())))
        boot_n.append(vertex[1:])
        boot_d.append(ln_d_opt[1:])
    if len(profiles) < 2:
        why = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        raise FitError(f"Approach 2 needs at least 2 IsoFLOP budgets (runs whose flops agree within "
                       f"{tolerance:.0%}) with a minimum over 3 or more model sizes; {runs.source} has "
                       f"{len(profiles)}" + (f" ({why})" if skipped else ""))
    ln_c = np.log([p.budget for p in profiles])
    laws = []
    for value, boot in ((lambda p: p.n_opt, boot_n), (lambda p: p.d_opt, boot_d)):
        c, s = _line_fits(ln_c, np.log([value(p) for p in profiles]), np.ones((1, len(profiles))))
        y_BG = np.stack(boot, 1) if bootstrap else np.zeros((0, len(profiles)))
        cb, sb = _line_fits(ln_c, y_BG, np.isfinite(y_BG).astype(np.float64))
        laws.append(PowerLaw(estimate(np.exp(c[0]), np.exp(cb) if bootstrap else None, confidence),
                             estimate(s[0], sb if bootstrap else None, confidence), np.stack([cb, sb], 1)))
    return Approach2(profiles, skipped, *laws)


# ------------------------------------------------------------------------------- Chinchilla, Approach 3

@dataclasses.dataclass(frozen=True)
class _Standardised:
    """ln N and ln D centred and scaled, padded with zero-weight copies to a multiple of POINTS_QUANTUM."""
    mu_n: float
    sd_n: float
    mu_d: float
    sd_d: float
    zn: np.ndarray
    zd: np.ndarray
    log_loss: np.ndarray
    weight: np.ndarray

    @classmethod
    def of(cls, runs: Runs) -> "_Standardised":
        ln_n, ln_d = np.log(runs.n), np.log(runs.d)
        mu_n, mu_d = ln_n.mean(), ln_d.mean()
        sd_n, sd_d = max(ln_n.std(), 1e-3), max(ln_d.std(), 1e-3)
        pad = -len(runs) % POINTS_QUANTUM
        padded = lambda a: np.concatenate([a, np.full(pad, a[0])])[None]
        return cls(mu_n, sd_n, mu_d, sd_d, padded((ln_n - mu_n) / sd_n), padded((ln_d - mu_d) / sd_d),
                   padded(np.log(runs.loss)), np.concatenate([np.ones(len(runs)), np.zeros(pad)])[None])

    def resampled_weights(self, bootstrap: int, seed: int) -> np.ndarray:
        size = int(self.weight.sum())
        counts = resample_counts(size, bootstrap, seed).astype(np.float64)
        return np.concatenate([counts, np.zeros((bootstrap, self.weight.shape[1] - size))], axis=1)


def approach3_starts(grid: dict = APPROACH3_GRID) -> np.ndarray:
    """The grid of initialisations as rows (a, b, e, α, β)."""
    return np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])),
                     np.float64)


def _huber_value_and_grad(u_BP, w_N, zn_N, zd_N, log_loss_N):
    """Σ w·Huber_δ(ln(e^{a − α·z_N} + e^{b − β·z_D} + e^e) − ln L) and its gradient, in standardised coordinates.

    The sum is formed in linear space (two exponentials and a logarithm per point, not LSE's three and one): an
    overflow makes the trial point non-finite, which the line search rejects like any other bad step.
    """
    a, b, e, alpha, beta = (u_BP[:, i:i + 1] for i in range(5))
    x1, x2, x3 = jnp.exp(a - alpha * zn_N), jnp.exp(b - beta * zd_N), jnp.exp(e)
    total = x1 + x2 + x3
    r = jnp.log(total) - log_loss_N
    huber = jnp.where(jnp.abs(r) <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (jnp.abs(r) - 0.5 * HUBER_DELTA))
    dr = w_N * jnp.clip(r, -HUBER_DELTA, HUBER_DELTA) / total                  # ∂objective/∂r ÷ total
    g1, g2 = dr * x1, dr * x2
    grad = jnp.stack([g1.sum(1), g2.sum(1), (dr * x3).sum(1), -(g1 * zn_N).sum(1), -(g2 * zd_N).sum(1)], 1)
    return (w_N * huber).sum(1), grad


def _huber_fixed_e_value_and_grad(u_BP, w_N, zn_N, zd_N, log_loss_N):
    """The same objective with e held where it starts: a zero gradient in e keeps every L-BFGS step off it."""
    value, grad = _huber_value_and_grad(u_BP, w_N, zn_N, zd_N, log_loss_N)
    return value, grad.at[:, 2].set(0.0)


class JointLaw:
    """What a fitted L(N, D) offers, given `params()` (its coefficients), `_loss(params_K, n, d)` (the law for K
    coefficient vectors at once) and `samples` (the bootstrap refits' coefficients, one row each)."""

    def predict(self, n, d):
        return self._loss(self.params()[None], n, d)[0]

    def band(self, n, d, confidence: float = CONFIDENCE):
        """The bootstrap interval of L(N, D) (None without a bootstrap)."""
        if not len(self.samples):
            return None
        tail = (1.0 - confidence) / 2.0
        return np.nanquantile(self._loss(self.samples, n, d), [tail, 1.0 - tail], axis=0)


@dataclasses.dataclass(frozen=True)
class Approach3(JointLaw):
    """L(N, D) = E + A/N^α + B/D^β."""
    E: Estimate
    A: Estimate
    B: Estimate
    alpha: Estimate
    beta: Estimate
    samples: np.ndarray      # (K, 5): E, A, B, α, β of each bootstrap refit
    objective: float         # the summed Huber loss at the optimum
    solver: dict             # how the best start ended, and how many starts reached the same minimum
    removed_rows: tuple      # outliers left out (rows of the source)
    n_runs: int

    def params(self) -> np.ndarray:
        return np.array([self.E.value, self.A.value, self.B.value, self.alpha.value, self.beta.value])

    @staticmethod
    def _loss(params_K5, n, d):
        E, A, B, alpha, beta = (params_K5[:, i:i + 1] for i in range(5))
        n, d = np.asarray(n, np.float64).reshape(1, -1), np.asarray(d, np.float64).reshape(1, -1)
        return E + A / n ** alpha + B / d ** beta

    def allocation(self, compute):
        """N_opt(C) and D_opt(C) of the fitted law."""
        n, d, *_ = _allocation(self.params()[None], compute)
        return n[0], d[0]

    def allocation_band(self, compute, confidence: float = CONFIDENCE):
        """The bootstrap intervals of N_opt(C) and D_opt(C) (None without a bootstrap)."""
        if not len(self.samples):
            return None
        n, d, *_ = _allocation(self.samples, compute)
        tail = (1.0 - confidence) / 2.0
        return tuple(np.nanquantile(x, [tail, 1.0 - tail], axis=0) for x in (n, d))

    def to_json(self) -> dict:
        coefficients = {name: getattr(self, name).to_json() for name in ("E", "A", "B", "alpha", "beta")}
        return coefficients | {"objective": self.objective, "runs": self.n_runs,
                               "removed_rows": list(self.removed_rows), "solver": self.solver}


def _approach3_minimum(runs: Runs, starts, gtol, ftol, max_evals, objective=_huber_value_and_grad):
    """The best start of the grid: (standardised data, its parameters (a, b, e, α, β), solver summary)."""
    z = _Standardised.of(runs)
    # (a, α) → (a − α·μ_N, α·σ_N): the same line a − α·ln N written in z_N = (ln N − μ_N)/σ_N
    u0 = np.stack([starts[:, 0] - starts[:, 3] * z.mu_n, starts[:, 1] - starts[:, 4] * z.mu_d, starts[:, 2],
                   starts[:, 3] * z.sd_n, starts[:, 4] * z.sd_d], 1)
    found = lbfgs.minimize(objective, u0, (), (z.weight, z.zn, z.zd, z.log_loss), gtol=gtol,
                           ftol=ftol, max_evals=max_evals)
    values = np.where(np.isfinite(found.value_S), found.value_S, np.inf)
    best = int(np.argmin(values))
    if not np.isfinite(values[best]):
        raise FitError(f"Approach 3: the objective is not finite at any start on {runs.source}")
    stopped = ("start" if found.iterations_S[best] == 0 and found.converged_S[best] else
               "gtol" if found.converged_S[best] else "ftol" if found.stalled_S[best] else "max_evals")
    solver = {"starts": int(len(starts)), "stopped_by": stopped, "iterations": int(found.iterations_S[best]),
              "evaluations": int(found.evaluations_S[best]), "grad_max": float(found.grad_max_S[best]),
              "starts_at_minimum": int(np.sum(values <= values[best] + 1e-6 * abs(values[best]) + 1e-15)),
              "evaluations_all_starts": int(found.evaluations_S.sum()),
              "gtol": gtol, "ftol": ftol}
    return z, found.x_SP[best], float(values[best]), solver


def _to_natural(z: _Standardised, u_KP):
    alpha, beta = u_KP[:, 3] / z.sd_n, u_KP[:, 4] / z.sd_d
    a, b = u_KP[:, 0] + alpha * z.mu_n, u_KP[:, 1] + beta * z.mu_d
    return np.stack([np.exp(u_KP[:, 2]), np.exp(a), np.exp(b), alpha, beta], 1)


def fit_approach3(runs: Runs, *, bootstrap: int = 0, seed: int = 0, confidence: float = CONFIDENCE,
                  outlier_z: float | None = None, starts: np.ndarray | None = None, gtol: float = GTOL,
                  ftol: float = FTOL, max_evals: int = MAX_EVALS, fixed_E: float | None = None) -> Approach3:
    """Hoffmann et al.'s Approach 3 (see the module docstring); `starts` are rows (a, b, e, α, β).

    `fixed_E` holds the irreducible loss at a known value (the entropy of a synthetic corpus's source, say) and
    fits A, B, α and β alone: every start's e becomes ln fixed_E, and E's interval is that one value. A free E is
    poorly determined when every run is far above it; a known floor removes that freedom.
    """
    runs.require(6 if fixed_E is None else 5, "Approach 3 (5 coefficients)" if fixed_E is None else
                 "Approach 3 with E fixed (4 coefficients)")
    check_bootstrap(bootstrap, confidence)
    if outlier_z is not None and not outlier_z > 0:
        raise FitError(f"the outlier threshold is {outlier_z}: it must be a positive number of deviations")
    if fixed_E is not None and not (np.isfinite(fixed_E) and 0 < fixed_E < runs.loss.min()):
        raise FitError(f"the fixed irreducible loss E = {fixed_E} must be positive and below every run's loss "
                       f"(lowest {runs.loss.min():.6g} in {runs.source})")
    starts = approach3_starts() if starts is None else np.asarray(starts, np.float64).reshape(-1, 5)
    objective = _huber_value_and_grad
    if fixed_E is not None:
        starts = np.unique(np.concatenate([starts[:, :2], np.full((len(starts), 1), np.log(fixed_E)),
                                           starts[:, 3:]], 1), axis=0)
        objective = _huber_fixed_e_value_and_grad
    z, u, value, solver = _approach3_minimum(runs, starts, gtol, ftol, max_evals, objective)
    removed = ()
    if outlier_z is not None:
        residual = np.log(Approach3._loss(_to_natural(z, u[None]), runs.n, runs.d)[0]) - np.log(runs.loss)
        deviation = np.abs(residual - np.median(residual))
        scale = 1.4826 * np.median(deviation)
        outlier = deviation > outlier_z * scale if scale > 0 else np.zeros(len(runs), bool)
        if outlier.any():
            removed = tuple(runs.rows[outlier].tolist())
            runs = runs.subset(~outlier)
            runs.require(6, f"Approach 3 after removing {len(removed)} outliers")
            z, u, value, solver = _approach3_minimum(runs, starts, gtol, ftol, max_evals, objective)
    if fixed_E is not None:
        solver["fixed_E"] = float(fixed_E)
    samples = np.zeros((0, 5))
    if bootstrap:
        again = lbfgs.minimize(objective, np.repeat(u[None], bootstrap, 0),
                               (z.resampled_weights(bootstrap, seed),), (z.zn, z.zd, z.log_loss), gtol=gtol,
                               ftol=ftol, max_evals=max_evals)
        samples = _to_natural(z, again.x_SP)
        solver["bootstrap_unfinished"] = int(np.sum(~again.converged_S & ~again.stalled_S))
    best = _to_natural(z, u[None])[0]
    pick = lambda i: estimate(best[i], samples[:, i] if bootstrap else None, confidence)
    return Approach3(pick(0), pick(1), pick(2), pick(3), pick(4), samples, value, solver, removed, len(runs))


def _allocation(params_K5, compute):
    """N_opt and D_opt (K, M) at compute C (M,), and a, b, G (K,), from rows (E, A, B, α, β)."""
    _, A, B, alpha, beta = params_K5.T
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    c6 = np.asarray(compute, np.float64).reshape(1, -1) / 6.0
    return G[:, None] * c6 ** a[:, None], c6 ** b[:, None] / G[:, None], a, b, G


def allocation_exponents(fit: Approach3, confidence: float = CONFIDENCE) -> dict:
    """a = β/(α+β), b = α/(α+β) and G = (αA/(βB))^(1/(α+β)), with intervals."""
    _, _, a, b, G = _allocation(fit.params()[None], [1.0])
    boot = _allocation(fit.samples, [1.0]) if len(fit.samples) else None
    return {name: estimate(value[0], None if boot is None else boot[i + 2], confidence)
            for i, (name, value) in enumerate((("a", a), ("b", b), ("G", G)))}


def optimal_allocation(fit: Approach3, compute: float, confidence: float = CONFIDENCE) -> dict:
    """N_opt(C), D_opt(C) and the predicted loss there, each with its interval."""
    if not (np.isfinite(compute) and compute > 0):
        raise FitError(f"the compute budget is {compute}: it must be finite and positive")
    n, d = fit.allocation([compute])
    result = {"C": float(compute)}
    nb = db = loss_b = None
    if len(fit.samples):
        nb, db, *_ = _allocation(fit.samples, [compute])
        nb, db = nb[:, 0], db[:, 0]
        E, A, B, alpha, beta = fit.samples.T                  # each resample's own law at its own optimum
        loss_b = E + A / nb ** alpha + B / db ** beta
    result["N_opt"] = estimate(n[0], nb, confidence)
    result["D_opt"] = estimate(d[0], db, confidence)
    result["loss"] = estimate(fit.predict(n, d)[0], loss_b, confidence)
    return result


def predict_loss(fit: Approach3, n: float, d: float, confidence: float = CONFIDENCE) -> Estimate:
    """L(N, D) of the fitted law with the bootstrap interval of the law at that point."""
    for name, value in (("N", n), ("D", d)):
        if not (np.isfinite(value) and value > 0):
            raise FitError(f"cannot predict the loss at {name} = {value}: it must be finite and positive")
    samples = Approach3._loss(fit.samples, [n], [d])[:, 0] if len(fit.samples) else None
    return estimate(fit.predict([n], [d])[0], samples, confidence)


# ------------------------------------------------------------------------------------------- extrapolation

def extrapolation_check(runs: Runs, fit: Callable[[Runs], object], holdout_fraction: float = 0.2) -> dict:
    """Fits `fit(runs)` (anything with `.predict(N, D)`) on the runs below a compute cutoff and compares its
    predictions with the held-out runs at or above it: the cutoff is the (1 − holdout_fraction) quantile of C,
    so runs of one IsoFLOP budget stay together."""
    if not 0 < holdout_fraction < 1:
        raise FitError(f"the holdout fraction is {holdout_fraction}: it must lie strictly between 0 and 1")
    cutoff = float(np.quantile(runs.flops, 1.0 - holdout_fraction))
    held = runs.flops >= cutoff
    if held.all() or not held.any():
        raise FitError(f"{runs.source}: no compute cutoff leaves runs on both sides (holdout {holdout_fraction})")
    fitted = fit(runs.subset(~held))
    test = runs.subset(held)
    predicted = np.asarray(fitted.predict(test.n, test.d))
    relative = predicted / test.loss - 1.0
    return {"compute_cutoff": cutoff, "fit_runs": int((~held).sum()), "held_out_runs": int(held.sum()),
            "mean_abs_relative_error": float(np.mean(np.abs(relative))),
            "max_abs_relative_error": float(np.max(np.abs(relative))),
            "rmse_log_loss": float(np.sqrt(np.mean(np.log(predicted / test.loss) ** 2))),
            "held_out": [{"row": int(r), "N": float(n), "D": float(d), "C": float(c), "loss": float(l),
                          "predicted": float(p)}
                         for r, n, d, c, l, p in zip(test.rows, test.n, test.d, test.flops, test.loss, predicted)]}
