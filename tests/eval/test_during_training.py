"""Generative evaluations during training: logged with the loss at every eval, equal to answering with the saved
params afterwards, and every bad setting named before the first step."""
import json
import os

import ml_collections
import numpy as np
import pytest

from run_fixtures import SMALL_OVERRIDES
from llm_jax import cli
from llm_jax.config_lib import ConfigError, load
from llm_jax.data import default_task
from llm_jax.eval.during_training import training_evals
from llm_jax.eval.judges import GoldJudge
from llm_jax.generate import SamplingConfig
from llm_jax.generation_io import generate_file
from llm_jax import training
from llm_jax.train.metrics import read_metrics

N_PROMPTS = 6


def _config(small_tokenizer, **evals):
    config = load("configs/sft.py:tiny", [*SMALL_OVERRIDES, "train.init_from=", f"tokenizer.path={small_tokenizer}",
                                          "data.seq_len=48", "train.steps=4", "train.eval_every=2"])
    for name, fields in evals.items():
        config.train.generative_evals[name] = ml_collections.ConfigDict(fields)
    return config


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("evals") / "prompts.jsonl"
    records = [default_task.task_prompt(i, "eval") for i in range(N_PROMPTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_scores_are_logged_at_every_eval_and_match_the_saved_params(small_tokenizer, prompts_file, tmp_path):
    gold = dict(prompts=prompts_file, judge="gold", max_new_tokens=6, batch_size=4)
    config = _config(small_tokenizer, gold=gold)
    workdir = str(tmp_path / "run")
    training.run(config, workdir, generative_evals=training_evals(config))

    evals = [m for m in read_metrics(workdir) if "eval_gold_score" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(0.0 <= m["eval_gold_score"] <= 1.0 and 0.0 <= m["eval_gold_stopped"] <= 1.0 for m in evals)
    assert all("eval_loss" in m for m in evals)  # beside the held-out loss, in the same line
    # The last eval is what `generate` gives with the final checkpoint, the same prompts, greedy.
    summary = generate_file(workdir, prompts_file, str(tmp_path / "answers.jsonl"), SamplingConfig(max_new_tokens=6, temperature=0.0),
                            batch_size=8, progress=False, judge=GoldJudge())
    assert evals[-1]["eval_gold_score"] == pytest.approx(summary["gold_score"], abs=1e-6)
    assert evals[-1]["eval_gold_stopped"] == pytest.approx(summary["stopped"] / summary["count"])


def test_a_user_judge_scores_during_training(small_tokenizer, prompts_file, tmp_path, monkeypatch):
    (tmp_path / "length_judge.py").write_text(
        "def short(prompts, responses):\n    return [1.0 / (1 + len(r.split())) for r in responses]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = _config(small_tokenizer, short=dict(prompts=prompts_file, judge="length_judge:short", n_prompts=3,
                                                 max_new_tokens=4, batch_size=4))
    training.run(config, str(tmp_path / "run"), generative_evals=training_evals(config))
    scores = [m["eval_short_score"] for m in read_metrics(str(tmp_path / "run")) if "eval_short_score" in m]
    assert len(scores) == 2 and all(0.2 <= s <= 1.0 for s in scores) and np.isfinite(scores).all()


@pytest.mark.parametrize("fields, message", [
    (dict(judge="no_such_judge"), "train.generative_evals: judge 'no_such_judge' is neither a built-in"),
    (dict(max_new_token=4), "train.generative_evals.bad has unknown fields \\['max_new_token'\\]"),
    (dict(n_prompts=-1), "train.generative_evals.bad.n_prompts=-1 must be an integer >= 0"),
    (dict(temperature=-0.5), "train.generative_evals.bad.temperature=-0.5 must be >= 0"),
])
def test_bad_settings_are_named(small_tokenizer, fields, message):
    with pytest.raises(ConfigError, match=message):
        training_evals(_config(small_tokenizer, bad=fields))


def test_bad_prompts_and_missing_evals_fail_before_anything_is_trained(small_tokenizer, tmp_path, capsys):
    config = _config(small_tokenizer, gold=dict(judge="gold"))
    with pytest.raises(ConfigError, match="none were passed to the training loop"):
        training.run(config, str(tmp_path / "a"))
    untasked = tmp_path / "plain.jsonl"
    untasked.write_text(json.dumps({"prompt": "hello"}) + "\n")
    config = _config(small_tokenizer, gold=dict(prompts=str(untasked), judge="gold"))
    with pytest.raises(ConfigError, match="judge 'gold' judges none of the 1 prompts"):
        training.run(config, str(tmp_path / "b"), generative_evals=training_evals(config))
    assert not os.path.exists(tmp_path / "b" / "checkpoints")

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(default_task.task_prompt(0, "eval")) + "\n{not json\n")
    overrides = [*SMALL_OVERRIDES, "train.init_from=", f"tokenizer.path={small_tokenizer}", "data.seq_len=48"]
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "import ml_collections\nfrom llm_jax.config_lib import load\n\n"
        f"def get_config(arg=None):\n    c = load('configs/sft.py:tiny', {overrides!r})\n"
        f"    c.train.generative_evals.gold = ml_collections.ConfigDict(dict(prompts={str(broken)!r}))\n"
        "    return c\n")
    assert cli.main(["train", "--config", str(config_file), "--workdir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert f"{broken}:2" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "c" / "checkpoints")
