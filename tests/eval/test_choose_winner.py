"""choose_winner: the best-rated challenger goes on only if it beats the incumbent; ties keep the incumbent, then
go to the higher mean score, then to the first named challenger."""
import pytest

from llm_jax.eval.arena import arena, choose_winner


def _rated(scores: dict[str, list[float]]):
    """(ratings, mean scores) of an arena of these per-prompt scores (no bootstrap)."""
    board = arena(list(scores.values()), list(scores), bootstrap=0)
    ratings = {n: r.value for n, r in zip(board.names, board.ratings)}
    return ratings, {n: sum(s) / len(s) for n, s in scores.items()}


def test_the_best_rated_challenger_goes_on():
    ratings, means = _rated({"sft": [0.5, 0.5, 0.5, 0.5], "sft1": [0.6, 0.4, 0.5, 0.5], "dpo1": [1, 1, 1, 0]})
    assert max(ratings, key=ratings.get) == "dpo1"
    assert choose_winner(ratings, means, "sft") == "dpo1"


def test_an_exact_tie_keeps_the_incumbent():
    # dpo1 answers exactly as the incumbent does: equal ratings from the fit, and no reason to change
    same = [0.9, 0.2, 0.7, 0.4]
    ratings, means = _rated({"sft": same, "sft1": [0.1, 0.1, 0.1, 0.1], "dpo1": list(same)})
    assert abs(ratings["sft"] - ratings["dpo1"]) < 1e-6
    assert choose_winner(ratings, means, "sft") == "sft"


def test_a_margin_asks_for_a_clear_win():
    ratings = {"sft": 1000.0, "dpo1": 1050.0}
    means = {"sft": 0.5, "dpo1": 0.6}
    assert choose_winner(ratings, means, "sft") == "dpo1"
    assert choose_winner(ratings, means, "sft", margin=49.0) == "dpo1"
    assert choose_winner(ratings, means, "sft", margin=50.0) == "sft"


def test_tied_challengers_go_by_mean_score_then_by_order():
    ratings = {"inc": 900.0, "sft1": 1050.0, "dpo1": 1050.0 + 1e-9, "avg1": 1000.0}
    assert choose_winner(ratings, {"inc": 0.1, "sft1": 0.6, "dpo1": 0.7, "avg1": 0.9}, "inc") == "dpo1"
    assert choose_winner(ratings, {"inc": 0.1, "sft1": 0.7, "dpo1": 0.7, "avg1": 0.9}, "inc") == "sft1"
    # the incumbent's mean score does not enter: ratings decide whether anything changes
    assert choose_winner({"inc": 1000.0, "a": 1000.0}, {"inc": 0.1, "a": 0.9}, "inc") == "inc"
    assert choose_winner({"inc": 1000.0}, {"inc": 0.5}, "inc") == "inc"


@pytest.mark.parametrize("incumbent, margin, message", [
    ("dpo2", 0.0, r"incumbent 'dpo2' is not rated; rated: \['sft', 'dpo1'\]"),
    ("sft", -1.0, r"margin must be a finite number of Elo points >= 0, got -1.0"),
    ("sft", float("nan"), r"margin must be .* got nan"),
])
def test_bad_input_is_named(incumbent, margin, message):
    with pytest.raises(ValueError, match=message):
        choose_winner({"sft": 1000.0, "dpo1": 1010.0}, {"sft": 0.5, "dpo1": 0.5}, incumbent, margin=margin)
