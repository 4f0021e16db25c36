"""Config values that cannot be right are refused by validate, each with one line naming the field and its value,
before any tokenizer or data work; the shipped presets all pass."""
import re

import ml_collections
import pytest

from llm_jax.config_lib import ConfigError, load, load_config
from llm_jax.configs_common import DEFAULT_RULES
from llm_jax.pipeline import train_overrides
from llm_jax import training
from llm_jax.objectives import get_objective
from llm_jax.train import loop

TINY = "configs/pretrain.py:tiny"  # n_heads=4, n_kv_heads=2, d_ff=384, vocab 2048 on 8 emulated devices
ON_ONE_TENSOR_AXIS_OF_4 = ["mesh.data=2", "mesh.tensor=4", "model.n_kv_heads=4"]


@pytest.mark.parametrize("overrides,named", [
    (["optim.lr=-1"], "optim.lr=-1.0"),
    (["optim.lr=-1e-3"], "optim.lr=-0.001"),
    (["optim.lr=nan"], "optim.lr=nan"),
    (["optim.b1=1.0"], "optim.b1=1.0"),
    (["optim.b1=-0.1"], "optim.b1=-0.1"),
    (["optim.b2=1.5"], "optim.b2=1.5"),
    (["optim.eps=0"], "optim.eps=0.0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps=-5"),
    (["optim.grad_clip=-1"], "optim.grad_clip=-1.0"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5"),
    (["optim.min_lr_ratio=-0.1"], "optim.min_lr_ratio=-0.1"),
    (["optim.decay_fraction=2"], "optim.decay_fraction=2.0"),
    (["optim.schedule=linear"], "optim.schedule='linear'"),
    (["optim.freeze=("], "optim.freeze: '('"),
    (["data.eval_fraction=0"], "data.eval_fraction=0.0"),
    (["data.eval_fraction=1"], "data.eval_fraction=1.0"),
    (["tokenizer.vocab_size=4096"], "tokenizer.vocab_size=4096"),
    (["dpo.beta=-0.1"], "dpo.beta=-0.1"),
    (["dpo.beta=0"], "dpo.beta=0.0"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing=0.5"),
    (["dpo.nll_coef=-1"], "dpo.nll_coef=-1.0"),
    (["reward.margin=inf"], "reward.margin=inf"),
    (["rl.clip_eps=0"], "rl.clip_eps=0.0"),
    (["rl.clip_eps=1.5"], "rl.clip_eps=1.5"),
    (["rl.value_lr=-1"], "rl.value_lr=-1.0"),
    (["rl.top_p=0"], "rl.top_p=0.0"),
    (["rl.top_k=-1"], "rl.top_k=-1"),
    # params the mesh cannot split: every axis a rule shards, not just the KV heads
    (["mesh.data=1", "mesh.tensor=8"], "model.n_kv_heads=2 does not divide over mesh.tensor=8"),
    (["mesh.data=2", "mesh.tensor=4"], "model.n_kv_heads=2 does not divide over mesh.tensor=4"),
    (ON_ONE_TENSOR_AXIS_OF_4 + ["model.d_ff=390"], "model.d_ff=390 does not divide over mesh.tensor=4"),
    (ON_ONE_TENSOR_AXIS_OF_4 + ["model.vocab_size=2050", "tokenizer.vocab_size=2050"],
     "model.vocab_size=2050 does not divide over mesh.tensor=4"),
    (["mesh.data=1", "mesh.fsdp=8", "model.d_model=132", "model.head_dim=32"],
     "model.d_model=132 does not divide over mesh.fsdp=8"),
    (["mesh.data=2", "mesh.tensor=4", "model.n_kv_heads=4", "model.lora_rank=6"], None),  # lora_rank: replicated
])
def test_a_value_that_cannot_be_right_is_named(overrides, named):
    config = load(TINY, overrides)
    if named is None:
        loop.validate(config)
        return
    with pytest.raises(ConfigError) as info:
        loop.validate(config)
    message = str(info.value)
    assert named in message and "\n" not in message, message


def test_the_mesh_check_follows_the_rules_table():
    # a table that shards the scanned layers over fsdp: 4 layers do not divide over 8 (embed then keeps fsdp free)
    config = load(TINY, ["mesh.data=1", "mesh.fsdp=8"])
    loop.validate(config)
    config.mesh_rules = tuple((name, "fsdp" if name == "layers" else axes) for name, axes in DEFAULT_RULES)
    with pytest.raises(ConfigError, match=re.escape("model.n_layers=4 does not divide over mesh.fsdp=8")):
        loop.validate(config)
    # KV heads replicated: 6 query heads over a tensor axis of 4 are still refused
    config = load(TINY, ["mesh.data=2", "mesh.tensor=4", "model.n_heads=6", "model.head_dim=32"])
    config.mesh_rules = tuple((name, None if name == "kv_heads" else axes) for name, axes in DEFAULT_RULES)
    with pytest.raises(ConfigError, match=re.escape("model.n_heads=6 does not divide over mesh.tensor=4")):
        loop.validate(config)


def test_a_mixture_needs_one_component_with_eval_rows():
    config = load(TINY, ["data.train="])
    config.data.mixture = ml_collections.ConfigDict(dict(
        old=dict(train="default", weight=0.5, eval_fraction=0.0), new=dict(train="default:domain", weight=0.5,
                                                                           eval_fraction=0.0)))
    with pytest.raises(ConfigError, match=r"data\.mixture\.(old|new)\.eval_fraction=0\.0 leaves no eval rows"):
        loop.validate(config)
    config.data.mixture.new.eval_fraction = 0.05
    loop.validate(config)


def test_the_mesh_error_comes_before_any_tokenizer_or_data_work(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("tokenizer or data work before validation")
    monkeypatch.setattr(loop, "prepare_tokenizer", must_not_run)
    for name in ("lm", "sft"):
        monkeypatch.setattr(get_objective(name), "build_data", must_not_run)
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape("model.n_kv_heads=2 does not divide over mesh.tensor=8")):
        training.run(load(TINY, ["mesh.data=1", "mesh.tensor=8"]), str(workdir))
    assert not (workdir / "tokenizer.model").exists() and not (workdir / "data").exists()


def _pipeline_stages(spec):
    pipeline = load_config(spec)
    for name, stage in pipeline.stages.items():
        if stage.kind == "train" and "{" not in stage.config:
            yield stage.config, train_overrides(pipeline, name, "/tmp/unused-workdir")


GOOD = [(spec, []) for spec in (
    "configs/pretrain.py:tiny", "configs/pretrain.py:bench", "configs/pretrain.py:125m", "configs/pretrain.py:1b",
    "configs/pretrain.py:7b", "configs/pretrain.py:size=depth4,aspect=32,head_dim=32",
    "configs/pretrain.py:size=depth1,aspect=16,head_dim=16", "configs/continued_pretrain.py:tiny",
    "configs/sft.py:tiny", "configs/reward.py:tiny", "configs/dpo.py:tiny", "configs/ppo.py:tiny",
    "configs/tokenizer.py")] + [
    ("configs/pretrain.py:tiny", ["mesh.data=4", "mesh.tensor=2"]),
    ("configs/pretrain.py:tiny", ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]),
    ("configs/pretrain.py:tiny", ["data.eval_fraction=0", "data.eval=default"]),  # its own eval source
    ("configs/sft.py:tiny", ["data.eval_fraction=0"]),  # the embedded task's eval split
    ("configs/pretrain.py:tiny", ["optim.lr=0"]),  # evaluates a run's params unchanged (tests/train/test_loop.py)
    ("configs/pretrain.py:tiny", ["optim.schedule=wsd", "optim.min_lr_ratio=0", "optim.grad_clip=0",
                                  "optim.warmup_steps=0", "optim.weight_decay=0", "optim.b1=0"]),
]


@pytest.mark.parametrize("spec,overrides", GOOD + [
    stage for spec in ("configs/pipeline.py:tiny", "configs/pipeline.py:small", "configs/rounds.py:size=small",
                       "configs/rounds.py:size=small,capabilities=arith:arithmetic_task:direct:0.2")
    for stage in _pipeline_stages(spec)])
def test_the_presets_pass(spec, overrides):
    loop.validate(load(spec, overrides))


def test_an_embedded_task_holds_its_own_eval_split():
    # default_task and arithmetic_task bring held-out records: no eval_fraction is needed
    for spec in ("configs/sft.py:tiny", "configs/sft_arithmetic.py"):
        loop.validate(load(spec, ["data.eval_fraction=0"]))
