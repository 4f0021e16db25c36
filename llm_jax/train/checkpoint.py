"""Orbax checkpoints of a run: params, the rest of the train state, and the data iterator, under
`<workdir>/checkpoints/<step>/`. Params are a separate item so a later stage (continued pretraining, SFT,
the reward model) can start from them without knowing this run's optimizer."""
from __future__ import annotations

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax.train.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit the model being built."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    def __init__(self, workdir: str, keep: int, save_data_iterator: bool = True):
        self.directory = checkpoint_dir(workdir)
        self.save_data_iterator = save_data_iterator
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iterator=None, label: int | None = None,
             extra: dict | None = None) -> None:
        """Saves under `label` (default the state's step: a loop whose iterations take several optimizer
        updates, PPO, labels by iteration); `extra` is a small JSON dict saved beside it (`restore_extra`)."""
        step = int(state.step) if label is None else int(label)
        if step in self.manager.all_steps():
            return
        items = dict(params=ocp.args.StandardSave(state.params),
                     train_state=ocp.args.StandardSave(dict(step=state.step, opt_state=state.opt_state,
                                                            rng=state.rng)))
        if self.save_data_iterator and data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if extra is not None:
            items["extra"] = ocp.args.JsonSave(extra)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore_extra(self, step: int) -> dict:
        """The JSON dict saved with checkpoint `step`."""
        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"])
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} has no loop state saved with it: {e}") from e

    def restore(self, abstract_state: TrainState, data_iterator=None, step: int | None = None) -> TrainState:
        step = self.latest_step() if step is None else step
        items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                     train_state=ocp.args.StandardRestore(dict(step=abstract_state.step,
                                                               opt_state=abstract_state.opt_state,
                                                               rng=abstract_state.rng)))
        if self.save_data_iterator and data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match the configured model and "
                                  f"optimizer: {e}") from e
        rest = restored["train_state"]
        return TrainState(step=rest["step"], params=restored["params"], opt_state=rest["opt_state"],
                          rng=rest["rng"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def latest_step(run_dir: str) -> int | None:
    """Another run's latest finished checkpoint step (None if it has none), read without touching it."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return None
    manager = ocp.CheckpointManager(directory)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def _lora_config(run_dir: str):
    """The run's ModelConfig when it trained LoRA adapters (its checkpoint holds them), else None."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    if not model.get("lora_rank"):
        return None
    return ModelConfig.from_config(ml_collections.ConfigDict(model))


def _has_adapters(tree) -> bool:
    if not isinstance(tree, dict):
        return False
    return any(str(k).endswith(lora.ADAPTER_SUFFIX) or _has_adapters(v) for k, v in tree.items())


def restore_params(run_dir: str, abstract_params, step: int | None = None):
    """The params of another run (its latest checkpoint unless `step`), placed on `abstract_params`' shardings.

    From a LoRA run into a model without adapters (the next stage, an export), each adapter is merged into its
    weight first (W + α/r·A·B, `lora.merge`): the run's learning is in its adapters."""
    lora_cfg = _lora_config(run_dir)
    if lora_cfg is not None and not _has_adapters(abstract_params):
        return _restore_merged(run_dir, abstract_params, lora_cfg, step)
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        raise CheckpointError(f"run directory {run_dir!r} has no checkpoints/ folder to start from")
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"run directory {run_dir!r} holds no finished checkpoint")
    try:
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"params in {directory}/{step} do not fit this model (check the model config "
                              f"against {run_dir}/config.json): {e}") from e
    finally:
        manager.close()
    return restored["params"]



def _restore_merged(run_dir: str, abstract_params, lora_cfg, step: int | None):
    """A LoRA run's params with its adapters folded in, cut to the keys of `abstract_params` and placed on its
    dtypes and shardings."""
    directory = checkpoint_dir(run_dir)
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step() if step is None else step
    manager.close()
    if step is None:
        raise CheckpointError(f"run directory {run_dir!r} holds no finished checkpoint")
    path = os.path.join(directory, str(step), "params")
    metadata = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    saved = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree, is_leaf=lambda x: hasattr(x, "shape"))
    full = ocp.StandardCheckpointer().restore(path, saved)
    merged = lora.merge(full, lora_cfg)

    def place(target, source, where=()):
        if isinstance(target, dict):
            missing = [k for k in target if k not in source]
            if missing:
                raise CheckpointError(f"params in {path} have no {'/'.join(map(str, where + (missing[0],)))}")
            return {k: place(v, source[k], where + (k,)) for k, v in target.items()}
        if tuple(source.shape) != tuple(target.shape):
            raise CheckpointError(f"param {'/'.join(map(str, where))} in {path} has shape {source.shape}, "
                                  f"expected {target.shape}")
        value = source.astype(target.dtype)
        sharding = getattr(target, "sharding", None)
        return jax.device_put(value, sharding) if sharding is not None else value

    return place(abstract_params, merged)
