"""Generative tasks (llm_jax/eval/generative.py): demonstrations drawn reproducibly by (seed, record), never the
record itself, growing by prefix with k; both formats rendered as specified; plain-text answers cut at the stop
string and judged on the record as read; the mean with its bootstrap interval; the ICL curve; bad inputs named."""
import json
import sys

import numpy as np
import pytest

from llm_jax.data import default_task
from llm_jax.data.sources import DataError
from llm_jax.eval.generative import (TaskRecord, cut_at_stop, evaluate_task, fewshot_records, icl_curve,
                                     mean_score, read_task, task_name)
from llm_jax.generate import SamplingConfig
from llm_jax.scaling.fit import FitError

TASK = [{"prompt": f"q{i}", "reference": f"a{i}", "id": i} for i in range(6)]
SAMPLING = SamplingConfig(max_new_tokens=6, temperature=0.0)
JUDGE_MODULE = '''
SEEN = []

def length(prompts, responses):
    SEEN.extend(zip(prompts, responses))
    return [float(len(r)) for r in responses]
'''


def _records(records):
    return [TaskRecord(f"task.jsonl:{i + 1}", r) for i, r in enumerate(records)]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def run_dir(small_tokenizer, tmp_path_factory):
    """A fresh SFT model with a context long enough for a few demonstrations of the embedded task."""
    from run_fixtures import RL_MODEL_OVERRIDES, save_run
    overrides = [o for o in RL_MODEL_OVERRIDES if not o.startswith("data.seq_len")] + ["data.seq_len=256"]
    return save_run(tmp_path_factory.mktemp("gen") / "sft", "configs/sft.py:tiny", small_tokenizer, lambda p: p,
                    overrides=overrides)


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    (tmp_path / "gen_judge.py").write_text(JUDGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "gen_judge", raising=False)
    return "gen_judge:length"


def test_demonstrations_are_reproducible_never_the_record_and_grow_by_prefix():
    pool = _records(TASK)
    shots = {k: [r["shots"] for r in fewshot_records(pool[:3], pool, k, seed=0)] for k in range(6)}
    for i in range(3):
        assert shots[0][i] == []
        for k in range(1, 6):
            assert len(set(shots[k][i])) == k and i not in shots[k][i]
            assert shots[k][i][:k - 1] == shots[k - 1][i]
    more = [r["shots"] for r in fewshot_records(pool, pool, 3, seed=0)]
    assert more[:3] == shots[3]  # evaluating more records does not change the earlier ones' demonstrations
    other = [r["shots"] for r in fewshot_records(pool, pool, 3, seed=1)]
    assert other != more


def test_plain_text_is_prompt_answer_blocks_then_the_prompt():
    pool = _records(TASK)
    rendered = fewshot_records(pool[:1], pool, 2, seed=0, chat_template=False)[0]
    j, m = rendered["shots"]
    assert rendered["prompt"] == f"q{j}\na{j}\n\nq{m}\na{m}\n\nq0\n"
    assert rendered["source"] == TASK[0] and rendered["source_where"] == "task.jsonl:1"
    assert fewshot_records(pool[:1], pool, 0, chat_template=False)[0]["prompt"] == "q0\n"


def test_chat_puts_the_demonstrations_as_earlier_turns_after_the_system_message():
    question = {"prompt": "q0", "system": "Be brief.", "reference": "a0"}
    pool = _records([question] + TASK[1:])
    rendered = fewshot_records(pool[:1], pool, 2, seed=0)[0]
    j, m = rendered["shots"]
    assert rendered["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"q{j}"}, {"role": "assistant", "content": f"a{j}"},
        {"role": "user", "content": f"q{m}"}, {"role": "assistant", "content": f"a{m}"},
        {"role": "user", "content": "q0"}]
    assert "system" not in rendered
    zero = fewshot_records(pool[:1], pool, 0)[0]
    assert (zero["prompt"], zero["system"]) == ("q0", "Be brief.")
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "q0"}]
    rendered = fewshot_records(_records([{"prompt": turns}]), pool[1:], 1, pool_is_task=False)[0]
    assert rendered["prompt"][2:] == turns and rendered["prompt"][1]["role"] == "assistant"


def test_a_pool_file_never_shows_the_records_own_prompt():
    questions = _records(TASK[:3])
    pool = _records([TASK[0], TASK[1], {"prompt": "other", "reference": "x"}])
    for rendered, q in zip(fewshot_records(questions, pool, 2, pool_is_task=False), TASK):
        assert all(pool[j].record["prompt"] != q["prompt"] for j in rendered["shots"])
    with pytest.raises(ValueError, match=r"task.jsonl:1: k=3 demonstrations, but the pool has only 2 records with "
                                         "another prompt"):
        fewshot_records(questions, pool, 3, pool_is_task=False)


@pytest.mark.parametrize("pool_is_task, k, message", [
    (True, 6, r"task 'mytask': k=6 demonstrations, but its pool \(the task's other records\) has only 5 records"),
    (False, 7, r"task 'mytask': k=7 demonstrations, but its pool \(the pool file\) has only 6 records"),
    (True, -1, r"task 'mytask': k must be ≥ 0, got -1"),
])
def test_k_larger_than_the_pool_is_named(pool_is_task, k, message):
    with pytest.raises(ValueError, match=message):
        fewshot_records(_records(TASK[:2]), _records(TASK), k, pool_is_task=pool_is_task, task="mytask")


def test_demonstrations_need_a_reference_and_plain_text_one_text():
    records = _records([TASK[0], {"prompt": "q1"}, TASK[2]])
    with pytest.raises(DataError, match=r"task.jsonl:2: a demonstration needs a 'reference'"):
        fewshot_records(records[:1], records, 1)
    fewshot_records(records[:1], records, 0)  # zero-shot needs none
    with pytest.raises(DataError, match=r"task.jsonl:1: a plain-text prompt is one text without a system message; "
                                        "this record has a system message"):
        fewshot_records(_records([{"prompt": "q", "system": "s"}]), [], 0, chat_template=False)


def test_the_embedded_task_is_its_held_out_prompts_with_gold_references(tmp_path):
    records = read_task("default_task")
    assert len(records) == default_task.DEFAULT_SIZES["prompts_eval"]
    for r in records[:20]:
        assert r.record["reference"] == default_task.gold_answer(r.record["prompt"]) and "task" in r.record
    bad = _write(tmp_path / "bad.jsonl", [TASK[0], {"prompt": "reverse: a b", "task": "reverse"}])
    assert task_name(bad) == "bad" and task_name("default_task") == "default_task"  # names of the files written
    with pytest.raises(DataError, match=r"bad.jsonl:2: the record has a 'task' key, so its reference is the "
                                        "embedded task's gold answer, but malformed default-task prompt"):
        read_task(bad)
    with pytest.raises(DataError, match=r"no_prompt.jsonl:1: missing key 'prompt'"):
        read_task(_write(tmp_path / "no_prompt.jsonl", [{"question": "q"}]))


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("a b\nc\nd", ("\n",)) == ("a b", "c\nd")
    assert cut_at_stop("x. y\nz", ("\n", ". ")) == ("x", "y\nz")
    assert cut_at_stop("no stop", ("\n",)) == ("no stop", None)
    assert cut_at_stop("\nlead", ("\n",)) == ("", "lead")


def test_the_mean_score_and_its_bootstrap_interval():
    score = mean_score([1.0, 0.0, 1.0, 1.0], bootstrap=2000, seed=0)
    assert score.value == 0.75 and 0.0 <= score.low < 0.75 < score.high == 1.0
    assert mean_score([1.0, 0.0, 1.0, 1.0], bootstrap=0).low is None
    same = mean_score([0.5] * 5, bootstrap=100)
    assert (same.low, same.value, same.high) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(FitError, match="bootstrap is 1"):
        mean_score([1.0], bootstrap=1)


def test_plain_text_answers_are_cut_at_the_stop_and_judged_on_the_record_as_read(run_dir, tmp_path, judge_module):
    task = _write(tmp_path / "task.jsonl", TASK)
    result = evaluate_task(run_dir, task, judge_module, k=2, chat_template=False, n_prompts=4, sampling=SAMPLING,
                           out_dir=str(tmp_path / "out"), bootstrap=200)
    rows = _rows(result["rows"])
    prompts = _rows(result["prompts"])
    assert result["rows"] == str(tmp_path / "out" / "plain_k2.jsonl") and len(rows) == len(prompts) == 4
    seen = sys.modules["gen_judge"].SEEN
    assert seen == [(TASK[i], row["response"]) for i, row in enumerate(rows)]  # the record as read, the cut answer
    from llm_jax.data.tokenizer import Tokenizer
    tokenizer = Tokenizer.load(f"{run_dir}/tokenizer.model")
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        assert row["prompt"] == prompt["prompt"] and row["metadata"]["source"] == TASK[i]
        assert "\n" not in row["response"] and row["score"] == len(row["response"])
        assert row["stopped"] == (row["continuation"] is not None or row["tokens"][-1] in tokenizer.eos_ids)
        # a completion prompt is continued, not closed: [bos] text, no end-of-sequence after it
        assert row["prompt_token_ids"] == [tokenizer.bos_id, *tokenizer.encode(prompt["prompt"])]
    assert result["score"] == pytest.approx(np.mean([len(r["response"]) for r in rows]))
    assert result["n"] == 4 and result["format"] == "plain" and result["k"] == 2
    assert result["stopped"] == pytest.approx(np.mean([r["stopped"] for r in rows]))
    assert result["interval"][0] <= result["score"] <= result["interval"][1]


def test_the_embedded_task_in_chat_judged_by_gold(run_dir, tmp_path):
    result = evaluate_task(run_dir, "default_task", "gold", k=1, n_prompts=4, sampling=SAMPLING,
                           out_dir=str(tmp_path), bootstrap=0)
    rows = _rows(result["rows"])
    for row in rows:
        source = row["metadata"]["source"]
        assert row["prompt"][-1] == {"role": "user", "content": source["prompt"]} and len(row["prompt"]) == 3
        assert row["gold_score"] == default_task.gold_score(source["prompt"], row["response"])
    assert result["score"] == pytest.approx(np.mean([r["gold_score"] for r in rows]))
    assert result["interval"] is None and result["judge"] == "gold" and result["format"] == "chat"


def test_the_icl_curve_scores_each_k_on_the_same_records(run_dir, tmp_path, judge_module):
    task = _write(tmp_path / "task.jsonl", TASK)
    curve = icl_curve(run_dir, task, (0, 1, 3), judge_module, chat_template=False, n_prompts=3, sampling=SAMPLING,
                      out_dir=str(tmp_path / "icl"), bootstrap=0)
    assert list(curve["scores"]) == [0, 1, 3] and curve["n"] == 3 and curve["format"] == "plain"
    shots = {k: [p["shots"] for p in _rows(curve["points"][k]["prompts"])] for k in (1, 3)}
    assert all(three[:1] == one for one, three in zip(shots[1], shots[3]))
    for k, point in curve["points"].items():
        assert curve["scores"][k] == point["score"] and point["k"] == k
    with pytest.raises(ValueError, match=r"k=6 demonstrations, but its pool \(the task's other records\) has only 5"):
        icl_curve(run_dir, task, (0, 6), judge_module)
    with pytest.raises(ValueError, match=r"ks must be distinct numbers of demonstrations ≥ 0, got \[1, 1\]"):
        icl_curve(run_dir, task, (1, 1), judge_module)


@pytest.mark.parametrize("kwargs, message", [
    (dict(judge="nojudge"), "judge 'nojudge' is neither a built-in"),
    (dict(n_prompts=0), "n_prompts must be ≥ 1"),
    (dict(bootstrap=1), "bootstrap is 1"),
    (dict(chat_template=False, stop=""), "plain-text answers need a stop string"),
])
def test_bad_options_are_named(run_dir, tmp_path, kwargs, message):
    task = _write(tmp_path / "task.jsonl", TASK)
    with pytest.raises(ValueError, match=message):
        evaluate_task(run_dir, task, **{"judge": "exact_match", **kwargs})
