"""The judge protocol and the verifiable judges, on hand-made prompts and responses."""
import sys

import numpy as np
import pytest

from llm_jax.eval import judges


def _prompts(*references):
    return [{"prompt": f"q{i}", "reference": r} for i, r in enumerate(references)]


def test_exact_match():
    judge = judges.load_judge("exact_match")
    scores = judge.score(_prompts("Paris", "42", "yes"), [" Paris\n", "41", "Yes"])
    np.testing.assert_array_equal(scores, [1.0, 0.0, 0.0])
    assert scores.dtype == np.float32
    assert judges.exact_match(_prompts("yes"), ["YES "], casefold=True) == [1.0]


def test_regex_match_is_a_full_match():
    scores = judges.load_judge("regex_match").score(_prompts(r"\d+ apples", r"(?i)yes"),
                                                     ["12 apples", "yes, and more"])
    np.testing.assert_array_equal(scores, [1.0, 0.0])


def test_numeric_match_reads_the_last_number_with_a_tolerance():
    prompts = _prompts("1,234", "0.5", "-3", "7")
    responses = ["so 617 + 617 = 1234", "about 0.5000001", "the answer is 3", "no number here"]
    np.testing.assert_array_equal(judges.load_judge("numeric_match").score(prompts, responses), [1, 1, 0, 0])
    assert judges.numeric_match(_prompts("100"), ["101"], rel_tol=0.02) == [1.0]
    assert judges.last_number("x = 1.5e3, then 2") == 2.0 and judges.last_number("none") is None


def test_a_user_judge_by_module_and_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, responses):\n    return [len(r) for r in responses]\n\n"
        "def one_short(prompts, responses):\n    return [1.0] * (len(responses) - 1)\n\n"
        "def not_finite(prompts, responses):\n    return [float('nan')] * len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    judge = judges.load_judge("my_rewards:length")
    np.testing.assert_array_equal(judge.score(_prompts("a", "b"), ["abc", ""]), [3.0, 0.0])
    with pytest.raises(judges.JudgeError, match=r"judge my_rewards:one_short returned scores of shape \(1,\) for 2"):
        judges.load_judge("my_rewards:one_short").score(_prompts("a", "b"), ["x", "y"])
    with pytest.raises(judges.JudgeError, match=r"judge my_rewards:not_finite returned nan for response 0"):
        judges.load_judge("my_rewards:not_finite").score(_prompts("a"), ["x"])


@pytest.mark.parametrize("spec, message", [
    ("nonexistent_module_xyz:f", "module 'nonexistent_module_xyz' does not import"),
    ("llm_jax.eval.judges:no_such_function", "has no function 'no_such_function'"),
    ("exactmatch", "neither a built-in"),
])
def test_a_judge_that_cannot_be_loaded_is_named(spec, message):
    with pytest.raises(judges.JudgeError, match=message):
        judges.load_judge(spec)


def test_missing_references_and_bad_patterns_are_named():
    with pytest.raises(judges.JudgeError, match="needs a 'reference' in every prompt record; prompt 0"):
        judges.load_judge("exact_match").score([{"prompt": "q"}], ["a"])
    with pytest.raises(judges.JudgeError, match="is not a regular expression"):
        judges.load_judge("regex_match").score(_prompts("(unclosed"), ["a"])
    with pytest.raises(judges.JudgeError, match="got 2 prompts for 1 responses"):
        judges.load_judge("exact_match").score(_prompts("a", "b"), ["a"])
