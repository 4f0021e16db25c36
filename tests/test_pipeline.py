"""`llm-jax pipeline`: the stage list of configs/pipeline.py, and the whole chain at the `small` size run once
(every stage, its stage.json and the table; SFT, reward and DPO metrics moving the right way), then rerun: skipped when complete, one stage rerun when its
stage.json goes, a failing stage named with the earlier stages kept."""
import json
import os

import numpy as np
import pytest

from llm_jax import cli, config_lib
from llm_jax.pipeline import PipelineError, check_config, run_pipeline, train_overrides
from llm_jax.train.metrics import read_metrics

STAGES = ("pretrain", "sft", "pairs", "reward", "ppo", "grpo", "dpo", "arena")


def test_sizes_and_stage_overrides():
    config = config_lib.load("configs/pipeline.py:tiny", ["seed=3", "stages.ppo.extra=rl.kl_coef=0.1 train.steps=7"])
    assert tuple(config.order) == STAGES
    assert train_overrides(config, "ppo", "runs/p") == [
        "seed=3", "train.init_from=runs/p/sft", "rl.reward_run=runs/p/reward", "rl.kl_coef=0.1", "train.steps=7"]
    assert "data.train=default_task,runs/p/pairs/pairs.jsonl" in train_overrides(config, "reward", "runs/p")
    with pytest.raises(config_lib.ConfigError, match=r"unknown pipeline size 'huge'; known: \['tiny', 'small', 'hf', 'hf_small'\]"):
        config_lib.load("configs/pipeline.py:huge", [])


def test_stage_list_checks():
    config = config_lib.load("configs/pipeline.py:tiny", [])
    config.order = ("pretrain", "rlhf")
    with pytest.raises(PipelineError, match=r"stages \['rlhf'\] that config.stages does not define"):
        check_config(config)
    config.order = ("pretrain", "pretrain")
    with pytest.raises(PipelineError, match="each stage once"):
        check_config(config)


def _evals(workdir, stage, key):
    return [m[key] for m in read_metrics(os.path.join(workdir, stage)) if key in m]


def _mtimes(workdir):
    return {name: os.path.getmtime(os.path.join(workdir, name, "stage.json")) for name in STAGES}


def _small(small_tokenizer, *overrides):
    """The small pipeline sharing the session's tokenizer (pretraining would otherwise train its own)."""
    return config_lib.load("configs/pipeline.py:small", [f"stages.pretrain.extra=tokenizer.path={small_tokenizer}",
                                                  *overrides])


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, small_tokenizer):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    assert cli.main(["pipeline", "--config", "configs/pipeline.py:small", "--workdir", workdir,
                     f"--config.stages.pretrain.extra=tokenizer.path={small_tokenizer}"]) == 0
    return workdir


@pytest.mark.slow
def test_every_stage_runs_and_the_table_has_every_row(pipeline_dir):
    for name in STAGES:
        record = json.load(open(os.path.join(pipeline_dir, name, "stage.json")))
        assert record["stage"] == name and record["seconds"] > 0 and record["metrics"]
    for name in ("sft", "dpo"):
        assert os.path.exists(os.path.join(pipeline_dir, name, "generations", "greedy.jsonl"))
        assert json.load(open(os.path.join(pipeline_dir, name, "stage.json")))["metrics"]["eval_prompts"] == 16
    assert os.path.exists(os.path.join(pipeline_dir, "pairs", "pairs.jsonl"))
    # each post-training objective moves its metrics the right way between its two evals
    sft_loss, rm_loss, rm_margin, dpo_margin = (_evals(pipeline_dir, stage, key) for stage, key in (
        ("sft", "eval_loss"), ("reward", "eval_loss"), ("reward", "eval_margin"), ("dpo", "eval_margin")))
    assert sft_loss[-1] < sft_loss[0] and rm_loss[-1] < rm_loss[0] and rm_margin[-1] > 0, (sft_loss, rm_loss)
    assert dpo_margin[-1] > dpo_margin[0] and dpo_margin[-1] > 0, dpo_margin
    assert read_metrics(os.path.join(pipeline_dir, "sft"))[0]["train_response_token_fraction"] < 0.5

    summary = json.load(open(os.path.join(pipeline_dir, "summary.json")))
    assert summary["ran"] == list(STAGES)
    assert summary["total_seconds"] == pytest.approx(sum(s["seconds"] for s in summary["stages"].values()))
    table = open(os.path.join(pipeline_dir, "summary.md")).read()
    assert table == summary["table"]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert rows == ["stage", *STAGES, "total"]
    for text in ("held-out perplexity", "answer-token eval loss", "pairs from", "held-out pair accuracy",
                 "reward-model score", "gold greedy", "Elo ", "Win rate against sft: "):
        assert text in table

    # The arena: every stage's model on the same 16 held-out prompts, ratings with intervals, win rates vs sft.
    arena = summary["arena"]
    assert set(arena["ratings"]) == {"base", "sft", "ppo", "grpo", "dpo"} and arena["n_prompts"] == 16
    assert arena["baseline"] == "sft" and set(arena["win_rates"]) == {"base", "ppo", "grpo", "dpo"}
    assert all(r["ci"][0] <= r["value"] <= r["ci"][1] for r in arena["ratings"].values())
    metrics = summary["stages"]["arena"]["metrics"]
    assert metrics["win_rate_ppo"] == arena["win_rates"]["ppo"]["rate"]["value"]
    assert metrics["rating_dpo"] == arena["ratings"]["dpo"]["value"]
    assert metrics["score_sft"] == pytest.approx(np.mean([json.loads(line)["gold_score"] for line in
                                                          open(os.path.join(pipeline_dir, "arena", "sft.jsonl"))]))
    for name in ("arena.md", "arena.json", "arena.png", "prompts.jsonl", "base.jsonl"):
        assert os.path.exists(os.path.join(pipeline_dir, "arena", name))


@pytest.mark.slow
def test_rerun_skips_every_complete_stage(pipeline_dir, small_tokenizer, capsys):
    before = _mtimes(pipeline_dir)
    assert cli.main(["pipeline", "--config", "configs/pipeline.py:small", "--workdir", pipeline_dir,
                     f"--config.stages.pretrain.extra=tokenizer.path={small_tokenizer}"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("| stage | seconds | result |") and err.count("skipped") == len(STAGES)
    assert json.load(open(os.path.join(pipeline_dir, "summary.json")))["ran"] == []
    assert _mtimes(pipeline_dir) == before


@pytest.mark.slow
def test_deleting_a_stage_json_reruns_that_stage_alone(pipeline_dir, small_tokenizer):
    before = _mtimes(pipeline_dir)
    os.remove(os.path.join(pipeline_dir, "dpo", "stage.json"))
    summary = run_pipeline(_small(small_tokenizer), pipeline_dir)
    assert summary["ran"] == ["dpo"] and not summary["stages"]["dpo"]["skipped"]
    after = _mtimes(pipeline_dir)
    assert after["dpo"] > before["dpo"]
    assert {n: t for n, t in after.items() if n != "dpo"} == {n: t for n, t in before.items() if n != "dpo"}


@pytest.mark.slow
def test_a_failing_stage_is_named_and_the_earlier_stages_kept(pipeline_dir, small_tokenizer, capsys):
    before = _mtimes(pipeline_dir)
    os.remove(os.path.join(pipeline_dir, "ppo", "stage.json"))
    # An unknown field fails before any stage runs; a bad value when the stage runs.
    with pytest.raises(PipelineError, match=r"pipeline stage 'ppo' .*train.stepz"):
        run_pipeline(_small(small_tokenizer, "stages.ppo.extra=train.stepz=3"), pipeline_dir)
    assert cli.main(["pipeline", "--config", "configs/pipeline.py:small", "--workdir", pipeline_dir,
                     f"--config.stages.pretrain.extra=tokenizer.path={small_tokenizer}",
                     "--config.stages.ppo.extra=rl.minibatch=3"]) == 1
    err = capsys.readouterr().err
    assert "llm-jax pipeline: pipeline stage 'ppo'" in err and "failed" in err and "minibatch" in err
    assert not os.path.exists(os.path.join(pipeline_dir, "ppo", "stage.json"))
    assert _mtimes_present(pipeline_dir) == {n: before[n] for n in STAGES if n != "ppo"}


def _mtimes_present(workdir):
    return {n: os.path.getmtime(os.path.join(workdir, n, "stage.json")) for n in STAGES
            if os.path.exists(os.path.join(workdir, n, "stage.json"))}


@pytest.mark.slow
def test_every_post_training_stage_runs_on_an_nf4_base(pipeline_dir, small_tokenizer, tmp_path):
    """QLoRA through the whole chain, set once for every stage (`stages.*.extra`): SFT quantizes the pretrained
    weights, and the reward model, PPO, GRPO and DPO carry SFT's codes and continue its adapters; the pairs and
    the arena sample from the quantized runs."""
    import shutil

    import orbax.checkpoint as ocp
    from llm_jax.model import quant

    workdir = tmp_path / "qlora"
    shutil.copytree(os.path.join(pipeline_dir, "pretrain"), workdir / "pretrain")  # complete: skipped
    qlora = "model.base_quant=nf4 model.lora_rank=8 model.lora_targets=wq,wk,wv,wo,w_gate,w_up,w_down"
    assert cli.main(["pipeline", "--config", "configs/pipeline.py:small", "--workdir", str(workdir),
                     f"--config.stages.*.extra=tokenizer.path={small_tokenizer} {qlora}"]) == 0
    summary = json.load(open(workdir / "summary.json"))
    assert summary["ran"] == [s for s in STAGES if s != "pretrain"]

    def codes(stage):
        run = workdir / stage
        step = max(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
        with ocp.CheckpointManager(str(run / "checkpoints")) as manager:
            params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]
        return params["params"]["blocks"]["attn"]["wq"]
    sft = codes("sft")
    assert set(sft) == set(quant.PARTS) and sft["codes"].dtype == np.uint8
    for stage in ("reward", "dpo"):
        np.testing.assert_array_equal(codes(stage)["codes"], sft["codes"])
    assert set(summary["arena"]["ratings"]) == {"base", "sft", "ppo", "grpo", "dpo"}
