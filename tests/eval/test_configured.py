"""configs/eval.py's kinds through run_eval_config (llm_jax/eval/configured.py) on a pipeline directory of tiny saved
runs (pretrain, sft, dpo; no ppo): the arena skips the missing stage with a warning, win_rate, generative,
perplexity and icl write their summaries and tables, and every bad field is named."""
import json
import os

import pytest

from llm_jax.config_lib import ConfigError, load
from llm_jax.eval.configured import run_eval_config

CONFIG = "configs/eval.py"
FAST = ["n_prompts=4", "bootstrap=50", "sampling.max_new_tokens=4", "batch_size=4"]


@pytest.fixture(scope="module")
def pipeline(small_tokenizer, tmp_path_factory):
    """runs/pipeline as the arena reads it, without ppo: fresh models with contexts long enough for the base
    model's 4-shot plain-text prompts of the embedded task."""
    from run_fixtures import RL_MODEL_OVERRIDES, save_run
    root = tmp_path_factory.mktemp("pipeline")
    model = [o for o in RL_MODEL_OVERRIDES if not o.startswith("data.seq_len")]
    for stage, spec, seq_len in (("pretrain", "pretrain", 512), ("sft", "sft", 128), ("dpo", "sft", 128)):
        save_run(root / stage, f"configs/{spec}.py:tiny", small_tokenizer, lambda p: p,
                 overrides=model + [f"data.seq_len={seq_len}"])
    return str(root)


def _eval(arg, overrides, workdir):
    return run_eval_config(load(f"{CONFIG}:{arg}", list(overrides)), str(workdir))


def test_the_arena_of_a_pipeline_skips_a_missing_stage_with_a_warning(pipeline, tmp_path, capsys):
    summary = _eval(f"arena,pipeline={pipeline}", FAST, tmp_path)
    assert f"skipping competitor 'ppo': run directory '{pipeline}/ppo' does not exist" in capsys.readouterr().err
    assert summary["skipped"] == [dict(name="ppo", run=f"{pipeline}/ppo")]
    assert sorted(summary["ratings"]) == ["base", "dpo", "sft"] and summary["baseline"] == "sft"
    assert set(summary["win_rates"]) == {"base", "dpo"} and summary["n_prompts"] == 4 and summary["judge"] == "gold"
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["table"] == summary["table"]
    assert "win rate vs sft" in summary["table"] and os.path.exists(tmp_path / "arena.png")
    with open(tmp_path / "base.prompts.jsonl") as f:  # the base model: 4 demonstrations in plain text
        assert all(len(json.loads(line)["shots"]) == 4 and isinstance(json.loads(line)["prompt"], str)
                   for line in f)
    with pytest.raises(ConfigError, match=rf"competitor 'ppo': run directory '{pipeline}/ppo' does not exist "
                                          r"\(config.require_all=True\)"):
        _eval(f"arena,pipeline={pipeline}", FAST + ["require_all=True"], tmp_path / "all")
    with pytest.raises(ConfigError, match=r"config.baseline 'sft' was skipped"):
        _eval(f"arena,pipeline={pipeline}", FAST + ["competitors.sft.run=/no/such/run"], tmp_path / "nosft")


def test_win_rate_of_two_runs(pipeline, tmp_path):
    summary = _eval(f"win_rate,a={pipeline}/dpo,b={pipeline}/sft", FAST + ["plots=False"], tmp_path)
    assert summary["baseline"] == "b" and summary["win_rate"] == summary["win_rates"]["a"]
    assert summary["skipped"] == [] and not os.path.exists(tmp_path / "arena.png")


def test_generative_and_perplexity_of_one_run(pipeline, tmp_path):
    summary = _eval(f"generative,run={pipeline}/sft", FAST + ["k=1"], tmp_path / "gen")
    assert summary["k"] == 1 and summary["n"] == 4 and summary["format"] == "chat"
    assert summary["table"].splitlines()[2].startswith(f"| {pipeline}/sft | default_task | 1 | chat | gold |")
    assert os.path.exists(tmp_path / "gen" / "summary.json") and summary["rows"].startswith(str(tmp_path / "gen"))

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the sun", "a red house by the sea")))
    summary = _eval(f"perplexity,run={pipeline}/pretrain,data={text}", [], tmp_path / "ppl")
    assert summary["tokens"] > 0 and summary["table"].splitlines()[2].startswith(f"| {text} |")
    summary = _eval(f"perplexity,run={pipeline}/pretrain", [f"mixture={{'a': '{text}', 'b': '{text}'}}"],
                    tmp_path / "mix")
    assert list(summary["components"]) == ["a", "b"] and summary["table"].splitlines()[-1].startswith("| all |")


def test_icl_is_the_base_runs_curve_and_the_sft_run_zero_shot(pipeline, tmp_path):
    summary = _eval(f"icl,pipeline={pipeline}", ["n_prompts=3", "ks=(0, 2)", "bootstrap=0",
                                                  "sampling.max_new_tokens=4"], tmp_path)
    assert list(summary["base"]["scores"]) == [0, 2] and summary["base"]["format"] == "plain"
    assert summary["sft"]["k"] == 0 and summary["sft"]["format"] == "chat"
    assert len(summary["table"].splitlines()) == 2 + 3
    assert os.path.exists(tmp_path / "base" / "plain_k2.jsonl") and os.path.exists(tmp_path / "sft" / "chat_k0.jsonl")


@pytest.mark.parametrize("arg, overrides, message", [
    ("generative", [], r"config.run is empty: name a run directory \(--config.run=DIR\)"),
    ("win_rate,b=x", [], r"config.competitors.a.run is empty"),
    ("generative,run=r", ["sampling.max_new_tokens=0"], r"config.sampling .*max_new_tokens must be ≥ 1, got 0"),
    ("generative,run=r", ["n_prompts=-1"], r"config.n_prompts must be a number ≥ 0"),
    ("perplexity,run=r,data=default", ["mixture={'a': 'x'}"], r"config.data='default' and config.mixture"),
    ("icl,pipeline=/no/such", [], r"neither the base run nor the sft run exists"),
])
def test_bad_fields_are_named(arg, overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        _eval(arg, overrides, tmp_path)


def test_bad_kinds_and_competitors_are_named(pipeline, tmp_path):
    with pytest.raises(ConfigError, match=r"eval config kind 'arenas' is not one of"):
        load(f"{CONFIG}:arenas", [])
    config = load(f"{CONFIG}:arena,pipeline={pipeline}", [])
    config.kind = "leaderboard"
    with pytest.raises(ConfigError, match=r"config.kind='leaderboard' is not an evaluation"):
        run_eval_config(config, str(tmp_path))
    config = load(f"{CONFIG}:arena,pipeline={pipeline}", [])
    config.competitors.sft.fewshot = 2
    with pytest.raises(ConfigError, match=r"config.competitors.sft has unknown field\(s\) \['fewshot'\]"):
        run_eval_config(config, str(tmp_path))
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot be created"):
        run_eval_config(load(f"{CONFIG}:arena", []), str(tmp_path / "file" / "sub"))
