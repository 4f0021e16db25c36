"""compare (llm_jax/eval/compare.py) end to end on tiny saved runs: two identical runs tie (win rate 0.5, equal
ratings), a run whose answers the judge always prefers wins, every competitor answers the same prompts (a base model
through plain-text k-shot prompts), the files, and the bad inputs named. The arithmetic of win rates and ratings is
tested on hand-made score matrices in test_arena.py."""
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.data import default_task
from llm_jax.data.sources import DataError
from llm_jax.eval.compare import CompareError, Competitor, compare
from llm_jax.eval.judges import JudgeError
from llm_jax.generate import SamplingConfig

TASK = [{"prompt": f"say something about {w}", "reference": w, "id": i}
        for i, w in enumerate(["sun", "sea", "hill", "tree", "road", "rain"])]
SAMPLING = SamplingConfig(max_new_tokens=4, temperature=0.0)
JUDGE_MODULE = '''
def says_something(prompts, responses):
    """1 for an answer with any text in it, 0 for an empty one."""
    return [float(bool(r.strip())) for r in responses]
'''


@pytest.fixture(scope="module")
def runs(small_tokenizer, tmp_path_factory):
    """talker and twin: the same fresh SFT model saved twice; mute: one whose every answer ends at once (the
    first token is always <|end|>: the tests/conftest.py stopping policy with a gap no other token can beat)."""
    from run_fixtures import RL_MODEL_OVERRIDES, save_run

    from llm_jax.data.tokenizer import Tokenizer
    end = Tokenizer.load(small_tokenizer).special_id("<|end|>")

    def mute(params):
        p = params["params"]
        table_vd = p["embedding"].at[:, 0].set(1.0).at[end, 0].set(5.0)
        scale_d = jnp.zeros_like(p["final_norm"]["scale"]).at[0].set(1.0)
        return {"params": {**p, "embedding": table_vd, "final_norm": {"scale": scale_d}}}

    root = tmp_path_factory.mktemp("compare")
    overrides = [o for o in RL_MODEL_OVERRIDES if not o.startswith("data.seq_len")] + ["data.seq_len=256"]
    return {name: save_run(root / name, "configs/sft.py:tiny", small_tokenizer, edit, overrides=overrides)
            for name, edit in (("talker", lambda p: p), ("twin", lambda p: p), ("mute", mute))}


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TASK))
    return str(path)


@pytest.fixture
def judge(tmp_path, monkeypatch):
    (tmp_path / "compare_judge.py").write_text(JUDGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "compare_judge", raising=False)
    return "compare_judge:says_something"


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_identical_runs_tie_and_the_preferred_run_wins_on_the_same_prompts(runs, task, judge, tmp_path):
    out = str(tmp_path / "arena")
    competitors = [Competitor("talker", runs["talker"]), Competitor("twin", runs["twin"]),
                   Competitor("mute", runs["mute"]), Competitor("base", runs["talker"], chat_template=False,
                                                                 few_shot=2)]
    result = compare(competitors, task, judge, SAMPLING, out, baseline="twin", bootstrap=200)

    prompts = _rows(os.path.join(out, "prompts.jsonl"))
    assert prompts == TASK
    answers = {c.name: _rows(os.path.join(out, f"{c.name}.jsonl")) for c in competitors}
    for name, rows in answers.items():  # every competitor answered the same prompts, in the same order
        assert [r["metadata"]["source"] for r in rows] == TASK, name
    assert [r["response"] for r in answers["talker"]] == [r["response"] for r in answers["twin"]]
    assert all(r["response"] for r in answers["talker"]) and not any(r["response"] for r in answers["mute"])
    base_prompts = _rows(os.path.join(out, "base.prompts.jsonl"))
    assert all(p["prompt"].count("\n\n") == 2 and p["prompt"].endswith(f"{TASK[i]['prompt']}\n")
               for i, p in enumerate(base_prompts))

    assert result["win_rates"]["talker"]["rate"]["value"] == 0.5 and result["win_rates"]["talker"]["ties"] == 6
    assert result["win_rates"]["mute"]["rate"] == {"value": 0.0, "ci": [0.0, 0.0]}
    ratings = {n: r["value"] for n, r in result["ratings"].items()}
    assert ratings["talker"] == pytest.approx(ratings["twin"]) and ratings["twin"] > ratings["mute"] + 100
    assert result["win_matrix"]["talker"]["mute"] == 1.0 and result["win_matrix"]["talker"]["twin"] == 0.5
    assert result["mean_scores"]["talker"]["value"] == 1.0 and result["mean_scores"]["mute"]["value"] == 0.0
    assert result["stopped"]["mute"] == 1.0 and result["baseline"] == "twin" and result["n_prompts"] == 6

    table = open(os.path.join(out, "arena.md")).read()
    assert table == result["table"] and "| model | rating |" in table and "win rate vs twin" in table
    assert "| twin (baseline) |" in table and "| mute | 0.000 [0.000, 0.000] | 0 / 0 / 6 |" in table
    saved = json.load(open(os.path.join(out, "arena.json")))
    assert saved["ratings"] == json.loads(json.dumps(result["ratings"]))
    assert set(saved) >= {"win_matrix", "win_rates", "mean_scores", "competitors", "sampling"}
    assert os.path.getsize(os.path.join(out, "arena.png")) > 1000


def test_two_competitors_are_one_win_rate_and_default_task_is_its_held_out_prompts(runs, tmp_path):
    out = str(tmp_path / "pair")
    result = compare([Competitor("a", runs["talker"]), Competitor("b", runs["mute"])], "default_task", "gold",
                     SAMPLING, out, n_prompts=5, bootstrap=0, plots=False)
    expected = [r for _, r in zip(range(5), default_task.iter_records("prompts_eval"))]
    prompts = _rows(os.path.join(out, "prompts.jsonl"))
    assert [{k: p[k] for k in ("prompt", "task")} for p in prompts] == expected
    assert all(p["reference"] == default_task.gold_answer(p["prompt"]) for p in prompts)
    assert result["baseline"] == "b" and set(result["win_rates"]) == {"a"}
    assert result["win_rate"] == result["win_rates"]["a"] and result["win_rate"]["rate"]["ci"] is None
    gold = [[r["gold_score"] for r in _rows(os.path.join(out, f"{n}.jsonl"))] for n in "ab"]
    a, b = np.array(gold)
    assert result["win_rate"]["rate"]["value"] == pytest.approx(np.mean((a > b) + 0.5 * (a == b)))
    assert not os.path.exists(os.path.join(out, "arena.png"))


@pytest.mark.parametrize("make, error, message", [
    (lambda r: [Competitor("a", r["talker"])], CompareError, "at least 2 competitors, got 1"),
    (lambda r: [Competitor("a", r["talker"]), Competitor("a", r["mute"])], CompareError, "'a' is given 2 times"),
    (lambda r: [Competitor("a/b", r["talker"]), Competitor("c", r["mute"])], CompareError, "name 'a/b' must be"),
    (lambda r: [Competitor("prompts", r["talker"]), Competitor("c", r["mute"])], CompareError, "not 'prompts'"),
    (lambda r: [Competitor("a", r["talker"]), Competitor("b", "no/such/run")], CompareError,
     "competitor 'b': run directory 'no/such/run' does not exist"),
    (lambda r: [Competitor("a", r["talker"], few_shot=-1), Competitor("b", r["mute"])], CompareError,
     "few_shot must be a number ≥ 0, got -1"),
    (lambda r: [Competitor("a", r["talker"], few_shot=6), Competitor("b", r["mute"])], ValueError,
     r"k=6 demonstrations, but its pool \(the task's other records\) has only 5 records"),
])
def test_bad_competitors_are_named(runs, task, judge, tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        compare(make(runs), task, judge, SAMPLING, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # nothing is written before everything is checked


def test_a_prompt_plain_text_cannot_show_is_named_before_anything_runs(runs, judge, tmp_path):
    task = tmp_path / "turns.jsonl"
    task.write_text(json.dumps({"prompt": [{"role": "user", "content": "q"}], "reference": "a"}) + "\n")
    pair = [Competitor("chat", runs["talker"]), Competitor("base", runs["talker"], chat_template=False)]
    with pytest.raises(DataError, match=r"turns.jsonl:1: a plain-text prompt is one text"):
        compare(pair, str(task), judge, SAMPLING, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_missing_baseline_and_an_unjudged_prompt_are_named(runs, task, judge, tmp_path):
    pair = [Competitor("a", runs["talker"]), Competitor("b", runs["mute"])]
    with pytest.raises(CompareError, match=r"baseline 'sft' is not a competitor; competitors: \['a', 'b'\]"):
        compare(pair, task, judge, SAMPLING, str(tmp_path / "out"), baseline="sft")
    with pytest.raises(JudgeError, match=r"task.jsonl:1: judge gold does not judge this prompt"):
        compare(pair, task, "gold", SAMPLING, str(tmp_path / "out"))
