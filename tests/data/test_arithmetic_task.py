"""The arithmetic task: demonstrations whose steps add up, an exact judge, disjoint splits, files byte for byte, the
`arithmetic_task[:variant]` specs, and a short SFT run that reads them."""
import json
import re

import pytest

from run_fixtures import SMALL_OVERRIDES
from llm_jax.config_lib import ConfigError, load
from llm_jax.data import arithmetic_task as at, records
from llm_jax.data.post_training import resolve_spec
from llm_jax.eval.judges import load_judge

SMALL = {"sft_train": 400, "sft_eval": 60, "prompts_train": 100, "prompts_eval": 60}
_STEP = re.compile(r"(\d(?:\+\d)*)=(\d+)")


def check_steps(prompt: str, response: str) -> int:
    """Parses a steps response and checks every column against the prompt written out by hand: the terms are the
    operands' digits of that column and the carry of the column before, the sum is theirs; returns the answer
    after "so", which must be the digits of the column sums with the last carry in front."""
    a, b = (s[::-1] for s in prompt.split("+"))  # least significant digit first
    *steps, last = response.split(", ")
    assert last.startswith("so ")
    assert len(steps) == max(len(a), len(b))
    carry, digits = 0, []
    for i, step in enumerate(steps):
        match = _STEP.fullmatch(step)
        assert match, step
        terms, total = [int(t) for t in match.group(1).split("+")], int(match.group(2))
        assert terms == [int(s[i]) for s in (a, b) if i < len(s)] + ([carry] if carry else []), (prompt, step)
        assert total == sum(terms) and total < 20
        carry, digits = total // 10, digits + [total % 10]
    answer = int(last[len("so "):])
    assert str(answer) == (str(carry) if carry else "") + "".join(map(str, reversed(digits)))
    return answer


@pytest.mark.parametrize("prompt, steps, direct", [
    ("347+285", "7+5=12, 4+8+1=13, 3+2+1=6, so 632", "632"),
    ("1206+58", "6+8=14, 0+5+1=6, 2=2, 1=1, so 1264", "1264"),
    ("58+1206", "8+6=14, 5+0+1=6, 2=2, 1=1, so 1264", "1264"),
    ("999+1", "9+1=10, 9+1=10, 9+1=10, so 1000", "1000"),
    ("10+10", "0+0=0, 1+1=2, so 20", "20"),
])
def test_demonstrations_by_hand(prompt, steps, direct):
    assert at.demonstration(prompt) == steps
    assert at.demonstration(prompt, "direct") == direct == at.gold_answer(prompt)
    assert check_steps(prompt, steps) == int(direct)


@pytest.mark.parametrize("prompt", ["", "347 + 285", "347+", "+285", "0347+285", "347-285", "3a+1", "347+285\n"])
def test_malformed_prompt_is_named(prompt):
    with pytest.raises(ValueError, match="malformed arithmetic-task prompt " + re.escape(repr(prompt))):
        at.demonstration(prompt)


def test_unknown_names_are_named():
    with pytest.raises(ValueError, match=r"unknown arithmetic-task variant 'cot'; known: \['steps', 'direct'\]"):
        at.demonstration("12+34", "cot")
    with pytest.raises(ValueError, match=r"has no 'preferences' records; it has \['sft', 'prompts'\]"):
        at.file_name("preferences", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        at.file_name("sft", "test")
    with pytest.raises(ValueError, match="unknown arithmetic-task file 'sft_cot_train'"):
        next(at.iter_records("sft_cot_train"))


def test_every_demonstration_adds_up_and_the_variants_share_prompts():
    steps = list(at.iter_records("sft_train", 300))
    direct = list(at.iter_records("sft_direct_train", 300))
    digits = set()
    for s, d in zip(steps, direct):
        a, b = at.parse_prompt(s["prompt"])
        assert check_steps(s["prompt"], s["response"]) == a + b == int(s["reference"])
        assert d["prompt"] == s["prompt"] and d["response"] == d["reference"] == s["reference"]
        digits |= {len(str(a)), len(str(b))}
    assert digits == set(range(at.MIN_DIGITS, at.MAX_DIGITS + 1))
    for r in at.iter_records("prompts_eval", 50):
        assert set(r) == {"prompt", "reference"} and r["reference"] == at.gold_answer(r["prompt"])


def test_records_are_deterministic_in_the_seed():
    assert list(at.iter_records("sft_train", 50)) == list(at.iter_records("sft_train", 50))
    assert list(at.iter_records("sft_train", 50, seed=1)) != list(at.iter_records("sft_train", 50))
    assert at.task_prompt(7, "eval") == at.task_prompt(7, "eval")


def test_files_are_byte_identical_and_cached(tmp_path):
    first = at.write_arithmetic_task(str(tmp_path / "a"), sizes=SMALL)
    second = at.write_arithmetic_task(str(tmp_path / "b"), sizes=SMALL)
    assert set(first) == set(at.FILES) | {"stats"}
    for name in first:
        with open(first[name], "rb") as f, open(second[name], "rb") as g:
            assert f.read() == g.read(), name
    for name in at.FILES:
        with open(first[name]) as f:
            assert sum(1 for _ in f) == SMALL[f"{name.split('_')[0]}_{name.split('_')[-1]}"]
    stamp = {name: (tmp_path / "a" / at.TASK_DIR / f"{name}.jsonl").stat().st_mtime_ns for name in at.FILES}
    at.write_arithmetic_task(str(tmp_path / "a"), sizes=SMALL)  # the stats match: nothing rewritten
    assert stamp == {name: (tmp_path / "a" / at.TASK_DIR / f"{name}.jsonl").stat().st_mtime_ns for name in at.FILES}
    stats = json.loads(open(first["stats"]).read())
    assert 0.0 < stats["baselines"]["no_carry"] < 0.5 and stats["response_chars"]["sft_direct_train"]["max"] <= 5


def test_splits_are_disjoint_in_either_order():
    def pairs(name, n):
        return {tuple(sorted(at.parse_prompt(r["prompt"]))) for r in at.iter_records(name, n)}
    train = pairs("sft_train", 2000) | pairs("prompts_train", 500)
    held_out = pairs("sft_eval", 300) | pairs("prompts_eval", 300)
    assert train and held_out and not train & held_out
    assert all(at.split_of(a, b) == at.split_of(b, a) == "eval" for a, b in held_out)


def test_numeric_match_grades_the_answer():
    judge = load_judge("numeric_match")
    prompts = [r for r in at.iter_records("prompts_eval", 20)]
    right = [at.demonstration(p["prompt"], v) for p in prompts for v in at.VARIANTS]
    assert judge.score([p for p in prompts for _ in at.VARIANTS], right).tolist() == [1.0] * len(right)
    p = {"prompt": "347+285", "reference": "632"}
    wrong = ["7+5=12, 4+8+1=13, 3+2+1=6, so 622",      # a wrong answer after right steps
             "7+5=12, 4+8=12, 3+2=5, so 522",          # the carries dropped
             "7+5=12, 4+8+1=13, 3+2+1=6",              # cut off before the answer: 6 is a column sum
             "633", "", "so"]
    assert judge.score([p] * len(wrong), wrong).tolist() == [0.0] * len(wrong)


def test_specs_name_the_task_files():
    paths = at.write_arithmetic_task()  # the shared cache the specs read
    assert resolve_spec("arithmetic_task", "sft", "train") == paths["sft_train"]
    assert resolve_spec("arithmetic_task:steps", "sft", "eval") == paths["sft_eval"]
    assert resolve_spec("arithmetic_task:direct", "sft", "train") == paths["sft_direct_train"]
    for spec in ("arithmetic_task", "arithmetic_task:direct"):  # one set of prompts for every variant
        assert resolve_spec(spec, "prompts", "eval") == paths["prompts_eval"]
    assert resolve_spec("x.jsonl, arithmetic_task", "prompts", "train") == f"x.jsonl,{paths['prompts_train']}"
    assert resolve_spec("arithmetic_task.jsonl", "sft", "train") == "arithmetic_task.jsonl"
    with pytest.raises(ValueError, match="unknown arithmetic-task variant 'cot'"):
        resolve_spec("arithmetic_task:cot", "sft", "train")
    with pytest.raises(ValueError, match="has no 'preferences' records"):
        resolve_spec("arithmetic_task", "preferences", "train")

    sft = list(records.iter_sft_examples(resolve_spec("arithmetic_task:direct", "sft", "eval")))
    assert len(sft) == at.DEFAULT_SIZES["sft_eval"] and sft[0].messages[-1].role == "assistant"
    prompts = list(records.iter_prompt_examples(resolve_spec("arithmetic_task", "prompts", "eval")))
    assert len(prompts) == at.DEFAULT_SIZES["prompts_eval"]
    record = records.prompt_record(prompts[0])  # what a judge reads: the reference, and no "task" for gold
    assert set(record) == {"prompt", "reference"}
    assert load_judge("numeric_match").score([record], [at.demonstration(record["prompt"])]).tolist() == [1.0]


def test_config_presets():
    config = load("configs/sft_arithmetic.py", [])
    assert config.objective == "sft" and config.data.train == "arithmetic_task"
    assert config.train.init_from == "runs/pipeline/pretrain"
    assert config.train.generative_evals.arithmetic.judge == "numeric_match"
    direct = load("configs/sft_arithmetic.py:variant=direct,steps=7,init_from=runs/pre", [])
    assert direct.data.train == "arithmetic_task:direct" and direct.train.steps == 7
    assert direct.train.init_from == "runs/pre"
    assert direct.model.to_dict() == load("configs/sft.py:tiny", []).model.to_dict()  # starts from tiny pretraining
    with pytest.raises(ConfigError, match="unknown arithmetic variant 'cot'"):
        load("configs/sft_arithmetic.py:variant=cot", [])


def test_a_short_sft_run_reads_the_task(small_tokenizer, tmp_path, monkeypatch):
    from llm_jax import training
    from llm_jax.eval.during_training import training_evals
    from llm_jax.train.metrics import read_metrics
    monkeypatch.setenv("LLM_JAX_CACHE", str(tmp_path / "cache"))  # a small copy of the task, read by its spec
    monkeypatch.setattr(at, "DEFAULT_SIZES", SMALL)
    config = load("configs/sft_arithmetic.py",
                  [*SMALL_OVERRIDES, "train.init_from=", f"tokenizer.path={small_tokenizer}", "data.seq_len=64",
                   "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2",
                   "train.generative_evals.arithmetic.n_prompts=4",
                   "train.generative_evals.arithmetic.max_new_tokens=4"])
    workdir = str(tmp_path / "run")
    training.run(config, workdir, generative_evals=training_evals(config))
    metrics = read_metrics(workdir)
    assert metrics[0]["n_train_examples"] == SMALL["sft_train"]
    assert metrics[0]["n_eval_examples"] == SMALL["sft_eval"]
    final = [m for m in metrics if "eval_arithmetic_score" in m][-1]
    assert final["step"] == 2 and 0.0 <= final["eval_arithmetic_score"] <= 1.0 and final["eval_loss"] > 0
