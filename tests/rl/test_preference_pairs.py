"""`llm-jax preference-pairs`: the judge's best and worst answer of a prompt are paired (or every two answers
whose scores differ), the margin filters, identical answers never pair, the file loads as preference records,
gold agreement is counted on the pairs that gold decides; bad options and runs fail naming them.

The runs are tests/conftest.py's `tiny_rl_runs`: an untrained policy whose K samples differ (about 4 in 5 stop)
and a reward model with a random head. Pairing is checked against stub judges whose scores are known functions
of the answer text; one test scores with the real reward model."""
import json
import shutil

import numpy as np
import pytest

from llm_jax import cli
from llm_jax.data import default_task
from llm_jax.data.records import iter_preference_examples
from llm_jax.generate import SamplingConfig
from llm_jax.objectives import reward
from llm_jax.rl.preference_pairs import MARGIN_SLACK, preference_pairs, select_pairs
from llm_jax.eval.judges import RewardModelJudge
from llm_jax.train.checkpoint import CheckpointError

PROMPTS = [
    {"prompt": "reverse, vaplem bru sia", "task": "reverse"},
    {"prompt": "copy, gaiet bru", "system": "answer briefly", "task": "copy"},
    {"prompt": "last, zuma kear choo", "task": "last"},
    {"prompt": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "and again"}], "id": 7},
]
K = 6
SAMPLING = SamplingConfig(max_new_tokens=8, temperature=1.0)


def _words(text):
    """A stub reward: the answer's word count (random answers of up to 8 tokens tie often and differ often)."""
    return float(len(text.split()))


def _gold(prompt, response):
    """A stub gold score in {0, 0.25, ..., 1} that disagrees with `_words` on some pairs."""
    return (len(response) % 5) / 4


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return str(path)


@pytest.fixture
def stub_judges(monkeypatch, prompts_file):
    """The reward judge scores `_words`, the gold score is `_gold`; returns {where: [(answer, score)]} of every
    candidate the reward judge scored, in candidate order."""
    seen = {}

    def score(self, prompts, responses):
        for prompt, response in zip(prompts, responses):
            where = f"{prompts_file}:{[p['prompt'] for p in PROMPTS].index(prompt['prompt']) + 1}"
            seen.setdefault(where, []).append((response, _words(response)))
        return np.array([_words(r) for r in responses], np.float32)

    monkeypatch.setattr(RewardModelJudge, "score", score)
    monkeypatch.setattr(default_task, "gold_score", _gold)
    return seen


def _read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _index(record):
    return int(record["where"].rsplit(":", 1)[1]) - 1


def _run(policy, judge, prompts_file, out, **kwargs):
    return preference_pairs(policy, judge, prompts_file, str(out), K, SAMPLING, batch_size=8, seed=0,
                            progress=False, **kwargs)


def test_select_pairs_merges_identical_answers_and_applies_the_margin():
    texts, scores = ["a", "b", "a", "c", "d"], [1.0, 0.5, 0.0, 0.5, 0.0]
    # "a" keeps its first score (1.0): the second "a" (0.0) is the same answer, never the worst
    assert select_pairs(texts, scores, "best-worst", 0.0) == ([(0, 4)], None)
    assert select_pairs(texts, scores, "best-worst", 1.0) == ([(0, 4)], None)
    assert select_pairs(texts, scores, "best-worst", 1.5) == ([], "below_margin")
    # all: distinct answers 0, 1, 3, 4; the tie 1 ~ 3 makes no pair
    assert select_pairs(texts, scores, "all", 0.0) == ([(0, 1), (0, 3), (0, 4), (1, 4), (3, 4)], None)
    assert select_pairs(texts, scores, "all", 0.6)[0] == [(0, 4)]
    assert select_pairs(texts, scores, "all", 0.5)[0] == [(0, 1), (0, 3), (0, 4), (1, 4), (3, 4)]
    # ties of the best or the worst: the first of each
    assert select_pairs(["x", "y", "z", "w"], [2.0, 2.0, 1.0, 1.0], "best-worst", 0.0)[0] == [(0, 2)]
    # a gold 1 − 0.8 clears a margin of 0.2
    assert 1.0 - 0.8 < 0.2 and select_pairs(["g", "h"], [0.8, 1.0], "best-worst", 0.2)[0] == [(1, 0)]
    assert select_pairs(["g", "h"], [0.8, 1.0], "best-worst", 0.2 + 10 * MARGIN_SLACK)[1] == "below_margin"
    assert select_pairs(["a", "a", "a"], [1.0, 0.0, 0.5], "all", 0.0) == ([], "fewer_than_two_distinct")
    assert select_pairs([], [], "best-worst", 0.0) == ([], "fewer_than_two_distinct")
    assert select_pairs(["a", "b", "c"], [0.3, 0.3, 0.3], "all", 0.0) == ([], "all_tied")


def test_best_worst_pairs_the_judges_max_and_min_and_counts_gold_agreement(tiny_rl_runs, prompts_file, tmp_path,
                                                                           stub_judges):
    policy, rm = tiny_rl_runs
    out = tmp_path / "pairs" / "rm.jsonl"
    summary = _run(policy, rm, prompts_file, out)
    written = _read(out)

    assert summary["count"] == len(PROMPTS) and summary["samples"] == len(PROMPTS) * K
    assert 0 < summary["stopped"] < summary["samples"]
    assert summary["candidates"] + summary["reserved_symbol"] + summary["too_long_for_reward"] == summary["stopped"]
    assert summary["judged"] == summary["candidates"] == sum(map(len, stub_judges.values()))
    assert summary["unjudged_prompts"] == 0 and summary["min_margin"] == 0.0 and summary["pairing"] == "best-worst"
    assert summary["pairs"] == summary["prompts_with_pairs"] == len(written) >= 2
    assert summary["count"] == summary["prompts_with_pairs"] + summary["no_pair"]
    assert summary["no_pair"] == sum(summary[f"no_pair_{r}"] for r in ("fewer_than_two_distinct", "all_tied",
                                                                      "below_margin"))
    assert summary["samples_per_s"] > 0

    assert len({r["where"] for r in written}) == len(written)  # one pair a prompt
    for record in written:
        candidates = stub_judges[record["where"]]
        scores = [s for _, s in candidates]
        best = next(a for a, s in candidates if s == max(scores))  # the first of the best
        worst = next(a for a, s in candidates if s == min(scores))
        assert (record["chosen"], record["rejected"]) == (best, worst) and best != worst
        assert (record["chosen_score"], record["rejected_score"]) == (max(scores), min(scores))
        assert record["judge"] == rm
        prompt = PROMPTS[_index(record)]
        assert record["prompt"] == prompt["prompt"] and record.get("system") == prompt.get("system")
    assert summary["score_mean"] == pytest.approx(np.mean([s for c in stub_judges.values() for _, s in c]))
    assert summary["score_chosen"] == pytest.approx(np.mean([r["chosen_score"] for r in written]))
    assert summary["score_rejected"] == pytest.approx(np.mean([r["rejected_score"] for r in written]))

    # Gold agreement: over the pairs of "task" prompts whose gold scores differ, chosen ahead by gold.
    gold = [(_gold(None, r["chosen"]), _gold(None, r["rejected"])) for r in written if "task" in PROMPTS[_index(r)]]
    decided = [c > r for c, r in gold if c != r]
    assert summary["gold_pairs"] == len(gold) and summary["gold_decided"] == len(decided) > 0
    assert summary["gold_agreement"] == pytest.approx(np.mean(decided))
    assert summary["gold_score_chosen"] == pytest.approx(np.mean([c for c, _ in gold]))
    assert summary["gold_score_rejected"] == pytest.approx(np.mean([r for _, r in gold]))

    # The file is preference data as it stands.
    examples = list(iter_preference_examples(str(out)))
    assert [(e.chosen, e.rejected) for e in examples] == [(r["chosen"], r["rejected"]) for r in written]
    assert all(e.prompt[-1].role == "user" for e in examples)


def test_all_pairs_every_two_answers_that_differ_and_the_margin_filters(tiny_rl_runs, prompts_file, tmp_path,
                                                                        stub_judges):
    policy, rm = tiny_rl_runs
    every = _run(policy, rm, prompts_file, tmp_path / "all.jsonl", pairing="all")
    written = _read(tmp_path / "all.jsonl")

    expected = []  # (where, chosen, rejected), in the command's order
    for where, candidates in stub_judges.items():
        first = {}
        for answer, score in candidates:
            first.setdefault(answer, score)
        distinct = list(first.items())
        for n, (a, s) in enumerate(distinct):
            for b, t in distinct[n + 1:]:
                if s != t:
                    expected.append((where, *((a, b) if s > t else (b, a))))
    assert [(r["where"], r["chosen"], r["rejected"]) for r in written] == expected
    assert every["pairs"] == len(written) > every["prompts_with_pairs"]
    assert all(r["chosen_score"] > r["rejected_score"] and r["chosen"] != r["rejected"] for r in written)

    # The same samples (same seed) with a margin: exactly the pairs that clear it, in both modes.
    wide = _run(policy, rm, prompts_file, tmp_path / "wide.jsonl", pairing="all", min_margin=2.0)
    assert _read(tmp_path / "wide.jsonl") == [r for r in written if r["chosen_score"] - r["rejected_score"] >= 2]
    assert 0 < wide["pairs"] < every["pairs"] and wide["min_margin"] == 2.0
    best_worst = _run(policy, rm, prompts_file, tmp_path / "bw.jsonl")
    cut = _run(policy, rm, prompts_file, tmp_path / "bw_cut.jsonl", min_margin=3.0)
    kept = [r for r in _read(tmp_path / "bw.jsonl") if r["chosen_score"] - r["rejected_score"] >= 3]
    assert _read(tmp_path / "bw_cut.jsonl") == kept
    assert cut["no_pair_below_margin"] == best_worst["pairs"] - len(kept) + best_worst["no_pair_below_margin"]

    # Greedy: the K answers of a prompt are one answer, which pairs with nothing.
    greedy = preference_pairs(policy, rm, prompts_file, str(tmp_path / "greedy.jsonl"), K,
                              SamplingConfig(max_new_tokens=8, temperature=0.0), pairing="all", batch_size=8,
                              progress=False)
    assert greedy["pairs"] == 0 and greedy["no_pair_fewer_than_two_distinct"] == len(PROMPTS)
    assert _read(tmp_path / "greedy.jsonl") == []


def test_gold_judge_skips_prompts_without_a_task(tiny_rl_runs, prompts_file, tmp_path, capsys, stub_judges):
    policy, _ = tiny_rl_runs
    out = tmp_path / "gold.jsonl"
    assert cli.main(["preference-pairs", "--run", policy, "--judge", "gold", "--prompts", prompts_file, "--out",
                     str(out), "--k", str(K), "--max-new-tokens", str(SAMPLING.max_new_tokens), "--batch-size", "8",
                     "--pairs", "all"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = _read(out)
    assert summary["judge"] == "gold" and summary["min_margin"] == 0.2 and summary["unjudged_prompts"] == 1
    assert summary["count"] == 1 + summary["prompts_with_pairs"] + summary["no_pair"]
    assert summary["judged"] < summary["candidates"] and summary["pairs"] == len(written) > 0
    assert not stub_judges  # the reward model judged nothing
    for record in written:
        assert "task" in PROMPTS[_index(record)] and record["judge"] == "gold"
        assert (record["chosen_score"], record["rejected_score"]) == (_gold(None, record["chosen"]),
                                                                    _gold(None, record["rejected"]))
        assert record["chosen_score"] - record["rejected_score"] >= 0.2 - MARGIN_SLACK
    assert summary["gold_agreement"] == 1.0 and summary["gold_pairs"] == summary["gold_decided"] == len(written)


def test_the_reward_model_scores_pairs_as_its_scorer_scores_the_records(tiny_rl_runs, prompts_file, tmp_path):
    policy, rm = tiny_rl_runs
    summary = _run(policy, rm, prompts_file, tmp_path / "rm.jsonl")
    examples = list(iter_preference_examples(str(tmp_path / "rm.jsonl")))
    written = _read(tmp_path / "rm.jsonl")
    assert summary["pairs"] == len(examples) > 0 and "gold_agreement" in summary
    scorer = reward.load_scorer(rm)
    prompts = [list(e.prompt) for e in examples]
    chosen = scorer.score(prompts, [e.chosen for e in examples])
    rejected = scorer.score(prompts, [e.rejected for e in examples])
    assert chosen == pytest.approx([r["chosen_score"] for r in written], rel=1e-4, abs=1e-4)
    assert rejected == pytest.approx([r["rejected_score"] for r in written], rel=1e-4, abs=1e-4)
    assert (chosen > rejected).all()


def test_errors_name_the_options_and_the_runs(tiny_rl_runs, prompts_file, tmp_path, capsys):
    policy, rm = tiny_rl_runs
    out = tmp_path / "out.jsonl"

    def fails(*args, code=None):
        result = cli.main(["preference-pairs", "--prompts", prompts_file, "--out", str(out), *args])
        assert result != 0 and (code is None or result == code)
        return capsys.readouterr().err

    assert "k (samples per prompt) must be ≥ 2 (a pair needs two samples), got 1" in fails(
        "--run", policy, "--judge", rm, "--k", "1", code=2)
    assert "min_margin must be a finite score difference ≥ 0, got -0.1" in fails(
        "--run", policy, "--judge", "gold", "--min-margin", "-0.1", code=2)
    assert "got nan" in fails("--run", policy, "--judge", "gold", "--min-margin", "nan", code=2)
    with pytest.raises(ValueError, match="min_margin must be a finite score difference ≥ 0, got inf"):
        preference_pairs(policy, "gold", prompts_file, str(out), K, SAMPLING, min_margin=float("inf"))
    with pytest.raises(ValueError, match="pairs must be one of .*got 'best'"):
        preference_pairs(policy, "gold", prompts_file, str(out), K, SAMPLING, pairing="best")

    nowhere = str(tmp_path / "nowhere")
    err = fails("--run", policy, "--judge", nowhere, code=1)
    assert f"judge {nowhere!r}: no such reward run directory" in err
    assert f"policy run directory {nowhere!r} does not exist" in fails("--run", nowhere, "--judge", "gold")
    assert f"policy run {rm!r} is a reward model" in fails("--run", rm, "--judge", "gold")
    assert f"judge {policy!r} is a 'sft' run, not a reward model" in fails("--run", policy, "--judge", policy)
    templated = str(tmp_path / "rm_other_template")
    shutil.copytree(rm, templated)
    config = json.load(open(f"{templated}/config.json"))
    config["data"]["chat_template"] = "other"
    json.dump(config, open(f"{templated}/config.json", "w"))
    assert "uses chat template 'chatml_min' but reward run" in fails("--run", policy, "--judge", templated)

    no_tasks = tmp_path / "no_tasks.jsonl"
    no_tasks.write_text(json.dumps({"prompt": "hello"}) + "\n")
    with pytest.raises(Exception, match="judge 'gold' can judge none of its 1 prompts"):
        preference_pairs(policy, "gold", str(no_tasks), str(out), K, SAMPLING, progress=False)
    with pytest.raises(CheckpointError, match="policy run directory"):
        preference_pairs(nowhere, rm, prompts_file, str(out), K, SAMPLING)
    assert not out.exists()  # nothing written by a failed command


def test_ranking_writes_one_record_a_prompt_with_the_pairs_of_all(tiny_rl_runs, prompts_file, tmp_path, stub_judges):
    from llm_jax.data.records import iter_ranked_examples
    from llm_jax.rl.preference_pairs import ranking_of
    assert ranking_of(["a", "b", "a", "c", "d"], [1.0, 0.5, 0.0, 0.5, 0.0]) == ([0, 1, 3, 4], [0, [1, 2], 3])
    policy, rm = tiny_rl_runs
    every = _run(policy, rm, prompts_file, tmp_path / "all.jsonl", pairing="all")
    ranked = _run(policy, rm, prompts_file, tmp_path / "ranking.jsonl", pairing="ranking")
    records = _read(tmp_path / "ranking.jsonl")
    assert ranked["records"] == len(records) == ranked["prompts_with_pairs"] == every["prompts_with_pairs"]
    assert ranked["pairs"] == every["pairs"] and ranked["min_margin"] == 0.0
    for key in ("score_chosen", "score_rejected", "no_pair"):
        assert ranked[key] == pytest.approx(every[key])
    # the rankings' pairs are exactly the pairs `all` writes, prompt by prompt
    examples = iter_ranked_examples(str(tmp_path / "ranking.jsonl"))
    implied = {(r["where"], e.responses[i], e.responses[j]) for r, e in zip(records, examples) for i, j in e.pairs()}
    assert implied == {(r["where"], r["chosen"], r["rejected"]) for r in _read(tmp_path / "all.jsonl")}
    for record in records:  # best first; equal scores tied
        levels = [level if isinstance(level, list) else [level] for level in record["ranking"]]
        scores = [[record["scores"][i] for i in level] for level in levels]
        assert all(len(set(s)) == 1 for s in scores)
        assert [s[0] for s in scores] == sorted((s[0] for s in scores), reverse=True)
    with pytest.raises(ValueError, match="pairs=ranking keeps every strict preference .* got 0.2"):
        _run(policy, rm, prompts_file, tmp_path / "x.jsonl", pairing="ranking", min_margin=0.2)
