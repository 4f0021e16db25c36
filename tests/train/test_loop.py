"""The shared loop end to end: resume bit for bit, SIGTERM, divergence, continued pretraining, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llm_jax.data.tokenizer import Tokenizer
from llm_jax.sharding import ShardingError
from llm_jax.train.checkpoint import CheckpointError
from llm_jax.train.guard import TrainingDiverged
from llm_jax.training import run
from llm_jax.train.run_record import ResumeMismatch
from llm_jax.train.metrics import read_metrics


def _losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def _params(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]


def test_a_run_writes_its_directory(small_config, tmp_path):
    summary = run(small_config(), str(tmp_path))
    assert summary["step"] == 8
    assert set(os.listdir(tmp_path)) >= {"checkpoints", "config.json", "metrics.jsonl", "tensorboard",
                                         "tokenizer.model"}
    metrics = read_metrics(tmp_path)
    assert metrics[0]["step"] == 0 and metrics[0]["n_params"] > 0  # the run's stats come first
    assert {m["step"] for m in metrics if "loss" in m} == set(range(1, 9))
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [4, 8]
    assert all(np.isfinite(m["eval_perplexity"]) and "tokens" in m for m in evals)
    assert all("tokens_per_s" in m and "mfu" in m for m in metrics if "loss" in m and m["step"] > 1)
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [4, 8]
    assert json.loads((tmp_path / "config.json").read_text())["model"]["d_model"] == 64
    # running the finished run again changes nothing
    again = run(small_config(), str(tmp_path))
    assert again["start_step"] == 8 and _losses(tmp_path) == {m["step"]: m["loss"] for m in metrics if "loss" in m}


def _cli(workdir, tokenizer, steps, small_overrides):
    env = dict(os.environ)  # keeps the 8 emulated devices of tests/conftest.py
    args = [sys.executable, "-m", "llm_jax.cli", "train", "--config", "configs/pretrain.py:tiny",
            "--workdir", str(workdir), f"--config.tokenizer.path={tokenizer}", f"--config.train.steps={steps}",
            "--config.train.checkpoint_every=50", "--config.train.eval_every=1000"]
    return args + [f"--config.{o}" for o in small_overrides if not o.startswith("train.steps")], env


@pytest.mark.slow
def test_sigterm_then_resume_matches_an_uninterrupted_run_bit_for_bit(small_tokenizer, small_overrides, tmp_path):
    steps = 150
    args, env = _cli(tmp_path / "whole", small_tokenizer, steps, small_overrides)
    subprocess.run(args, env=env, check=True, capture_output=True)

    args, env = _cli(tmp_path / "cut", small_tokenizer, steps, small_overrides)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any(s >= 5 for s in _losses(tmp_path / "cut")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    stopped_at = max(_losses(tmp_path / "cut"))
    assert 5 <= stopped_at < steps, "the run should have been cut part way"
    assert f"SIGTERM: saved step {stopped_at}" in err
    assert str(stopped_at) in os.listdir(tmp_path / "cut" / "checkpoints")

    subprocess.run(args, env=env, check=True, capture_output=True)  # the same command resumes
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")  # every step's loss, exactly
    jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "cut", steps), _params(tmp_path / "whole", steps))


@pytest.mark.slow
def test_sigkill_resumes_from_the_last_periodic_checkpoint(small_config, tmp_path):
    whole = tmp_path / "whole"
    run(small_config("train.steps=12"), str(whole))
    cut = tmp_path / "cut"
    # A process killed at step 12 before its final save: only the step-4 and step-8 checkpoints exist.
    run(small_config("train.steps=12"), str(cut))
    shutil.rmtree(cut / "checkpoints" / "12")
    summary = run(small_config("train.steps=12"), str(cut))
    assert summary["start_step"] == 8
    assert _losses(cut) == _losses(whole)
    jax.tree.map(np.testing.assert_array_equal, _params(cut, 12), _params(whole, 12))


def test_divergence_stops_with_the_last_good_checkpoint_intact(small_config, tmp_path):
    # lr warms up from 0: steps 1-2 are sane, then an absurd rate blows the weights up.
    config = small_config("optim.lr=1e30", "optim.warmup_steps=1000", "train.checkpoint_every=1",
                          "train.steps=20")
    with pytest.raises(TrainingDiverged, match=r"non-finite training values at step (\d+).*last good checkpoint"):
        run(config, str(tmp_path))
    saved = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    assert saved, "at least the first step's checkpoint was written"
    params = _params(tmp_path, saved[-1])
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


def test_continued_pretraining_starts_from_the_earlier_run(small_config, tmp_path):
    run(small_config(), str(tmp_path / "base"))
    # lr 0: the continued run's params must be exactly the base run's final params
    summary = run(small_config(f"train.init_from={tmp_path / 'base'}", "optim.lr=0.0", "train.steps=1",
                               "tokenizer.path="), str(tmp_path / "continued"))
    assert summary["step"] == 1
    jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "continued", 1), _params(tmp_path / "base", 8))
    # and it inherited the tokenizer of the run it started from
    assert Tokenizer.load(str(tmp_path / "continued" / "tokenizer.model")).sha256 == \
        Tokenizer.load(str(tmp_path / "base" / "tokenizer.model")).sha256


def test_init_from_a_run_of_another_shape_is_refused(small_config, tmp_path):
    run(small_config("train.steps=1"), str(tmp_path / "base"))
    with pytest.raises(CheckpointError, match="has a different model; d_ff: 128 there, 256 here"):
        run(small_config(f"train.init_from={tmp_path / 'base'}", "model.d_ff=256"), str(tmp_path / "other"))


def test_resuming_with_another_model_is_refused(small_config, tmp_path):
    run(small_config("train.steps=4"), str(tmp_path))
    with pytest.raises(ResumeMismatch, match=r"would change \(model.d_ff: 128 in the run, 256 now; train.steps: "
                                             r"4 in the run, 8 now\); model.d_ff cannot change within a run"):
        run(small_config("model.d_ff=256"), str(tmp_path))


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(small_config, tmp_path):
    with pytest.raises(ValueError, match=r"has 512 pieces but model.vocab_size=300"):
        run(small_config("model.vocab_size=300"), str(tmp_path))
    assert not (tmp_path / "tokenizer.model").exists()  # checked before anything is written
    assert not (tmp_path / "config.json").exists()


def test_mesh_that_does_not_fit_the_devices_is_refused(small_config, tmp_path):
    with pytest.raises(ShardingError, match="has 3 positions but there are 8 devices"):
        run(small_config("mesh.data=3"), str(tmp_path))


def test_batch_that_does_not_divide_the_mesh_is_refused(small_config, tmp_path):
    with pytest.raises(ShardingError, match="micro-batch of 4 sequences"):
        run(small_config("data.batch_size=4"), str(tmp_path))
