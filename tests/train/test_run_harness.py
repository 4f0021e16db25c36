"""The run harness's lifecycle, once for every loop: the cadence of logs, evals and saves, SIGTERM, a diverged run,
the history and metrics files, and checkpoint sets that resume only from a step every member holds intact."""
import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax.config_lib import load
from llm_jax.train import preemption
from llm_jax.train.checkpoint import Checkpointer, CheckpointError
from llm_jax.train.guard import TrainingDiverged
from llm_jax.train.harness import CheckpointSet, Harness
from llm_jax.train.run_record import read_history
from llm_jax.train.state import TrainState


class FakeLoop:
    """A loop whose steps record what the harness asked of it."""

    def __init__(self, total, eval_at_start=False, diverge_at=None, save_refused=False):
        self.total, self.eval_at_start = total, eval_at_start
        self.diverge_at, self.save_refused = diverge_at, save_refused
        self.checkpoint_dir, self.last_saved = "ckpt", None
        self.calls, self.closed = [], False

    def step(self, step):
        if step == self.diverge_at:
            raise TrainingDiverged(f"loss nan at step {step}", step)
        self.calls.append(("step", step))

    def metrics(self, step):
        self.calls.append(("metrics", step))
        return {"loss": float(step)}

    def evaluate(self, step):
        self.calls.append(("evaluate", step))
        return {"eval_loss": step / 10}

    def save(self, step):
        self.calls.append(("save", step))
        if self.save_refused:
            return False
        self.last_saved = step
        return True

    def finish(self):
        return {"final": self.total}

    def close(self):
        self.closed = True


def _config(**train):
    config = load("configs/pretrain.py:tiny", [])
    config.train.update(dict(log_every=2, eval_every=3, checkpoint_every=4, progress_bar=False), **train)
    return config


def _harness(tmp_path, **train):
    harness = Harness(_config(**train), str(tmp_path / "run"))
    harness.open()
    harness.started()
    return harness


def _metrics(tmp_path):
    return [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]


def test_the_cadence_of_logs_evals_and_saves_and_the_last_step(tmp_path):
    harness, loop = _harness(tmp_path), FakeLoop(total=7, eval_at_start=True)
    summary = harness.run(loop, 0, before=lambda h: h.write(0, {"n_params": 5}))
    assert loop.calls == [
        ("evaluate", 0), ("step", 1), ("step", 2), ("metrics", 2), ("step", 3), ("evaluate", 3), ("step", 4),
        ("metrics", 4), ("save", 4), ("step", 5), ("step", 6), ("metrics", 6), ("evaluate", 6), ("step", 7),
        ("metrics", 7), ("evaluate", 7), ("save", 7)]
    assert loop.closed and summary == dict(workdir=str(tmp_path / "run"), start_step=0, eval_loss=0.7, final=7,
                                           step=7)
    steps = [(m["step"], sorted(k for k in m if k != "step")) for m in _metrics(tmp_path)]
    assert steps == [(0, ["n_params"]), (0, ["eval_loss"]), (2, ["loss"]), (3, ["eval_loss"]), (4, ["loss"]),
                     (6, ["loss"]), (6, ["eval_loss"]), (7, ["loss"]), (7, ["eval_loss"])]
    assert [e["event"] for e in read_history(str(tmp_path / "run"))] == ["start"]


def test_a_resumed_run_continues_from_its_step_without_evaluating_the_start_again(tmp_path):
    harness, loop = _harness(tmp_path), FakeLoop(total=6, eval_at_start=True)
    harness.run(loop, 4)
    assert loop.calls == [("step", 5), ("step", 6), ("metrics", 6), ("evaluate", 6), ("save", 6)]


def test_sigterm_saves_records_the_preemption_and_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(preemption.StopSignal, "agreed", lambda self: True)
    harness, loop = _harness(tmp_path), FakeLoop(total=9)
    summary = harness.run(loop, 2)
    assert loop.calls == [("step", 3), ("evaluate", 3), ("save", 3)]
    assert summary["stopped_early"] and summary["step"] == 3 and loop.closed
    assert read_history(str(tmp_path / "run"))[-1] == dict(read_history(str(tmp_path / "run"))[-1],
                                                           event="preempted", step=3, saved=True)
    refused = FakeLoop(total=9, save_refused=True)
    _harness(tmp_path).run(refused, 0)
    assert read_history(str(tmp_path / "run"))[-1]["saved"] is False


def test_a_diverged_run_is_recorded_and_its_error_propagates(tmp_path):
    harness, loop = _harness(tmp_path), FakeLoop(total=9, diverge_at=5)
    with pytest.raises(TrainingDiverged, match="loss nan at step 5"):
        harness.run(loop, 0)
    last = read_history(str(tmp_path / "run"))[-1]
    assert last["event"] == "diverged" and last["step"] == 5 and last["last_saved"] == 4
    assert loop.closed


def _state(value: float, step: int) -> TrainState:
    params = {"w": jnp.full((4,), value)}
    return TrainState(step=jnp.int32(step), params=params, opt_state=optax.sgd(0.1).init(params),
                      rng=jnp.zeros((2,), jnp.uint32))


def _checkpoint_set(workdir) -> CheckpointSet:
    return CheckpointSet(dict(policy=Checkpointer(str(workdir), 5), value=Checkpointer(os.path.join(workdir, "value"), 5)))


def test_a_checkpoint_set_resumes_from_the_newest_step_every_member_holds(tmp_path):
    workdir = tmp_path / "run"
    checkpoints = _checkpoint_set(workdir)
    for step in (1, 2):
        checkpoints.save(dict(policy=_state(step, step), value=_state(10 * step, step)), step, extra={"beta": step})
    checkpoints.members["value"].save(_state(30, 3), label=3)  # a crash between the value's save and the policy's
    checkpoints.close()

    again = _checkpoint_set(workdir)
    assert again.resume_step() == 2
    assert os.listdir(workdir / "value" / "checkpoints_damaged") == ["3"]  # set aside, to be saved again whole
    states = again.restore(dict(policy=_state(0, 0), value=_state(0, 0)), 2)
    np.testing.assert_array_equal(states["value"].params["w"], np.full(4, 20.0))
    assert again.restore_extra(2) == {"beta": 2}
    again.close()


def test_a_checkpoint_set_with_no_step_common_to_its_members_is_refused(tmp_path):
    workdir = tmp_path / "run"
    checkpoints = _checkpoint_set(workdir)
    checkpoints.members["value"].save(_state(1, 1), label=1)
    checkpoints.members["policy"].save(_state(2, 2), label=2)
    checkpoints.close()
    again = _checkpoint_set(workdir)
    with pytest.raises(CheckpointError, match="no step of .* is intact in every one of them"):
        again.resume_step()
    again.close()
