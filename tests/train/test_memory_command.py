"""`llm-jax memory` and the step-0 memory of a run: the per-device figures against a state really created on the
same mesh (full fine-tuning and LoRA, one device and 8-way FSDP), the command's JSON and its errors, and a run
whose train step compiles once."""
import json
import logging
import os
import subprocess
import sys

import jax
import pytest

from llm_jax import cli, sharding
from llm_jax.config_lib import load
from llm_jax.model.config import ModelConfig
from llm_jax.objectives import get_objective
from llm_jax.train import memory
from llm_jax.train.loop import build_training, memory_before_launch
from llm_jax.train.metrics import read_metrics
from llm_jax.train.optimizer import trainable_of
from llm_jax.train.state import partition
from llm_jax.training import run


def _first_device_bytes(tree, device) -> int:
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("n_devices,mesh", [(1, []), (8, ["mesh.data=1", "mesh.fsdp=8"])], ids=["1dev", "fsdp8"])
def test_params_and_optimizer_bytes_are_what_a_created_state_holds(small_overrides, lora, n_devices, mesh):
    config = load("configs/sft.py:tiny", small_overrides + mesh + (["model.lora_rank=4"] if lora else []))
    devices = jax.devices()[:n_devices]
    objective = get_objective(config.objective)
    report = memory_before_launch(config, objective, devices)

    mesh_ = sharding.make_mesh(config.mesh, devices)
    rules = sharding.check_rules(config.mesh_rules)
    t = build_training(config, ModelConfig.from_config(config.model), mesh_, rules, objective)
    state = t.create_state()
    first = devices[0]
    assert report.params_bytes == _first_device_bytes(state.params, first)
    assert report.optimizer_bytes == _first_device_bytes(state.opt_state, first)
    trained, _ = partition(state.params, trainable_of(t.optimizer))
    assert report.grads_bytes == _first_device_bytes(trained, first)  # f32 params: gradients of the same size
    assert report.n_params == sum(x.size for x in jax.tree.leaves(state.params))
    assert report.n_params_trainable == sum(x.size for x in jax.tree.leaves(trained))
    assert (report.n_params_trainable < report.n_params / 10) == lora
    assert report.mesh == dict(mesh_.shape) and report.platform == "cpu" and report.device_memory_bytes is None
    assert report.temp_bytes >= report.grads_bytes > 0  # the gradients are among XLA's temporaries
    assert report.total_bytes == report.params_bytes + report.optimizer_bytes + report.temp_bytes
    whole = sum(x.nbytes for x in jax.tree.leaves(state.params))
    if n_devices == 8:  # FSDP: a device holds an eighth of every param whose embed dimension splits (most of them)
        assert report.params_bytes < whole / 4
    else:
        assert report.params_bytes == whole


def test_grad_accumulation_adds_its_f32_sum(small_overrides):
    objective = get_objective("sft")
    one = memory_before_launch(load("configs/sft.py:tiny", small_overrides), objective, jax.devices()[:1])
    two = memory_before_launch(load("configs/sft.py:tiny", small_overrides + ["optim.grad_accum=2"]), objective,
                               jax.devices()[:1])
    assert two.grads_bytes == 2 * one.grads_bytes  # f32 params: the micro-step's gradients plus the f32 sum
    assert two.params_bytes == one.params_bytes and two.optimizer_bytes == one.optimizer_bytes


@pytest.mark.parametrize("name", ["reward", "dpo"])
def test_pair_objectives_are_measured(small_overrides, name):
    report = memory_before_launch(load(f"configs/{name}.py:tiny", small_overrides), get_objective(name),
                                  jax.devices()[:1])
    assert report.objective == name and report.batch_bytes > 0 and report.temp_bytes > 0


def test_the_command_prints_one_json_object(small_overrides):
    args = [sys.executable, "-m", "llm_jax.cli", "memory", "--config", "configs/sft.py:tiny", "--json",
            *(f"--config.{o}" for o in small_overrides), "--config.model.lora_rank=4"]
    result = subprocess.run(args, env=dict(os.environ), capture_output=True, text=True, check=True)
    report = json.loads(result.stdout)  # the whole of stdout is one object
    for field in memory.FIELDS:
        assert isinstance(report[field], int) and report[field] > 0, field
    assert report["device_memory_bytes"] is None and report["objective"] == "sft"
    assert report["n_params_trainable"] < report["n_params"] and sum(report["mesh"].values()) >= 4


@pytest.mark.parametrize("argv,message", [
    (["--config.optim.grad_accum=0"], "optim.grad_accum must be >= 1, got 0"),
    (["--config.optim.lr=abc"], "optim.lr"),
    (["--config.mesh.fsdp=3"], "fsdp=3"),
])
def test_a_bad_config_exits_2_with_one_line(capsys, argv, message):
    assert cli.main(["memory", "--config", "configs/sft.py:tiny", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_rl_is_refused_with_the_objectives_it_measures(capsys):
    assert cli.main(["memory", "--config", "configs/ppo.py:tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'rl' runs its own loop" in err and "lm, sft, reward, dpo" in err


def test_a_run_logs_the_memory_at_step_0_and_compiles_its_step_once(small_config, tmp_path):
    config = small_config("train.steps=2", "train.eval_every=2", "train.checkpoint_every=2")
    compiled = []

    class Compilations(logging.Handler):
        def emit(self, record):
            if "XLA compilation of jit(step)" in record.getMessage():
                compiled.append(record.getMessage())

    handler = Compilations()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles():
            run(config, str(tmp_path))
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert len(compiled) == 1, compiled
    first = read_metrics(tmp_path)[0]
    expected = memory_before_launch(small_config(), get_objective("lm"))
    assert first["step"] == 0 and {k: first[k] for k in expected.metrics()} == expected.metrics()
    assert first["n_params_trainable"] == expected.n_params_trainable
