"""A finished run directory as something to use: its config, model, tokenizer and trained params.

Later stages stand on earlier runs (SFT on pretraining, the reward model and DPO on SFT, PPO on both), and
generation, scoring and evaluation read a run without training it. `load_run` gives all of that from the
directory alone: `config.json`, its tokenizer (`tokenizer.model`, or `tokenizer/` for a Hugging Face one) and the
latest (or a chosen) checkpoint. `write_run` makes such a directory from params that no training produced (an
imported checkpoint, an average of runs), so that every stage takes it as it takes a trained run.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from llm_jax import sharding
from llm_jax.data import tokenizer as tokenizer_lib
from llm_jax.data.tokenizer_files import AnyTokenizer, load_tokenizer, run_tokenizer_path
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer
from llm_jax.train.checkpoint import restore_params, save_params
from llm_jax.train.run_record import read_run_config


def abstract_params(model: nn.Module, mesh=None, rules=(), init_method=None):
    """Shapes, dtypes and (with a mesh) shardings of the model's params, without allocating them."""
    dummy = jnp.zeros((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda k: model.init(k, dummy, method=init_method), jax.random.key(0))
    params = nn.unbox(boxed)
    if mesh is None:  # one device; a target sharding lets orbax restore a run saved on any other mesh
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), params)
    shardings = sharding.tree_shardings(sharding.param_logical_specs(boxed), mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings)


@dataclasses.dataclass
class Run:
    path: str
    config: ml_collections.ConfigDict
    model_cfg: ModelConfig
    tokenizer: AnyTokenizer
    model: Transformer
    params: Any


def load_run(run_dir: str, *, mesh=None, rules=None, step: int | None = None, model_cls=Transformer,
             overrides: dict | None = None) -> Run:
    """The run's params (latest checkpoint unless `step`) in a `model_cls` built from its config.

    `overrides` replace model fields that do not change the params (e.g. attention_impl, dtype for serving).
    """
    config = read_run_config(run_dir)
    model_fields = dict(config.model)
    model_fields.update(overrides or {})
    model_cfg = ModelConfig.from_config(ml_collections.ConfigDict(model_fields))
    tokenizer = load_tokenizer(run_tokenizer_path(run_dir))
    tokenizer_lib.check_vocab(tokenizer, model_cfg.vocab_size)
    if rules is None:
        rules = sharding.check_rules(config.mesh_rules) if mesh is not None else ()
    model = model_cls(model_cfg, mesh, rules)
    params = restore_params(run_dir, abstract_params(model, mesh, rules), step=step)
    return Run(run_dir, config, model_cfg, tokenizer, model, params)


def write_run(workdir: str, config: ml_collections.ConfigDict, params, tokenizer: AnyTokenizer, *, step: int = 0,
              save_concurrent_gb: int | None = None) -> None:
    """A run directory `load_run` and `train.init_from` read: `params` (the variables tree, `{"params": ...}`, as
    `load_run` gives it) as checkpoint `step`, the tokenizer (`tokenizer.save`) and config.json, written last."""
    os.makedirs(workdir, exist_ok=True)
    save_params(workdir, params, step, save_concurrent_gb)
    tokenizer.save(workdir)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2))
