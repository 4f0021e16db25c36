"""Orbax checkpoints of a run: params, the rest of the train state, and the data iterator, under
`<workdir>/checkpoints/<step>/`. Params are a separate item so a later stage (continued pretraining, SFT,
the reward model) can start from them without knowing this run's optimizer."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from llm_jax.model import lora, prompt_tuning, quant
from llm_jax.model.config import ModelConfig
from llm_jax.train import manifest
from llm_jax.train.metrics import log_line
from llm_jax.train.state import TrainState


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or does not fit the model being built."""


class CannotStartFrom(CheckpointError):
    """A run whose weights a new run's settings cannot take as they are (its base is quantized differently,
    its adapters cannot be merged into its quantized base and do not fit this run's, or it trained a soft
    prompt of another length)."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def damaged_dir(workdir: str) -> str:
    """Where a run's damaged checkpoints are moved, kept for inspection but out of the way of the steps that
    replace them."""
    return os.path.join(os.path.abspath(workdir), "checkpoints_damaged")


# Steps whose files matched their manifest in this process, by (folder, manifest mtime): a run's checkpoint is
# read back once however many stages restore it.
_VERIFIED: set[tuple[str, int]] = set()


def _verify(directory: str, step: int, legacy: bool) -> None:
    """Checks `directory/step` against its manifest (DamagedCheckpoint if it differs). A run none of whose
    checkpoints has a manifest was saved before manifests existed: its steps pass, unverified."""
    step_dir = os.path.join(directory, str(step))
    if legacy and not manifest.has_manifest(step_dir):
        return
    key = (step_dir, os.stat(os.path.join(step_dir, manifest.NAME)).st_mtime_ns
           if manifest.has_manifest(step_dir) else 0)
    if key in _VERIFIED:
        return
    manifest.verify(step_dir)
    _VERIFIED.add(key)


def _is_legacy(directory: str, steps) -> bool:
    return not any(manifest.has_manifest(os.path.join(directory, str(s))) for s in steps)


def _check_chosen(directory: str, step: int, steps) -> None:
    """A step asked for by number: verified, CheckpointError if damaged (never replaced by another)."""
    try:
        _verify(directory, step, _is_legacy(directory, steps))
    except manifest.DamagedCheckpoint as e:
        raise CheckpointError(f"checkpoint {e}") from None


def _newest_intact(directory: str, steps, on_damaged):
    """The steps that match their manifests, newest first; `on_damaged(step, error)` for each one that does not."""
    steps = sorted(steps, reverse=True)
    legacy = _is_legacy(directory, steps)
    for step in steps:
        try:
            _verify(directory, step, legacy)
        except manifest.DamagedCheckpoint as e:
            on_damaged(step, e)
            continue
        yield step


# One jitted program per tree structure, shared by every restore of it (not a fresh jit of a new lambda each time).
_all_finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])


def _non_finite(tree) -> str | None:
    """The path of the first floating-point leaf holding a NaN or an infinity (a damaged checkpoint can restore
    as values near 1e38 and NaN without any error), else None."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    finite = jax.device_get(_all_finite([x for _, x in leaves]))
    for (path, _), ok in zip(leaves, finite):
        if not ok:
            return jax.tree_util.keystr(path)
    return None


def _orbax_error_types() -> tuple:
    """What a restore of files that do not hold what the restore expects raises: orbax's own errors, tensorstore's
    (ValueError), a missing or unreadable file (OSError), a garbled JSON item."""
    return (ValueError, KeyError, TypeError, OSError, AttributeError, IndexError)


class Checkpointer:
    """Saves a run's steps with a manifest each (`llm_jax.train.manifest`) and restores the newest intact one.

    A save is asynchronous: the manifest of a step is written once its save has committed, at the next save,
    `wait` or `close`. `restore` verifies each step newest first against its manifest and its params for finite
    values; a damaged step is moved to `<workdir>/checkpoints_damaged/` with a warning naming the file, and the
    one before it is tried, so the run continues exactly as from that step."""

    def __init__(self, workdir: str, keep: int, save_data_iterator: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = checkpoint_dir(workdir)
        self.save_data_iterator = save_data_iterator
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._unsealed: list[int] = []  # saved steps whose manifest is not written yet
        self._state_bytes = 0  # what a save writes, for the message of a full disk

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, data_iterator=None, label: int | None = None,
             extra: dict | None = None) -> None:
        """Saves under `label` (default the state's step: a loop whose iterations take several optimizer
        updates, PPO, labels by iteration); `extra` is a small JSON dict saved beside it (`restore_extra`)."""
        step = int(state.step) if label is None else int(label)
        self._seal()
        if step in self.manager.all_steps():
            return
        items = dict(params=ocp.args.StandardSave(state.params),
                     train_state=ocp.args.StandardSave(dict(step=state.step, opt_state=state.opt_state,
                                                            rng=state.rng)))
        if self.save_data_iterator and data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if extra is not None:
            items["extra"] = ocp.args.JsonSave(extra)
        self._state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))
                                if hasattr(x, "nbytes"))
        with self._naming_write_errors(step):
            self.manager.save(step, args=ocp.args.Composite(**items))
        self._unsealed.append(step)

    def _seal(self) -> None:
        """Waits for the saves in flight and writes their manifests (process 0; the files are shared)."""
        if not self._unsealed:
            return
        with self._naming_write_errors(self._unsealed[-1]):
            self.manager.wait_until_finished()
            if jax.process_index() == 0:
                for step in self._unsealed:
                    if os.path.isdir(self.step_dir(step)):
                        manifest.write(self.step_dir(step), step)
        self._unsealed.clear()

    @contextlib.contextmanager
    def _naming_write_errors(self, step: int):
        """A full disk, deep in orbax or tensorstore, becomes one CheckpointError naming the folder and the
        bytes the step needs."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - only a full disk is translated; the rest propagates unchanged
            if not _is_disk_full(e):
                raise
            free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
            raise CheckpointError(f"no space left on the device of {self.directory} while saving step {step}: "
                                  f"a checkpoint needs about {self._state_bytes:,} bytes, "
                                  f"{free:,} are free") from e

    def restore_extra(self, step: int) -> dict:
        """The JSON dict saved with checkpoint `step`."""
        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"])
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} has no loop state saved with it: {e}") from e

    def intact_steps(self):
        """The steps that match their manifests, newest first; each damaged one met on the way is set aside."""
        yield from _newest_intact(self.directory, self.manager.all_steps(),
                                  lambda step, error: self.set_aside(step, error.reason))

    def restore(self, abstract_state: TrainState, data_iterator=None, step: int | None = None) -> TrainState:
        """The train state of `step`, or of the newest intact step (class docstring); CheckpointError when a
        chosen step is damaged or none is intact."""
        if step is not None:
            _check_chosen(self.directory, step, self.manager.all_steps())
            state, bad = self._restore_step(abstract_state, data_iterator, step)
            if bad:
                raise CheckpointError(f"checkpoint {self.step_dir(step)} holds non-finite values in {bad}")
            return state
        for step in self.intact_steps():
            state, bad = self._restore_step(abstract_state, data_iterator, step)
            if bad is None:
                return state
            self.set_aside(step, f"non-finite values in {bad}")
        raise CheckpointError(f"no checkpoint in {self.directory} is intact (damaged ones were moved to "
                              f"{damaged_dir(self.workdir)}): start the run again in a new --workdir")

    def _restore_step(self, abstract_state: TrainState, data_iterator, step: int):
        items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                     train_state=ocp.args.StandardRestore(dict(step=abstract_state.step,
                                                               opt_state=abstract_state.opt_state,
                                                               rng=abstract_state.rng)))
        if self.save_data_iterator and data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except _orbax_error_types() as e:
            raise CheckpointError(f"checkpoint {self.step_dir(step)} does not match the configured model and "
                                  f"optimizer ({_first_line(e)})") from e
        rest = restored["train_state"]
        state = TrainState(step=rest["step"], params=restored["params"], opt_state=rest["opt_state"],
                           rng=rest["rng"])
        return state, _non_finite((state.params, state.opt_state))

    def set_aside(self, step: int, reason: str) -> None:
        """Moves a damaged step out of the checkpoints folder (kept, not deleted) so the run can save that step
        again, and says so."""
        target = os.path.join(damaged_dir(self.workdir), str(step))
        if jax.process_index() == 0:
            os.makedirs(damaged_dir(self.workdir), exist_ok=True)
            suffix = 1
            while os.path.exists(target):
                target, suffix = os.path.join(damaged_dir(self.workdir), f"{step}.{suffix}"), suffix + 1
            os.replace(self.step_dir(step), target)
            with open(os.path.join(target, "DAMAGED.txt"), "w", encoding="utf-8") as f:
                f.write(reason + "\n")
        if jax.process_count() > 1:  # every process sees the step gone before it looks again
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
        self.manager.reload()
        log_line(f"warning: checkpoint {self.step_dir(step)} is damaged: {reason}; moved it to {target} and "
                 f"trying the step before it")

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        try:
            self._seal()
        finally:
            self.manager.close()


def _is_disk_full(error: BaseException) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def save_params(workdir: str, params, step: int = 0, save_concurrent_gb: int | None = None) -> str:
    """Params alone as checkpoint `step` of a run (the params item every stage restores, and its manifest): a run
    made without training, such as an imported or an averaged model. `save_concurrent_gb` bounds what orbax holds
    in flight while writing (by default all of it at once: one more copy of the model). Returns the step's folder."""
    handlers = None
    if save_concurrent_gb is not None:
        handlers = {"params": ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb)}
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(create=True),
                                    item_handlers=handlers)
    manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
    manager.close()
    step_dir = os.path.join(checkpoint_dir(workdir), str(step))
    manifest.write(step_dir, step)  # verified by every stage that restores it
    return step_dir


def saved_steps(run_dir: str) -> list[int]:
    """The committed checkpoint steps of a run, unverified, oldest first (none when it has no checkpoints/)."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return []
    manager = ocp.CheckpointManager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def intact_step(run_dir: str, step: int | None = None) -> int | None:
    """Another run's checkpoint step to read, verified and left untouched: `step` (CheckpointError if it is
    damaged), else the newest intact one (a warning for each damaged one passed over; None if it has none)."""
    directory = checkpoint_dir(run_dir)
    steps = saved_steps(run_dir)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"run {run_dir!r} has no checkpoint {step} (it has {steps})")
        _check_chosen(directory, step, steps)
        return step
    newest = next(_newest_intact(directory, steps, lambda _, error: log_line(
        f"warning: checkpoint {error}; using the step before it")), None)
    if newest is None and steps:
        raise CheckpointError(f"no checkpoint of run {run_dir!r} is intact (steps {steps} all differ from their "
                              "manifests)")
    return newest


def _run_model_config(run_dir: str) -> ModelConfig | None:
    """The run's ModelConfig from its config.json (None without one)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    return ModelConfig.from_config(ml_collections.ConfigDict(model))


def _has_adapters(tree) -> bool:
    if not isinstance(tree, dict):
        return False
    return any(str(k).endswith(lora.ADAPTER_SUFFIX) or _has_adapters(v) for k, v in tree.items())


def _has_quantized(tree) -> bool:
    if not isinstance(tree, dict):
        return False
    return quant.is_quantized(tree) or any(_has_quantized(v) for v in tree.values())


def run_prompt_tokens(run_dir: str) -> int:
    """The length of the soft prompt `run_dir` trained (its model.prompt_tuning_tokens; 0: none)."""
    run_cfg = _run_model_config(run_dir) if run_dir else None
    return run_cfg.prompt_tuning_tokens if run_cfg is not None else 0


def _check_soft_prompt(run_dir: str, run_prompt: int, model_prompt: int) -> None:
    """A run's soft prompt continues in a model with one as long, and nowhere else: no weight can take it."""
    if run_prompt and run_prompt != model_prompt:
        raise CannotStartFrom(
            f"{run_dir} trained a soft prompt (model.prompt_tuning_tokens={run_prompt}), which no weight can take: "
            f"set model.prompt_tuning_tokens={run_prompt} to continue it (this model has {model_prompt})")


def restore_params(run_dir: str, abstract_params, step: int | None = None):
    """The params of another run (its newest intact checkpoint unless `step`, `intact_step`), placed on
    `abstract_params`' shardings, refused if any value is not finite.

    Into a model without adapters (the next stage, an export) from a LoRA run, each adapter is merged into its
    weight first (W + α/r·A·B, `lora.merge`): the run's learning is in its adapters. Into a full-precision
    model from a quantized run, the base is dequantized (and then merged). A run's soft prompt is restored into
    a soft prompt of the same length only (`CannotStartFrom` otherwise). A new run starts through
    `start_params`, which also quantizes."""
    if not os.path.isdir(checkpoint_dir(run_dir)):
        raise CheckpointError(f"run directory {run_dir!r} has no checkpoints/ folder to start from")
    step = intact_step(run_dir, step)
    if step is None:
        raise CheckpointError(f"run directory {run_dir!r} holds no finished checkpoint")
    run_cfg = _run_model_config(run_dir)
    run_prompt = run_cfg.prompt_tuning_tokens if run_cfg is not None else 0
    model_prompt = prompt_tuning.n_tokens(abstract_params)
    _check_soft_prompt(run_dir, run_prompt, model_prompt)
    if model_prompt and not run_prompt:
        raise CheckpointError(f"{run_dir} has no soft prompt to restore into this model's "
                              f"(model.prompt_tuning_tokens={model_prompt}): start from it with train.init_from, "
                              "which begins a fresh soft prompt")
    merge = run_cfg is not None and run_cfg.lora_rank and not _has_adapters(abstract_params)
    dequantize = (run_cfg is not None and quant.settings(run_cfg) is not None
                  and not _has_quantized(abstract_params))
    if merge or dequantize:
        params = _restore_merged(run_dir, abstract_params, run_cfg, step)
    else:
        params = _restore_plain(run_dir, abstract_params, step)
    bad = _non_finite(params)
    if bad:
        raise CheckpointError(f"checkpoint {checkpoint_dir(run_dir)}/{step} holds non-finite values in {bad}")
    return params


def check_start(run_dir: str, run_cfg: ModelConfig | None, model_cfg: ModelConfig) -> None:
    """CannotStartFrom where a run of `model_cfg` cannot take `run_dir`'s weights as they are (`start_params`):
    a base quantized otherwise than this run's would be quantized twice; adapters trained on a quantized base
    cannot be merged, so they continue here, which needs this run's LoRA to be theirs; a soft prompt cannot be
    folded into any weight, so it continues too, which needs this run's prompt_tuning_tokens to be the run's."""
    _check_soft_prompt(run_dir, run_cfg.prompt_tuning_tokens if run_cfg is not None else 0,
                       model_cfg.prompt_tuning_tokens)
    target = quant.settings(model_cfg)
    source = quant.settings(run_cfg) if run_cfg is not None else None
    if target is None or source is None:
        return
    if source != target:
        raise CannotStartFrom(
            f"train.init_from {run_dir} holds a base already quantized ({quant.describe(run_cfg)}); "
            f"model.base_quant={model_cfg.base_quant} ({quant.describe(model_cfg)}) would quantize it again: "
            f"use the run's own base_quant/quant_block/quant_double, or base_quant=none")
    lora_of = lambda c: (c.lora_rank, set(c.lora_target_names), c.lora_alpha)  # noqa: E731
    if run_cfg.lora_rank and lora_of(run_cfg) != lora_of(model_cfg):
        raise CannotStartFrom(
            f"train.init_from {run_dir} trained adapters (rank {run_cfg.lora_rank}, targets "
            f"{run_cfg.lora_targets}, alpha {run_cfg.lora_alpha}) on a quantized base, where they cannot be "
            f"merged; they continue in this run, which needs model.lora_rank={run_cfg.lora_rank}, "
            f"lora_targets={run_cfg.lora_targets!r} and lora_alpha={run_cfg.lora_alpha} (this config: rank "
            f"{model_cfg.lora_rank}, targets {model_cfg.lora_targets!r}, alpha {model_cfg.lora_alpha})")


def _carries_base(run_cfg: ModelConfig | None, model_cfg: ModelConfig) -> bool:
    """Whether a run of `model_cfg` takes the quantized base of a run of `run_cfg` as it is: both quantized alike."""
    return (run_cfg is not None and quant.settings(model_cfg) is not None
            and quant.settings(run_cfg) == quant.settings(model_cfg))


def carries_adapters(run_dir: str, model_cfg: ModelConfig) -> bool:
    """Whether a run of `model_cfg` started from `run_dir` continues that run's adapters (`start_params`):
    both quantized alike, and the run trained adapters."""
    run_cfg = _run_model_config(run_dir) if run_dir else None
    return _carries_base(run_cfg, model_cfg) and bool(run_cfg.lora_rank)


def _restorable(abstract_params, adapters: bool, soft_prompt: bool):
    """`abstract_params` less the LoRA adapters unless `adapters`, less the soft prompt unless `soft_prompt`."""
    def keep(path, _):
        if not lora.is_trainable(path):
            return True
        return soft_prompt if prompt_tuning.SOFT_PROMPT in lora.path_names(path) else adapters
    return lora.split(abstract_params, jax.tree_util.tree_map_with_path(keep, abstract_params))[0]


def start_params(run_dir: str, abstract_params, model_cfg: ModelConfig):
    """What a new run of `model_cfg` (abstract params `abstract_params`, adapters included) takes from the run
    `run_dir` it starts from (`train.init_from`): a tree the fresh init completes (`state.create_state`).

    - From a full-precision run: its weights (a LoRA run's adapters merged), quantized here when `model_cfg`
      has a quantized base: the only time a base is quantized. The new adapters start fresh.
    - From a run quantized the same way (`quant.settings`): its codes bit for bit, never quantized again; and
      where it trained adapters, they continue as this run's adapters (a quantized base cannot take them
      merged), which needs the same LoRA rank and targets.
    - From a quantized run into a full-precision model: the dequantized base, adapters merged.
    - A quantized run into a differently quantized model is refused: it would quantize quantized weights.
    - A soft prompt (prompt tuning) starts fresh from a run without one (drawn from the run's embeddings by
      `create_state`), and continues that of a run with one, which needs the same `prompt_tuning_tokens`: it
      cannot be folded into any weight, so a model with another length (or none) is refused."""
    run_cfg = _run_model_config(run_dir)
    check_start(run_dir, run_cfg, model_cfg)
    run_prompt = bool(run_cfg is not None and run_cfg.prompt_tuning_tokens)
    if _carries_base(run_cfg, model_cfg):  # its codes as they are, and its adapters where it has some
        return restore_params(run_dir, _restorable(abstract_params, bool(run_cfg.lora_rank), run_prompt))
    base = _restorable(abstract_params, False, run_prompt)
    if quant.settings(model_cfg) is None:
        return restore_params(run_dir, base)
    plain = restore_params(run_dir, quant.plain_abstract(base, model_cfg))
    shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), base)
    return jax.jit(lambda p: quant.quantize_tree(p, model_cfg), out_shardings=shardings)(plain)


def _restore_plain(run_dir: str, abstract_params, step: int):
    directory = checkpoint_dir(run_dir)
    manager = ocp.CheckpointManager(directory)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))
    except _orbax_error_types() as e:
        raise CheckpointError(f"params in {directory}/{step} do not fit this model (check the model config "
                              f"against {run_dir}/config.json): {_first_line(e)}") from e
    finally:
        manager.close()
    return restored["params"]


def _restore_merged(run_dir: str, abstract_params, run_cfg, step: int):
    """A LoRA or quantized run's params with its base dequantized and its adapters folded in (`lora.merge`),
    cut to the keys of `abstract_params` and placed on its dtypes and shardings."""
    path = os.path.join(checkpoint_dir(run_dir), str(step), "params")
    metadata = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    saved = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree, is_leaf=lambda x: hasattr(x, "shape"))
    full = ocp.StandardCheckpointer().restore(path, saved)
    merged = lora.merge(full, run_cfg)

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
