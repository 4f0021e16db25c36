"""The device mesh and every sharding in the codebase: the only place PartitionSpecs are written.

Model code names logical axes (`("batch", "length", "act_embed")`, `("embed", "mlp")`); a short rules table
(`config.mesh_rules`) maps each to mesh axes. Moving between data, FSDP, tensor and sequence parallelism is
a change of `config.mesh` (and, rarely, of the rules), never of the model.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("batch", "length")  # logical axes of every (B, T) batch array


class ShardingError(ValueError):
    """A mesh, batch or rule that does not fit."""


def mesh_shape(mesh_config, n_devices: int) -> dict[str, int]:
    """Resolves the -1 entry (at most one) so the product of axis sizes equals the device count."""
    sizes = {name: int(mesh_config[name]) for name in MESH_AXES}
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ShardingError(f"at most one mesh axis may be -1; got {sizes}")
    if any(size == 0 or size < -1 for size in sizes.values()):
        raise ShardingError(f"mesh axis sizes must be positive or -1; got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n_devices % fixed:
            raise ShardingError(f"mesh {sizes} cannot use {n_devices} devices: the fixed axes multiply to "
                                f"{fixed}, which does not divide {n_devices}")
        sizes[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise ShardingError(f"mesh {sizes} has {fixed} positions but there are {n_devices} devices")
    return sizes


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(mesh_config, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    # Auto axes: XLA's partitioner propagates shardings between the constraints we place.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_rules(rules) -> tuple:
    rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    for name, axes in rules:
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ShardingError(f"rule for logical axis {name!r} names mesh axis {axis!r}; "
                                    f"mesh axes are {MESH_AXES}")
    return rules


def logical_to_spec(logical_axes: Sequence[str | None], rules) -> PartitionSpec:
    """("batch", "length", "act_embed") -> PartitionSpec(("data", "fsdp"), "sequence", None)."""
    table = dict(rules)
    for name in logical_axes:
        if name is not None and name not in table:
            raise ShardingError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
    spec, used = [], set()
    for name in logical_axes:
        axes = table.get(name) if name is not None else None
        axes = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None and a not in used)
        used.update(axes)  # a mesh axis may shard only one dimension of an array
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def divisible_axes(shape, logical_axes, mesh: Mesh | None, rules) -> tuple:
    """`logical_axes` with None wherever the mesh axes that name maps to do not divide that dim of `shape`: a
    smaller companion of a weight (its quantization scales) shards like the weight where it can, and stays
    whole along the rest. A companion of lower rank (a per-tensor scalar) is whole."""
    if len(shape) != len(logical_axes):
        return (None,) * len(shape)
    if mesh is None:
        return tuple(logical_axes)
    spec = logical_to_spec(logical_axes, rules)
    out = []
    for size, name, axes in zip(shape, logical_axes, tuple(spec) + (None,) * len(shape)):
        axes = axes if isinstance(axes, tuple) else (axes,)
        parts = int(np.prod([mesh.shape[a] for a in axes if a is not None]))
        out.append(name if size % parts == 0 else None)
    return tuple(out)


def named_sharding(mesh: Mesh, logical_axes, rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, rules))


def constrain(x, logical_axes, mesh: Mesh | None, rules):
    """Places a sharding constraint on an activation; a no-op when the model runs without a mesh."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, rules))


def tree_shardings(logical_tree, mesh: Mesh, rules):
    """Maps a pytree of logical PartitionSpecs (from `nn.get_partition_spec`) to NamedShardings."""
    return jax.tree.map(lambda spec: named_sharding(mesh, tuple(spec), rules), logical_tree,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def param_logical_specs(boxed_params) -> Any:
    """The logical PartitionSpec of every parameter, from the metadata the model attaches at init."""
    return nn.get_partition_spec(boxed_params)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules, ndim: int = 2, shape=None) -> NamedSharding:
    """Rows over the batch axes, a second dimension over the length axes; per-row scalars (ndim 1) too. With the
    array's `shape`, a second dimension the length axes do not divide stays whole: a per-row array that is not
    a sequence (a packed preference row's answer ends and pairs, (B, R) and (B, Q)) is split by rows alone."""
    axes = tuple(BATCH_AXES[:ndim]) + (None,) * max(ndim - len(BATCH_AXES), 0)
    if shape is not None:
        axes = (axes[0], *divisible_axes(tuple(shape)[1:2], axes[1:2], mesh, rules), *axes[2:])[:ndim]
    return named_sharding(mesh, axes, rules)


def check_batch(global_batch: int, seq_len: int, mesh: Mesh, rules, grad_accum: int = 1) -> None:
    """The global batch must split evenly into micro-batches and each over the batch-sharding axes."""
    spec = logical_to_spec(BATCH_AXES, rules)
    batch_axes = spec[0] if isinstance(spec[0], tuple) else ((spec[0],) if spec[0] else ())
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if global_batch % grad_accum:
        raise ShardingError(f"data.batch_size={global_batch} is not divisible by optim.grad_accum={grad_accum}")
    micro = global_batch // grad_accum
    if micro % shards:
        raise ShardingError(f"micro-batch of {micro} sequences (data.batch_size={global_batch} / grad_accum="
                            f"{grad_accum}) does not divide over mesh axes {batch_axes} of total size {shards}")
    seq_axis = spec[1]
    if seq_axis and seq_len % mesh.shape[seq_axis]:
        raise ShardingError(f"data.seq_len={seq_len} does not divide over mesh axis {seq_axis!r} of size "
                            f"{mesh.shape[seq_axis]}")


def global_batch_from_local(local_batch: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over the batch axes (multi-host safe)."""
    arrays = {name: np.asarray(value) for name, value in local_batch.items()}
    return {name: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, value.ndim, value.shape), value)
            for name, value in arrays.items()}
