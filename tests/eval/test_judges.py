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
    assert scores.dtype == np.float64
    assert judges.exact_match(_prompts("yes"), ["YES "], casefold=True) == [1.0]


def test_scores_keep_the_judges_own_numbers():
    # float64: a gold margin of 1 − 0.8 stays 0.2 within preference_pairs' slack (float32 would give 0.1999999881)
    from llm_jax.rl.preference_pairs import GOLD_MIN_MARGIN, select_pairs
    scores = judges.FunctionJudge("f", lambda p, r: [1.0, 0.8]).score(_prompts("a", "b"), ["x", "y"])
    assert scores[0] - scores[1] == 1.0 - 0.8
    assert select_pairs(["x", "y"], scores, "best-worst", GOLD_MIN_MARGIN) == ([(0, 1)], None)


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


def test_the_gold_judge_is_the_embedded_tasks_program():
    from llm_jax.data import default_task
    words = default_task.TASK_WORDS[:3]
    record = {"prompt": f"reverse, {' '.join(words)}", "task": "reverse"}
    answers = [" ".join(reversed(words)), words[2], ""]
    judge = judges.load_judge("gold")
    assert judge.name == "gold" and judges.applies(judge, record) and not judges.applies(judge, {"prompt": "hi"})
    np.testing.assert_allclose(judge.score([record] * 3, answers),
                               [default_task.gold_score(record["prompt"], a) for a in answers])
    assert judge.score([record], answers[:1])[0] == 1.0
    with pytest.raises(judges.JudgeError, match="judges only the embedded task's records .* prompt 1 has none"):
        judge.score([record, {"prompt": "hi"}], ["a", "b"])


def test_prompt_records_round_trip_their_messages():
    from llm_jax.data.records import Message, PromptExample
    for messages in ([Message("user", "hi")], [Message("system", "be brief"), Message("user", "hi")],
                     [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]):
        record = judges.prompt_record(PromptExample(tuple(messages), {"task": "copy"}, "f:1"))
        assert record["task"] == "copy" and judges.record_messages(record) == messages
        assert judges.last_user_turn(record) == messages[-1].content


def test_the_reward_model_judge_scores_the_record_as_written(tiny_rl_runs, tmp_path):
    from llm_jax.objectives.reward import load_scorer
    policy, rm = tiny_rl_runs
    judge = judges.load_judge(rm, batch_size=4)
    assert isinstance(judge, judges.RewardModelJudge) and judge.name == rm
    prompts = [{"prompt": "reverse, bru sia"}, {"prompt": "copy, sia", "system": "answer briefly"}]
    responses = ["sia bru", "sia"]
    expected = load_scorer(rm, 4).score(["reverse, bru sia", [judges.Message("system", "answer briefly"),
                                                               judges.Message("user", "copy, sia")]], responses)
    np.testing.assert_allclose(judge.score(prompts, responses), expected, rtol=1e-6)
    assert judge.fits(prompts[0], "sia") and not judge.fits(prompts[0], "sia " * 500)
    with pytest.raises(judges.JudgeError, match=f"judge {rm}: .*reward model's context"):
        judge.score(prompts[:1], ["sia " * 500])
    with pytest.raises(judges.JudgeError, match="is a 'sft' run, not a reward model"):
        judges.load_judge(policy)
    with pytest.raises(judges.JudgeError, match="no such reward run directory"):
        judges.load_judge(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(judges.JudgeError, match="is a directory but not a run"):
        judges.load_judge(str(tmp_path / "empty"))
