"""Win rates and Bradley–Terry arena ratings against hand-computed values and known optima."""
import math

import numpy as np
import pytest

from llm_jax.eval import arena


def test_win_rate_counts_ties_as_half():
    result = arena.win_rate([1.0, 2.0, 3.0, 5.0], [0.0, 2.0, 4.0, 1.0], bootstrap=0)
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.rate.value == pytest.approx((2 + 0.5) / 4)
    assert result.rate.low is None


def test_win_rate_interval_is_a_seeded_percentile_interval_around_the_rate():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1.0, 400), rng.normal(0.0, 1.0, 400)
    first = arena.win_rate(a, b, bootstrap=500, seed=3)
    assert first.rate.low < first.rate.value < first.rate.high
    assert first.rate.high - first.rate.low == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), rel=0.25)
    assert arena.win_rate(a, b, bootstrap=500, seed=3) == first  # reproducible


def test_two_models_bradley_terry_is_the_log_odds():
    # A beats B on 3 prompts of 4: without a prior, θ_A − θ_B = ln 3, i.e. 400·log10(3) ≈ 190.8 Elo points
    theta = arena.bradley_terry(np.array([[0.0, 3.0], [1.0, 0.0]]), prior=0.0)
    assert theta[0] - theta[1] == pytest.approx(math.log(3.0), abs=1e-8)
    assert theta.sum() == pytest.approx(0.0, abs=1e-12)
    result = arena.arena([[1, 1, 1, 0], [0, 0, 0, 1]], ["a", "b"], prior=0.0, bootstrap=0)
    assert result.ratings[0].value - result.ratings[1].value == pytest.approx(400 * math.log10(3.0))
    assert result.win_matrix[0, 1] == pytest.approx(0.75)


def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(1)
    theta = np.array([1.0, 0.4, 0.0, -1.4])
    wins = np.zeros((4, 4))
    for i in range(4):
        for j in range(i + 1, 4):
            n = 4000
            k = rng.binomial(n, 1.0 / (1.0 + math.exp(theta[j] - theta[i])))
            wins[i, j], wins[j, i] = k, n - k
    fitted = arena.bradley_terry(wins, prior=0.0)
    np.testing.assert_allclose(fitted, theta - theta.mean(), atol=0.06)


def test_a_model_that_always_wins_gets_a_finite_rating_with_the_prior():
    scores = [[1.0] * 10, [0.5] * 10, [0.0] * 10]
    result = arena.arena(scores, ["best", "mid", "worst"], bootstrap=0)
    values = [r.value for r in result.ratings]
    assert values[0] > values[1] > values[2] and all(math.isfinite(v) for v in values)
    assert np.mean(values) == pytest.approx(arena.ELO_BASE)
    assert "| best |" in result.table().splitlines()[2]  # best first


def test_arena_intervals_and_json():
    rng = np.random.default_rng(2)
    scores = rng.normal([[0.5], [0.0], [-0.2]], 1.0, (3, 300))
    result = arena.arena(scores, ["x", "y", "z"], bootstrap=200, seed=0)
    for r in result.ratings:
        assert r.low <= r.value <= r.high
    assert set(result.to_json()["ratings"]) == {"x", "y", "z"}
    assert result.to_json()["win_matrix"]["x"]["x"] is None


@pytest.mark.parametrize("call, message", [
    (lambda: arena.win_rate([1.0, 2.0], [1.0]), "equal, non-empty"),
    (lambda: arena.win_rate([1.0], [0.0], bootstrap=1), "bootstrap is 1"),
    (lambda: arena.arena([[1.0, 2.0]], ["only"]), "at least 2 models"),
    (lambda: arena.arena([[1.0], [2.0]], ["a", "b"], confidence=1.5), "confidence is 1.5"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
