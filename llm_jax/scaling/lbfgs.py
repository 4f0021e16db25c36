"""Many independent L-BFGS minimisations at once, with one batched objective call per iteration.

Scaling-law fits minimise small objectives (4–5 parameters) from thousands of starting points (Hoffmann et al.
2022, Approach 3: a grid of 4,500 initialisations) and again for every bootstrap resample. Each problem is tiny,
so they are solved together: `value_and_grad(x_BP, *args)` takes B parameter vectors of P parameters and returns
f_B and ∇f_BP, computed by one jitted array program over every problem and data point, in float64 (the tight
tolerances below are out of float32's reach).

Each iteration evaluates exactly one trial point per problem, so no problem waits on another's line search:
    direction   d = −H·∇f, H the L-BFGS two-loop product over the last `memory` pairs (s, y) (Nocedal & Wright
                Algorithm 7.4), started from γ·I with γ = sᵀy / yᵀy of the newest pair (1/max(‖∇f‖, 1) before)
    trial       x + t·d, t = 1 first; accepted when f(x + t·d) ≤ f(x) + c₁·t·∇fᵀd (Armijo, c₁ = 1e-4)
    rejected    t shrinks to the minimiser of the quadratic through f(x), ∇fᵀd and f(x + t·d), kept within
                [0.1·t, 0.5·t]; below `min_step` the memory is cleared and the step restarts along −∇f
    memory      an accepted step adds (s, y) = (Δx, Δ∇f) only when sᵀy > 1e-10·‖s‖·‖y‖, which keeps H positive
                definite without a Wolfe curvature search
A problem stops when
    converged   max|∇f| ≤ gtol (scipy's `pgtol` rule), or
    stalled     an accepted step lowered f by at most ftol·|f| (scipy's `factr` rule, but relative to |f| alone:
                scipy divides by max(|f|, 1), which for objectives far below 1 takes almost any step as the last),
                or the line search failed even along −∇f (nothing left to gain at this precision), or
    it has used `max_evals` evaluations.
The tolerances matter: a Huber objective with δ = 1e-3 has gradients of order δ × (number of points), so a
tolerance meant for objectives of order one is met at the starting point and nothing moves.

Problems finish at very different times (most starts converge in tens of evaluations, a start on a plateau crawls
for hundreds), so each iteration evaluates only the problems still running, in chunks of two fixed sizes (each
compiled once per data shape; one program per batch size cost 0.3–0.7 s of compiling each on a 2-core CPU). The
bookkeeping (a few numbers per problem) is NumPy on the host: as one XLA program with the loop inside, it took
2–10 s to compile, longer than the fits themselves.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ARMIJO_C1 = 1e-4
LARGE_CHUNK = 512
SMALL_CHUNK = 32


class Minimum(NamedTuple):
    """Where each problem stopped."""
    x_SP: np.ndarray            # its lowest accepted point
    value_S: np.ndarray         # the objective there
    grad_max_S: np.ndarray      # max |∇f| there
    iterations_S: np.ndarray    # accepted steps
    evaluations_S: np.ndarray   # objective evaluations, the starting point's included
    converged_S: np.ndarray     # stopped by gtol
    stalled_S: np.ndarray       # stopped by ftol, by a failed steepest-descent step, or a non-finite start


@functools.cache
def _jitted(value_and_grad: Callable):
    return jax.jit(value_and_grad)


class _Objective:
    """Evaluates chosen problems in chunks of two fixed sizes, so that one objective compiles twice per data
    shape whatever the number of problems: LARGE_CHUNK while many run, SMALL_CHUNK for the last few.
    A chunk's unused rows repeat its first problem and are dropped."""

    def __init__(self, value_and_grad, per_problem_args, shared_args):
        self.fn = _jitted(value_and_grad)
        self.per_problem = [np.asarray(a) for a in per_problem_args]
        self.shared = [jnp.asarray(a) for a in shared_args]

    def _chunk(self, problems, x_BP, size):
        count = problems.size
        pad = np.zeros(size - count, np.int64)
        index = np.concatenate([problems, problems[pad]])
        f, g = self.fn(jnp.asarray(np.concatenate([x_BP, x_BP[pad]])),
                       *[jnp.asarray(a[index]) for a in self.per_problem], *self.shared)
        # sliced in NumPy: slicing the jax arrays would compile one program per count
        return np.asarray(f)[:count], np.asarray(g)[:count]

    def __call__(self, problems: np.ndarray, x_BP: np.ndarray):
        parts, start = [], 0
        while start < problems.size:
            left = problems.size - start
            size = LARGE_CHUNK if left > LARGE_CHUNK // 2 else SMALL_CHUNK
            stop = start + min(size, left)
            parts.append(self._chunk(problems[start:stop], x_BP[start:stop], size))
            start = stop
        return np.concatenate([f for f, _ in parts]), np.concatenate([g for _, g in parts])


def _direction(g_BP, s_BMP, y_BMP, rho_BM):
    """−H·g by the two-loop recursion; memory slot 0 is the newest pair, empty slots (rho = 0) change nothing."""
    q_BP = g_BP.copy()
    alphas = []
    for m in range(s_BMP.shape[1]):
        alpha_B = rho_BM[:, m] * np.einsum("bp,bp->b", s_BMP[:, m], q_BP)
        q_BP -= alpha_B[:, None] * y_BMP[:, m]
        alphas.append(alpha_B)
    empty_B = rho_BM[:, 0] == 0
    yy_B = np.einsum("bp,bp->b", y_BMP[:, 0], y_BMP[:, 0])
    gamma_B = np.where(empty_B, 1.0 / np.maximum(np.linalg.norm(g_BP, axis=1), 1.0),
                       1.0 / np.where(empty_B, 1.0, rho_BM[:, 0] * yy_B))
    r_BP = gamma_B[:, None] * q_BP
    for m in reversed(range(s_BMP.shape[1])):
        beta_B = rho_BM[:, m] * np.einsum("bp,bp->b", y_BMP[:, m], r_BP)
        r_BP += (alphas[m] - beta_B)[:, None] * s_BMP[:, m]
    return -r_BP


def minimize(value_and_grad: Callable, x0_SP, per_problem_args=(), shared_args=(), *, gtol: float, ftol: float,
             max_evals: int, memory: int = 10, min_step: float = 1e-12) -> Minimum:
    """Minimises S problems: problem i is `x ↦ value_and_grad(x, *[a[i] for a in per_problem_args], *shared_args)`.

    `value_and_grad(x_BP, *per_problem_args, *shared_args) -> (f_B, g_BP)` must treat rows independently; it is
    jitted once per function (define it at module level) and compiled for the two chunk sizes. Everything runs
    in float64. A start whose objective is not finite stays where it is, marked stalled.
    """
    # non-finite trial points are expected (an overflowing step) and handled: no warnings for them
    with jax.enable_x64(True), np.errstate(all="ignore"):
        return _minimize(value_and_grad, np.array(x0_SP, np.float64), per_problem_args, shared_args, gtol, ftol,
                         max_evals, memory, min_step)


def _minimize(value_and_grad, x0_SP, per_problem_args, shared_args, gtol, ftol, max_evals, memory, min_step):
    S, P = x0_SP.shape
    objective = _Objective(value_and_grad, per_problem_args, shared_args)
    f0_S, g0_SP = objective(np.arange(S), x0_SP)
    finite_S = np.isfinite(f0_S) & np.all(np.isfinite(g0_SP), axis=1)
    out = Minimum(x0_SP, f0_S, np.max(np.abs(g0_SP), axis=1), np.zeros(S, np.int64), np.ones(S, np.int64),
                  np.zeros(S, bool), ~finite_S)

    # the running problems, compacted; `ids` maps them back to their rows of `out`
    ids = np.flatnonzero(finite_S & (out.grad_max_S > gtol) & (max_evals > 1))
    x, f, g = x0_SP[ids], f0_S[ids], g0_SP[ids]
    B = ids.size
    s, y, rho = np.zeros((B, memory, P)), np.zeros((B, memory, P)), np.zeros((B, memory))
    d, t = _direction(g, s, y, rho), np.ones(B)
    steepest = np.ones(B, bool)                 # d is −∇f from an empty memory: a failure here is a stall
    iterations, evaluations = np.zeros(B, np.int64), np.ones(B, np.int64)

    while ids.size:
        x_try = x + t[:, None] * d
        f_try, g_try = objective(ids, x_try)
        evaluations += 1
        slope = np.einsum("bp,bp->b", g, d)                                   # < 0: d goes downhill
        finite = np.isfinite(f_try) & np.all(np.isfinite(g_try), axis=1)
        accept = finite & (f_try <= f + ARMIJO_C1 * t * slope)
        reject = ~accept

        # accepted: keep the curvature pair if it keeps H positive definite, move, find a new direction
        step, change = x_try - x, g_try - g
        sy = np.einsum("bp,bp->b", step, change)
        curved = accept & (sy > 1e-10 * np.linalg.norm(step, axis=1) * np.linalg.norm(change, axis=1))
        s[curved] = np.concatenate([step[curved, None], s[curved, :-1]], axis=1)
        y[curved] = np.concatenate([change[curved, None], y[curved, :-1]], axis=1)
        rho[curved] = np.concatenate([1.0 / sy[curved, None], rho[curved, :-1]], axis=1)
        decrease = np.where(accept, f - f_try, np.inf)
        relative_scale = np.abs(f)
        x[accept], f[accept], g[accept] = x_try[accept], f_try[accept], g_try[accept]
        iterations += accept

        # rejected: shrink the step; when it is too small, clear the memory and restart along −∇f
        excess = f_try - f - slope * t                                  # > 0 where a convex quadratic fits
        usable = finite & (excess > 0)
        t_quad = np.where(usable, -slope * t ** 2 / (2.0 * np.where(usable, excess, 1.0)), 0.1 * t)
        t_shrunk = np.clip(t_quad, 0.1 * t, 0.5 * t)
        restart = reject & (t_shrunk < min_step)
        stalled = (restart & steepest) | (accept & (decrease <= ftol * relative_scale))
        s[restart], y[restart], rho[restart] = 0.0, 0.0, 0.0

        fresh = accept | restart
        g_fresh = g[fresh]
        d_new = _direction(g_fresh, s[fresh], y[fresh], rho[fresh])
        # rounding can cost H its positive definiteness: a direction that is not downhill becomes −∇f
        downhill = np.einsum("bp,bp->b", d_new, g_fresh) < 0
        d_steepest = -g_fresh / np.maximum(np.linalg.norm(g_fresh, axis=1), 1.0)[:, None]
        d[fresh] = np.where(downhill[:, None], d_new, d_steepest)
        steepest[fresh] = ~downhill | (rho[fresh, 0] == 0)
        t = np.where(fresh, 1.0, t_shrunk)

        grad_max = np.max(np.abs(g), axis=1)
        done = (grad_max <= gtol) | stalled | (evaluations >= max_evals)
        if done.any():
            rows = ids[done]
            out.x_SP[rows], out.value_S[rows], out.grad_max_S[rows] = x[done], f[done], grad_max[done]
            out.iterations_S[rows], out.evaluations_S[rows] = iterations[done], evaluations[done]
            out.converged_S[rows] = grad_max[done] <= gtol
            out.stalled_S[rows] = stalled[done] & (grad_max[done] > gtol)
            keep = ~done
            ids, x, f, g, d, t = ids[keep], x[keep], f[keep], g[keep], d[keep], t[keep]
            s, y, rho, steepest = s[keep], y[keep], rho[keep], steepest[keep]
            iterations, evaluations = iterations[keep], evaluations[keep]
    out.converged_S[:] |= out.grad_max_S <= gtol
    return out
