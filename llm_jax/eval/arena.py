"""Head-to-head comparisons of models under a judge: win rates and arena ratings, with bootstrap intervals.

    win_rate(scores_a_p, scores_b_p)                  -> WinRate   A against B on the same prompts
    arena(scores_mp, names)                           -> Arena     ratings of M models from all their pairs
    choose_winner(ratings, mean_scores, incumbent)    -> str       the model that goes on (an incumbent and challengers)

Every model answers the same P prompts and a judge scores each answer (`scores_mp[m, p]`). On a prompt, A beats B
when its score is higher; equal scores are a tie, counted as half a win for each, as AlpacaEval and Chatbot Arena
count them.

Win rate: w = (1/P) Σ_p (1[a_p > b_p] + ½·1[a_p = b_p]).

Arena: the Bradley–Terry model P(i beats j) = σ(θ_i − θ_j), fitted by maximum likelihood to every pair's wins on
every prompt with Hunter's MM algorithm (Hunter 2004, "MM algorithms for generalized Bradley–Terry models"):

    π_i ← W_i / Σ_{j≠i} n_ij / (π_i + π_j),     π_i = e^{θ_i},   W_i = i's wins (ties half),   n_ij = comparisons

with `prior` virtual ties added between every pair, so a model that wins every comparison still gets a finite
rating (without it the likelihood has no maximum). θ is centred (mean 0) and reported on the Elo scale of Chatbot
Arena, R_i = 1000 + (400 / ln 10)·θ_i: 400 points more is 10:1 odds.

Choosing a model: `choose_winner` keeps the incumbent (the best model so far) unless a challenger's rating beats
its rating by more than `margin` Elo points; ratings within RATING_TIE (the fit's rounding, far below anything a
prompt can move) are equal. Among challengers tied for the best rating, the higher mean score goes on, then the
first named. So a change of model needs evidence, and the same scores always give the same choice.

Intervals: the prompts are resampled with replacement `bootstrap` times and everything refitted; the interval is
the percentile interval at `confidence` (`scaling.fit.estimate`, as for the scaling-law fits).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from llm_jax.scaling.fit import Estimate, check_bootstrap, estimate, resample_counts

ELO_SCALE = 400.0 / math.log(10.0)
ELO_BASE = 1000.0
RATING_TIE = 1e-6  # Elo points: ratings closer than this are the same (the MM fit stops at 1e-10 in log-strength)


@dataclasses.dataclass(frozen=True)
class WinRate:
    rate: Estimate
    wins: int
    ties: int
    losses: int

    def to_json(self) -> dict:
        return dict(rate=self.rate.to_json(), wins=self.wins, ties=self.ties, losses=self.losses)


@dataclasses.dataclass(frozen=True)
class Arena:
    names: tuple[str, ...]
    ratings: tuple[Estimate, ...]      # Elo scale
    win_matrix: np.ndarray             # (M, M): i's share of wins against j (ties half), nan on the diagonal

    def table(self) -> str:
        """A markdown table, best first: rating with its interval, and the win share against each other model."""
        order = sorted(range(len(self.names)), key=lambda i: -self.ratings[i].value)
        head = "| model | rating | " + " | ".join(f"vs {self.names[j]}" for j in order) + " |"
        rows = [head, "|---|---:|" + "---:|" * len(order)]
        for i in order:
            r = self.ratings[i]
            interval = "" if r.low is None else f" [{r.low:.0f}, {r.high:.0f}]"
            shares = " | ".join("" if i == j else f"{self.win_matrix[i, j]:.2f}" for j in order)
            rows.append(f"| {self.names[i]} | {r.value:.0f}{interval} | {shares} |")
        return "\n".join(rows) + "\n"

    def to_json(self) -> dict:
        return dict(ratings={n: r.to_json() for n, r in zip(self.names, self.ratings)},
                    win_matrix={n: {m: (None if i == j else float(self.win_matrix[i, j]))
                                    for j, m in enumerate(self.names)} for i, n in enumerate(self.names)})


def win_rate(scores_a_p, scores_b_p, *, bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0) -> WinRate:
    """A's win rate against B from their judge scores on the same prompts (module docstring)."""
    a, b = np.asarray(scores_a_p, np.float64), np.asarray(scores_b_p, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"win_rate needs two equal, non-empty score vectors (one per prompt), got shapes "
                         f"{a.shape} and {b.shape}")
    outcome_p = (a > b) + 0.5 * (a == b)
    check_bootstrap(bootstrap, confidence)
    samples = resample_counts(a.size, bootstrap, seed) @ outcome_p / a.size if bootstrap else None
    return WinRate(estimate(outcome_p.mean(), samples, confidence), wins=int((a > b).sum()),
                   ties=int((a == b).sum()), losses=int((a < b).sum()))


def pairwise_wins(scores_mp, weights_p=None) -> np.ndarray:
    """(M, M) wins of i over j summed over prompts (ties half to each), each prompt weighted by `weights_p`."""
    s = np.asarray(scores_mp, np.float64)
    w = np.ones(s.shape[1]) if weights_p is None else np.asarray(weights_p, np.float64)
    beats = (s[:, None, :] > s[None, :, :]) + 0.5 * (s[:, None, :] == s[None, :, :])  # (M, M, P)
    wins = beats @ w
    np.fill_diagonal(wins, 0.0)
    return wins


def bradley_terry(wins_mm, prior: float = 1.0, tol: float = 1e-10, max_iter: int = 10_000) -> np.ndarray:
    """θ (mean 0) maximising the Bradley–Terry likelihood of the win counts, `prior` virtual ties per pair
    (module docstring). Raises if the MM iteration does not converge."""
    wins = np.asarray(wins_mm, np.float64) + prior / 2.0
    np.fill_diagonal(wins, 0.0)
    games = wins + wins.T
    if np.any(games.sum(1) == 0):
        missing = int(np.flatnonzero(games.sum(1) == 0)[0])
        raise ValueError(f"model {missing} has no comparison with any other (and prior=0): it cannot be rated")
    total_wins = wins.sum(1)
    pi = np.ones(len(wins))
    for _ in range(max_iter):
        denominators = (games / (pi[:, None] + pi[None, :])).sum(1)
        new = total_wins / denominators
        new /= np.exp(np.log(new).mean())  # the likelihood fixes π only up to a common factor
        if np.max(np.abs(np.log(new) - np.log(pi))) < tol:
            return np.log(new)
        pi = new
    raise ValueError(f"Bradley–Terry did not converge in {max_iter} iterations (prior={prior}); a positive prior "
                     "always converges")


def arena(scores_mp, names, *, prior: float = 1.0, bootstrap: int = 1000, confidence: float = 0.95,
          seed: int = 0) -> Arena:
    """Elo-scale Bradley–Terry ratings of M models from all pairwise comparisons on shared prompts."""
    s = np.asarray(scores_mp, np.float64)
    names = tuple(names)
    if s.ndim != 2 or s.shape[0] != len(names) or s.shape[0] < 2 or s.shape[1] == 0:
        raise ValueError(f"arena needs scores of shape (models, prompts) with at least 2 models, one row per name; "
                         f"got {s.shape} for {len(names)} names")
    check_bootstrap(bootstrap, confidence)
    wins = pairwise_wins(s)
    ratings = ELO_BASE + ELO_SCALE * bradley_terry(wins, prior)
    samples = None
    if bootstrap:
        samples = np.stack([ELO_BASE + ELO_SCALE * bradley_terry(pairwise_wins(s, counts), prior)
                            for counts in resample_counts(s.shape[1], bootstrap, seed)])
    games = wins + wins.T
    with np.errstate(invalid="ignore"):
        share = np.where(games > 0, wins / np.where(games > 0, games, 1.0), np.nan)
    np.fill_diagonal(share, np.nan)
    return Arena(names, tuple(estimate(r, None if samples is None else samples[:, i], confidence)
                              for i, r in enumerate(ratings)), share)


def choose_winner(ratings: dict[str, float], mean_scores: dict[str, float], incumbent: str, *,
                  margin: float = 0.0) -> str:
    """The model that goes on after an arena of `incumbent` and the other models of `ratings` (its challengers,
    in their order): the best challenger if its rating exceeds the incumbent's by more than `margin`, else the
    incumbent (tie rule in the module docstring)."""
    if incumbent not in ratings:
        raise ValueError(f"incumbent {incumbent!r} is not rated; rated: {list(ratings)}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number of Elo points >= 0, got {margin!r}")
    challengers = [name for name in ratings if name != incumbent]
    if not challengers:
        return incumbent
    top = max(ratings[name] for name in challengers)
    tied = [name for name in challengers if ratings[name] >= top - RATING_TIE]
    best = max(tied, key=lambda name: (mean_scores[name], -challengers.index(name)))
    return best if ratings[best] > ratings[incumbent] + margin + RATING_TIE else incumbent
