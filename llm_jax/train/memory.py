"""The accelerator memory a training run needs, per device, known before launch.

    llm-jax memory --config configs/sft.py:tiny [--config.model.lora_rank=16 ...] [--json]

The train step is compiled on abstract shapes only (`train_step.lower(abstract_state, abstract_batch).compile()`,
every input a `jax.ShapeDtypeStruct` carrying its sharding), so nothing is allocated and a 13B-parameter config
is measured on a laptop; the compiler is the one of the devices the mesh is built over (`jax.devices()`). Every
figure is what ONE device holds, counted from each leaf's `sharding.shard_shape`:

    params_bytes     every param, frozen and trained (a replicated param counts whole on every device)
    grads_bytes      the gradients of the params that train (`train.optimizer.trainable_of`), in the param
                     dtype; with optim.grad_accum > 1 plus the f32 running sum over micro-batches. They are
                     not an input or output of the step: they live among its temporaries (below)
    optimizer_bytes  the optimizer state (AdamW's two moments over the trained params, and its counters)
    temp_bytes       the compiled program's temporaries, from XLA's own buffer assignment
                     (`compiled.memory_analysis().temp_size_in_bytes`): activations kept for the backward pass,
                     the gradients, the optimizer's intermediates, and whatever else the compiler schedules
    total_bytes      params + optimizer + temp

The step donates its state, so the new params and optimizer state are written over the old ones
(`alias_bytes` ≈ `output_bytes`): counting the arguments once and adding the temporaries is the step's peak. The
batch (a few KiB to MiB) is an argument too; it is reported as `batch_bytes` and left out of the total, as are
the compiled code and the runtime's own reserve.

Gradients are not added to the total a second time, because XLA counts them in `temp_bytes`. Seen on the tiny
model with activations made negligible (data.seq_len=8, batch 1, d_model 256, one CPU device): full fine-tuning
has 17.8 MB of params and gradients and 35.7 MB of temporaries (gradients, their clipped copy and the AdamW
update); with LoRA (0.1 MB of gradients) the temporaries fall to 8.0 MB. They cannot be anywhere else: the global
gradient norm needs every gradient before the first update, and the donated outputs still hold the old params.

How close the figure is to a real device: temporaries come from the compiler of the devices the mesh is built
on, so measure on the platform that will train. XLA's CPU compiler has no bf16 matmul: it converts bf16 weights
to f32 and lifts that conversion of a scanned layer stack out of the layer loop, so on CPU the temporaries hold
an f32 copy of every bf16 weight (24 GiB of Llama 2 7B with LoRA) that a GPU or TPU never makes; the buffers it
fuses and reuses differ too (experiments/memory/README.md measures both). `device_memory_bytes` is the
device's `memory_stats()['bytes_limit']` (GPU, TPU); a CPU reports none.

`step_memory(step, state, batch, optimizer)` measures any jitted train step the same way, from abstract or real
arguments: a loop with steps of its own (RL's policy update) logs its memory with one call.

Every training run (train/loop.py) logs the same figures at step 0 and writes them to its step-0 metrics as
`memory_params_bytes`, `memory_grads_bytes`, `memory_optimizer_bytes`, `memory_temp_bytes` and
`memory_total_bytes`; the run's steps then call the very executable measured here, so it is compiled once.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from llm_jax import sharding
from llm_jax.config_lib import ConfigError
from llm_jax.model import lora
from llm_jax.train.optimizer import trainable_of
from llm_jax.train.state import partition

FIELDS = ("params_bytes", "grads_bytes", "optimizer_bytes", "temp_bytes", "total_bytes")


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays or `ShapeDtypeStruct`s (each with its sharding)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def _per_device_elements(tree) -> int:
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) for leaf in jax.tree.leaves(tree))


def device_memory(device) -> int | None:
    """The memory a device offers (`bytes_limit`), or None where it does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def abstract_batch(config, objective, mesh, rules) -> dict:
    """The objective's global train batch (`objective.abstract_batch(config)`) with the shardings the loop gives
    its arrays (`sharding.global_batch_from_local`): rows over the batch axes."""
    make = getattr(objective, "abstract_batch", None)
    if make is None:
        raise ConfigError(f"objective {config.objective!r} has no abstract batch (`abstract_batch(config)` in its "
                          "module): the memory command measures the train step of the shared loop's objectives, "
                          "lm, sft, reward and dpo")
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                    sharding=sharding.batch_sharding(mesh, rules, len(v.shape), v.shape))
            for k, v in make(config).items()}


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of one train step (see the module docstring), with what they were measured on."""
    objective: str
    mesh: dict
    platform: str
    n_params: int
    n_params_trainable: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    temp_bytes: int
    total_bytes: int
    batch_bytes: int
    argument_bytes: int   # XLA's memory analysis, for reference: the step's inputs, outputs, and the part of the
    output_bytes: int     # outputs written over donated inputs
    alias_bytes: int
    device_memory_bytes: int | None

    @property
    def fraction(self) -> float | None:
        """total / device memory, where the device says its memory."""
        return self.total_bytes / self.device_memory_bytes if self.device_memory_bytes else None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "device_memory_fraction": self.fraction}

    def metrics(self) -> dict:
        """The step-0 metrics of a run: `memory_<field>` for the five per-device figures."""
        return {f"memory_{name}": getattr(self, name) for name in FIELDS}

    def device_text(self) -> str:
        if self.device_memory_bytes is None:
            return f"device memory unknown ({self.platform})"
        return f"{size(self.total_bytes)} of {size(self.device_memory_bytes)} ({100 * self.fraction:.1f}%)"

    def line(self) -> str:
        """One log line."""
        return (f"memory per device: params {size(self.params_bytes)}, optimizer {size(self.optimizer_bytes)}, "
                f"temporaries {size(self.temp_bytes)} (gradients {size(self.grads_bytes)} within), total "
                f"{size(self.total_bytes)}; {self.device_text()}")

    def table(self) -> str:
        """The human-readable report of `llm-jax memory`."""
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        rows = [("params", self.params_bytes, "every param, frozen or trained"),
                ("optimizer", self.optimizer_bytes, "state of the trained params"),
                ("temporaries", self.temp_bytes, f"XLA's; gradients {size(self.grads_bytes)} are within"),
                ("total", self.total_bytes, "params + optimizer + temporaries")]
        n = math.prod(self.mesh.values())
        lines = [f"objective {self.objective}, mesh {mesh} ({n} {self.platform} device{'s' if n > 1 else ''})",
                 f"params {self.n_params:,}, trained {self.n_params_trainable:,} "
                 f"({100 * self.n_params_trainable / max(self.n_params, 1):.2f}%)",
                 "per device:"]
        lines += [f"  {name:<12}{size(value):>12}   {note}" for name, value, note in rows]
        lines.append(self.device_text())
        return "\n".join(lines) + "\n"


def size(n: int) -> str:
    """Bytes as KiB, MiB or GiB, whichever keeps the number below 1024."""
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def step_memory(step, state, batch, optimizer, grad_accum: int = 1, objective: str = "") -> tuple[MemoryReport, Any]:
    """(report, compiled step) of any jitted `step(state, batch)` over a `TrainState` whose optimizer is
    `optimizer`: compiled for the shapes, dtypes and shardings of `state` and `batch`, which may be abstract
    (`ShapeDtypeStruct`s with shardings) or real arrays (only their shapes are read; nothing is donated). The
    compiled executable takes the same (state, batch) the jitted step does."""
    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    state, batch = jax.tree.map(abstract, state), jax.tree.map(abstract, batch)
    compiled = step.lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    trainable = trainable_of(optimizer)
    trained, _ = partition(state.params, trainable)
    counts = lora.count(state.params, trainable)  # a quantized projection counts the weights it encodes
    grads = per_device_bytes(trained)
    if grad_accum > 1:  # the f32 sum over micro-batches (train/step.py), beside each micro-step's gradients
        grads += 4 * _per_device_elements(trained)
    params, opt = per_device_bytes(state.params), per_device_bytes(state.opt_state)
    temp = int(analysis.temp_size_in_bytes)
    mesh = jax.tree.leaves(state.params)[0].sharding.mesh
    device = mesh.devices.flat[0]
    report = MemoryReport(
        objective=objective, mesh=dict(mesh.shape), platform=device.platform, n_params=counts["total"],
        n_params_trainable=counts["trainable"], params_bytes=params, grads_bytes=grads, optimizer_bytes=opt,
        temp_bytes=temp, total_bytes=params + opt + temp, batch_bytes=per_device_bytes(batch),
        argument_bytes=int(analysis.argument_size_in_bytes), output_bytes=int(analysis.output_size_in_bytes),
        alias_bytes=int(analysis.alias_size_in_bytes), device_memory_bytes=device_memory(device))
    return report, compiled


def measure(training, config, objective, mesh, rules) -> tuple[MemoryReport, Any]:
    """`step_memory` of a built `train.loop.Training`: its train step for its abstract state and the
    objective's abstract batch (`abstract_batch`)."""
    return step_memory(training.train_step, training.abstract_state, abstract_batch(config, objective, mesh, rules),
                       training.optimizer, config.optim.grad_accum, str(config.objective))
