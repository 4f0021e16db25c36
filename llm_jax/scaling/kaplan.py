"""Kaplan et al. 2020's power laws (eqs. 1.1–1.5; see `fit.py` for every fit and the command).

    L(N) = (N_c / N)^α_N        on the lowest loss at each N (each size's longest run)
    L(D) = (D_c / D)^α_D        on the lowest loss at each D (the largest model trained on D tokens)
    L(C) = (C_c / C)^α_C        on the compute frontier (`fit.compute_frontier`)
    L(N, D) = [(N_c / N)^(α_N/α_D) + D_c / D]^α_D      on every run

The one-variable laws are straight lines in log–log space, fitted by least squares on ln L (bootstrap refits are
weighted fits, in closed form). L(N, D) minimises Σ (ln L̂ − ln L)² by L-BFGS (`lbfgs.py`) from a grid of
starts over the exponents and the two terms' balance, in standardised coordinates.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from llm_jax.scaling import lbfgs
from llm_jax.scaling.fit import (CONFIDENCE, FTOL, GTOL, MAX_EVALS, Estimate, JointLaw, PowerLaw,
                                 check_bootstrap, estimate, _Standardised, compute_frontier, fit_power_law)
from llm_jax.scaling.results import FitError, Runs


@dataclasses.dataclass(frozen=True)
class KaplanLaw:
    """L(x) = (x_c / x)^α: the power law ln L = α·ln x_c − α·ln x."""
    x_c: Estimate
    alpha: Estimate
    law: PowerLaw
    points: int

    def __call__(self, x):
        return self.law(x)

    def to_json(self) -> dict:
        return {"x_c": self.x_c.to_json(), "alpha": self.alpha.to_json(), "points": self.points}


def fit_kaplan_law(x, loss, *, bootstrap: int = 0, seed: int = 0, confidence: float = CONFIDENCE,
                   what: str = "L(x)") -> KaplanLaw:
    law = fit_power_law(x, loss, bootstrap=bootstrap, seed=seed, confidence=confidence, what=what)
    alpha = -law.p.value
    if not alpha > 0:
        raise FitError(f"{what}: the loss does not fall with x (fitted exponent α = {alpha:.4g})")
    log_xc = lambda ln_k, p: ln_k / -p
    xc_samples = np.exp(log_xc(law.samples[:, 0], law.samples[:, 1])) if len(law.samples) else None
    return KaplanLaw(estimate(np.exp(log_xc(np.log(law.k.value), law.p.value)), xc_samples, confidence),
                     estimate(alpha, -law.samples[:, 1] if len(law.samples) else None, confidence), law,
                     int(np.size(x)))


def lowest_per_value(values, loss):
    """Index of the lowest loss at each distinct value."""
    order = np.lexsort((loss, values))
    first = np.concatenate([[True], np.diff(values[order]) != 0])
    return order[first]


def _kaplan_value_and_grad(u_BP, w_N, zn_N, zd_N, log_loss_N, sd):
    """Σ w·(ln L̂ − ln L)², ln L̂ = α_D·ln(e^{k₁ − q·z_N} + e^{k₂ − sd·z_D}) in standardised coordinates
    (k₁ = (α_N/α_D)·(ln N_c − μ_N), q = (α_N/α_D)·σ_N, k₂ = ln D_c − μ_D, z = (ln x − μ)/σ)."""
    k1, k2, q, alpha_d = (u_BP[:, i:i + 1] for i in range(4))
    u1, u2 = k1 - q * zn_N, k2 - sd * zd_N
    m = jnp.logaddexp(u1, u2)
    p1 = jnp.exp(u1 - m)
    r = alpha_d * m - log_loss_N
    wr = 2.0 * w_N * r
    grad = jnp.stack([(wr * alpha_d * p1).sum(1), (wr * alpha_d * (1 - p1)).sum(1),
                      (-wr * alpha_d * p1 * zn_N).sum(1), (wr * m).sum(1)], 1)
    return (w_N * r * r).sum(1), grad


@dataclasses.dataclass(frozen=True)
class KaplanJoint(JointLaw):
    """L(N, D) = [(N_c/N)^(α_N/α_D) + D_c/D]^α_D."""
    N_c: Estimate
    D_c: Estimate
    alpha_N: Estimate
    alpha_D: Estimate
    samples: np.ndarray      # (B, 4): ln N_c, ln D_c, α_N, α_D per bootstrap refit
    objective: float

    def params(self) -> np.ndarray:
        return np.array([np.log(self.N_c.value), np.log(self.D_c.value), self.alpha_N.value, self.alpha_D.value])

    @staticmethod
    def _loss(params_K4, n, d):
        ln_nc, ln_dc, a_n, a_d = (params_K4[:, i:i + 1] for i in range(4))
        ln_n, ln_d = np.log(np.asarray(n, np.float64)).reshape(1, -1), np.log(np.asarray(d, np.float64)).reshape(1, -1)
        return np.exp(a_d * np.logaddexp(a_n / a_d * (ln_nc - ln_n), ln_dc - ln_d))

    def to_json(self) -> dict:
        return {"N_c": self.N_c.to_json(), "D_c": self.D_c.to_json(), "alpha_N": self.alpha_N.to_json(),
                "alpha_D": self.alpha_D.to_json(), "objective": self.objective}


def fit_kaplan_joint(runs: Runs, *, bootstrap: int = 0, seed: int = 0,
                     confidence: float = CONFIDENCE) -> KaplanJoint:
    runs.require(5, "the Kaplan L(N, D) fit (4 coefficients)")
    check_bootstrap(bootstrap, confidence)
    if np.unique(runs.n).size < 2 or np.unique(runs.d).size < 2:
        raise FitError(f"the Kaplan L(N, D) fit needs at least 2 distinct N and 2 distinct D in {runs.source}")
    z = _Standardised.of(runs)
    # back from (k₁, k₂, q, α_D): α_N/α_D = q/σ_N, ln N_c = μ_N + k₁·σ_N/q, ln D_c = μ_D + k₂
    to_natural = lambda u: np.stack([z.mu_n + u[:, 0] * z.sd_n / u[:, 2], z.mu_d + u[:, 1],
                                     u[:, 2] / z.sd_n * u[:, 3], u[:, 3]], 1)
    # starts: exponents from Kaplan's range, the two terms equal at the data's centre or either one dominant
    starts = np.array([[k1, k2, q_over * z.sd_n, alpha_d]
                       for alpha_d in (0.05, 0.1, 0.2, 0.5, 1.0) for q_over in (0.25, 0.5, 1.0, 2.0, 4.0)
                       for k1 in (-4.0, 0.0, 4.0) for k2 in (-4.0, 0.0, 4.0)])
    data = (z.zn, z.zd, z.log_loss, z.sd_d)
    found = lbfgs.minimize(_kaplan_value_and_grad, starts, (), (z.weight, *data), gtol=GTOL, ftol=FTOL,
                           max_evals=MAX_EVALS)
    best = int(np.nanargmin(np.where(np.isfinite(found.value_S), found.value_S, np.nan)))
    u_best = found.x_SP[best:best + 1]
    samples = np.zeros((0, 4))
    if bootstrap:
        again = lbfgs.minimize(_kaplan_value_and_grad, np.repeat(u_best, bootstrap, 0),
                               (z.resampled_weights(bootstrap, seed),), data, gtol=GTOL, ftol=FTOL,
                               max_evals=MAX_EVALS)
        samples = to_natural(again.x_SP)
    natural = to_natural(u_best)[0]
    pick = lambda i, f=lambda v: v: estimate(f(natural[i]), f(samples[:, i]) if bootstrap else None, confidence)
    return KaplanJoint(pick(0, np.exp), pick(1, np.exp), pick(2), pick(3), samples, float(found.value_S[best]))


@dataclasses.dataclass(frozen=True)
class KaplanFit:
    """The four laws; a one-variable law the runs cannot give is None, with the reason in `skipped`."""
    L_N: KaplanLaw | None    # on the lowest loss at each N
    L_D: KaplanLaw | None    # on the lowest loss at each D
    L_C: KaplanLaw | None    # on the compute frontier
    joint: KaplanJoint
    frontier: np.ndarray
    skipped: dict            # law name → why it was not fitted

    def predict(self, n, d):
        return self.joint.predict(n, d)

    def to_json(self) -> dict:
        laws = {"L(N)": self.L_N, "L(D)": self.L_D, "L(C)": self.L_C}
        return {name: law.to_json() for name, law in laws.items() if law is not None} | {
            "L(N,D)": self.joint.to_json(), "skipped": dict(self.skipped)}


# Why a one-variable law can fail on real sweeps: L(N) and L(D) describe runs limited by one resource only.
_ONE_RESOURCE = {
    "L(N)": "L(N) needs each size's best run to be limited by its size, not its data (Kaplan trained to near "
            "convergence); in an IsoFLOP sweep the largest models see the fewest tokens",
    "L(D)": "L(D) needs each token count's best run to be limited by its data, not its size",
    "L(C)": "the compute frontier",
}


def fit_kaplan(runs: Runs, *, bootstrap: int = 0, seed: int = 0, confidence: float = CONFIDENCE) -> KaplanFit:
    """Every law the runs support. A one-variable law whose loss does not fall along its variable (L(N) on an
    IsoFLOP sweep, say) is skipped with the reason; the joint law, fitted on every run, always is fitted."""
    runs.require(5, "the Kaplan fits")
    per_n, per_d = lowest_per_value(runs.n, runs.loss), lowest_per_value(runs.d, runs.loss)
    frontier = compute_frontier(runs.flops, runs.loss)
    options = dict(bootstrap=bootstrap, seed=seed, confidence=confidence)
    laws, skipped = {}, {}
    for name, x, loss in (("L(N)", runs.n[per_n], runs.loss[per_n]), ("L(D)", runs.d[per_d], runs.loss[per_d]),
                          ("L(C)", runs.flops[frontier], runs.loss[frontier])):
        try:
            laws[name] = fit_kaplan_law(x, loss, what=f"Kaplan {name}", **options)
        except FitError as e:
            laws[name] = None
            skipped[name] = f"{e} ({_ONE_RESOURCE[name]})"
    return KaplanFit(laws["L(N)"], laws["L(D)"], laws["L(C)"], fit_kaplan_joint(runs, **options), frontier, skipped)
