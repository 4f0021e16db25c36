"""Peak FLOP/s of the device, the denominator of MFU.

Accelerators: datasheet dense peaks per chip. CPU has no meaningful datasheet figure, so its peak is the
matmul rate measured on this machine in this process (a large square matmul in the compute dtype).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# device_kind substring -> dense bf16 FLOP/s per chip (f32 matmuls on these chips run at the same
# MXU/tensor-core rate via bf16 passes or TF32, which is what XLA uses by default).
_DATASHEET_BF16 = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 123e12), ("TPU v2", 45e12),
    ("H200", 989e12), ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12),
)

_measured: dict[str, float] = {}


def measure_matmul_flops(dtype="float32", n: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of an n×n×n matmul on the default device (compiled once, warmed up)."""
    dtype = jnp.dtype(dtype)
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / float(np.median(times))


def peak_flops(dtype="float32", devices=None) -> tuple[float, str]:
    """(FLOP/s of all `devices` together, where the figure came from)."""
    devices = devices or jax.devices()
    kind = devices[0].device_kind
    for name, flops in _DATASHEET_BF16:
        if name.lower() in kind.lower():
            return flops * len(devices), f"datasheet {flops / 1e12:.0f} TFLOP/s x {len(devices)} ({kind})"
    # CPU: emulated devices share the same cores, so the machine's rate is not multiplied by their count.
    key = f"{kind}/{jnp.dtype(dtype).name}"
    if key not in _measured:
        _measured[key] = measure_matmul_flops(dtype)
    return _measured[key], f"measured {jnp.dtype(dtype).name} matmul on {kind}: {_measured[key] / 1e9:.0f} GFLOP/s"
