"""Config loading, the argument parser and typed overrides."""
import pytest

from llm_jax import config_lib
from llm_jax.cli import split_overrides
from llm_jax.config_lib import load


def test_sizes_and_the_bench_shape():
    bench = load("configs/pretrain.py:bench", [])
    m = bench.model
    assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab_size, m.dtype, m.tie_embeddings) == \
        (4, 256, 4, 4, 1024, 8192, "float32", False)
    assert (bench.data.seq_len, bench.data.batch_size) == (256, 8)
    depth = load("configs/pretrain.py:size=depth6,steps=50", [])
    assert (depth.model.n_layers, depth.model.d_model, depth.model.n_heads, depth.train.steps) == (6, 384, 6, 50)
    for size in ("tiny", "125m", "1b", "7b"):
        assert load(f"configs/pretrain.py:{size}", []).model.vocab_size > 0


def test_overrides_keep_their_types():
    c = load("configs/pretrain.py:tiny", ["optim.lr=1e-3", "train.steps=7", "model.tie_embeddings=false",
                                          "data.train=a.jsonl,b.jsonl", "mesh.fsdp=2"])
    assert c.optim.lr == 1e-3 and isinstance(c.optim.lr, float)
    assert c.train.steps == 7 and c.model.tie_embeddings is False
    assert c.data.train == "a.jsonl,b.jsonl" and c.mesh.fsdp == 2


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "config has no field 'optim.lrr'"),
    ("optimx.lr=1", "config has no field 'optimx'"),
    ("train.steps=ten", "field 'train.steps' is an int; got 'ten'"),
    ("model.tie_embeddings=maybe", "is a bool; got 'maybe'"),
    ("optim.lr", "is not of the form field=value"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        load("configs/pretrain.py:tiny", [override])


def test_bad_config_arguments_are_named():
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'stepz'"):
        load("configs/pretrain.py:stepz=3", [])
    with pytest.raises(ValueError, match="unknown pretrain size 'huge'"):
        load("configs/pretrain.py:huge", [])
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        load("configs/nope.py:tiny", [])


def test_command_line_overrides_are_split_out():
    rest, overrides = split_overrides(["train", "--config", "c.py", "--config.optim.lr=1", "--config.train.steps",
                                        "5", "--workdir", "w"])
    assert rest == ["train", "--config", "c.py", "--workdir", "w"]
    assert overrides == ["optim.lr=1", "train.steps=5"]


def test_a_star_in_an_override_sets_every_child_that_has_the_field():
    from llm_jax.config_lib import ConfigError, load
    config = load("configs/pipeline.py:tiny", ["stages.*.extra=model.remat=full"])
    with_extra = {name for name, stage in config.stages.items() if "extra" in stage}
    assert with_extra == {"pretrain", "sft", "reward", "ppo", "grpo", "dpo"}
    assert all(config.stages[name].extra == "model.remat=full" for name in with_extra)
    assert "extra" not in config.stages.pairs and "extra" not in config.stages.arena
    with pytest.raises(ConfigError, match=r"override 'stages.\*.extrax': no field of 'stages' has 'extrax'"):
        load("configs/pipeline.py:tiny", ["stages.*.extrax=1"])
