"""Orbax checkpoints of a run: params, the rest of the train state, and the data iterator, under
`<workdir>/checkpoints/<step>/`. Params are a separate item so a later stage (continued pretraining, SFT,
the reward model) can start from them without knowing this run's optimizer."""
from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp

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


def restore_params(run_dir: str, abstract_params, step: int | None = None):
    """The params of another run (its latest checkpoint unless `step`), placed on `abstract_params`' shardings."""
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

