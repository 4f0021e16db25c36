"""Scaling sweeps expand into runs that spend their budgets, train what is missing and collect one results table."""
import csv
import math

import pytest

from llm_jax.cli import main
from llm_jax.config_lib import load
from llm_jax.model.config import ModelConfig
from llm_jax.scaling import flops, sweep
from llm_jax.scaling.sweep import SweepError, expand, run_sweep


def _sweep_config(preset: str, *overrides: str):
    return load(f"configs/sweep.py:{preset}", list(overrides))


def test_isoflop_runs_spend_their_budget_within_half_a_step():
    runs, left_out = expand(_sweep_config("isoflop"))
    assert len(runs) == 24 and not left_out
    assert expand(_sweep_config("isoflop", "max_steps=8000"))[1] == [
        dict(name="C8e12-depth1", size="1", budget=8e12, steps=15692)]
    for run in runs:
        config = load(run.spec, list(run.overrides))
        model_cfg = ModelConfig.from_config(config.model)
        assert (model_cfg.n_layers, model_cfg.d_model) == (int(run.size), 32 * int(run.size))
        per_token = flops.training_flops_per_token(model_cfg, config.data.seq_len)
        assert run.flops_per_token == per_token and run.tokens_per_step == 8 * 128 == config.data.batch_size * 128
        counts = flops.param_counts(model_cfg)
        assert run.n == counts["kaplan"] and run.n_total == counts["total"]
        assert config.train.steps == run.steps and run.tokens == run.steps * 1024
        assert run.flops == per_token * run.tokens
        assert abs(run.flops - run.budget) <= per_token * run.tokens_per_step / 2
        assert config.optim.warmup_steps == max(1, round(0.1 * run.steps))
        assert config.train.eval_every == run.steps // 4 and config.optim.lr == 2e-3
    # sorted by budget, then size; every budget has at least five sizes
    assert [(r.budget, r.n_total) for r in runs] == sorted((r.budget, r.n_total) for r in runs)
    assert all(sum(r.budget == b for r in runs) == 6 for b in {r.budget for r in runs})
    assert runs[0].name == "C1e12-depth1"


def test_six_n_and_token_budgets():
    (run, *_), _ = expand(_sweep_config("isoflop", "flops_per_token=6N", "sizes=(3,)", "budgets=(3e12,)"))
    assert run.steps == round(3e12 / (6 * run.n_total) / run.tokens_per_step) and run.name == "C3e12-depth3"
    runs, _ = expand(_sweep_config("grid"))
    assert len(runs) == 20
    assert all(r.steps == round(r.budget / 1024) and r.name.startswith("D") for r in runs)
    assert {r.name for r in runs} >= {"D2.5e5-depth1", "D2e6-depth5"}


@pytest.mark.parametrize("override, message", [
    ("mode=chinchilla", "mode"),
    ("sizes=(2,2)", "distinct"),
    ("budgets=(1e12,-1.0)", "positive"),
    ("budgets=(1e12,1.0001e12)", "differ"),
    ("size_arg=size=tiny", "{size}"),
    ("sizes=(0,)", "size 0"),
    ("base=configs/nope.py", "does not exist"),
    ("warmup_fraction=1.0", "warmup_fraction"),
    ("min_steps=100000", "min_steps=100000"),
])
def test_bad_sweep_configs_name_the_field_and_value(override, message, tmp_path):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace("{", r"\{")):
        run_sweep(_sweep_config("isoflop", override), str(tmp_path), dry_run=True)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    assert main(["sweep", "--config", "configs/sweep.py:isoflop", "--workdir", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "| C1e12-depth1 | 13,408 | 78,944 | 1,962 |" in out and "24 runs" in out and "left out" not in out
    assert not (tmp_path / "s").exists()
    assert main(["sweep", "--config", "configs/sweep.py:isoflop", "--workdir", str(tmp_path / "s"),
                 "--config.mode=x"]) == 2


def test_runs_that_repeat_the_training_split_are_named(capsys):
    runs, _ = expand(_sweep_config("smoke"))
    assert sweep._warn_about_repetition(runs, train_tokens=2000) == ["D3.07e3-depth1", "D3.07e3-depth2"]
    assert "2 of 4 runs train past one epoch of the 2,000-token training split (up to 1.5 epochs)" in \
        capsys.readouterr().err
    assert sweep._warn_about_repetition(runs, train_tokens=10_000) == []


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_smoke_sweep_trains_skips_finished_runs_survives_a_failure_and_runs_in_processes(tmp_path, small_tokenizer,
                                                                                        monkeypatch):
    config = _sweep_config("smoke", f"tokenizer={small_tokenizer}")
    workdir = str(tmp_path / "sweep")
    real_train, trained = sweep._train_in_process, []

    def train_but_fail_one(run, run_dir, shared):
        trained.append(run.name)
        if run.name == "D3.07e3-depth1" and trained.count(run.name) == 1:
            raise FloatingPointError("non-finite loss (planted)")
        real_train(run, run_dir, shared)

    monkeypatch.setattr(sweep, "_train_in_process", train_but_fail_one)
    first = run_sweep(config, workdir)
    assert list(first["failed"]) == ["D3.07e3-depth1"] and "planted" in first["failed"]["D3.07e3-depth1"]
    assert len(trained) == 4 and len(first["rows"]) == 3  # the failure did not stop the run after it

    second = run_sweep(config, workdir)  # only the failed run trains again
    assert trained[4:] == ["D3.07e3-depth1"] and not second["failed"]
    rows = _read(second["results"])
    assert [r["name"] for r in rows] == ["D1.54e3-depth1", "D1.54e3-depth2", "D3.07e3-depth1", "D3.07e3-depth2"]
    assert list(rows[0]) == list(sweep.COLUMNS) and second["repeated"] == []
    entropy_floor = float(rows[0]["entropy_floor"])
    for r in rows:
        steps, d, n_total = int(r["steps"]), int(r["D"]), int(r["N_total"])
        assert d == steps * 256 and steps == round(float(r["budget"]) / 256)
        assert int(r["flops"]) % d == 0 and int(r["flops_6ND"]) == 6 * n_total * d < int(r["flops"])
        assert entropy_floor < float(r["best_loss"]) <= float(r["loss"]) < math.log(512)
        assert float(r["entropy_floor"]) == entropy_floor and float(r["seconds"]) > 0
        assert 0 < float(r["epochs"]) < 0.01  # 3 k tokens of a split of about a million
    by_name = {r["name"]: float(r["loss"]) for r in rows}
    for size in ("depth1", "depth2"):  # twice the tokens, lower held-out loss
        assert by_name[f"D3.07e3-{size}"] < by_name[f"D1.54e3-{size}"]

    assert main(["sweep", "--config", "configs/sweep.py:smoke", "--workdir", workdir,
                 f"--config.tokenizer={small_tokenizer}"]) == 0 and len(trained) == 5
    # A finished run trained with other settings is never mixed into the table
    with pytest.raises(SweepError, match="D1.54e3-depth1.*different config"):
        run_sweep(_sweep_config("smoke", f"tokenizer={small_tokenizer}", "seed=1"), workdir)

    # The same runs, each in its own `llm-jax train` process, two at once, give the same losses
    parallel = run_sweep(_sweep_config("smoke", f"tokenizer={small_tokenizer}", "sizes=(1,)",
                                       f"cache_dir={workdir}/data"), str(tmp_path / "parallel"), processes=2)
    assert not parallel["failed"] and (tmp_path / "parallel" / "D1.54e3-depth1" / "train.log").exists()
    assert len(trained) == 5  # not in this process
    for row in parallel["rows"]:
        assert row["loss"] == pytest.approx(by_name[row["name"]], rel=1e-5)
