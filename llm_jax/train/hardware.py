"""Peak FLOP/s of the device, the denominator of MFU.

Accelerators: datasheet dense peaks per chip. CPU has no meaningful datasheet figure, so its peak is the
matmul rate measured on this machine in this process (a large square matmul in the compute dtype).
"""
from __future__ import annotations

import ctypes
import sys
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
_allocator_tuned = False

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def tune_host_allocator() -> bool:
    """Makes glibc keep freed host memory for reuse instead of returning it to the OS; True if applied.

    Why: XLA:CPU allocates each execution's temporaries afresh (370 MB for a `bench` train step). glibc serves
    a big request from a worker thread's arena with mmap and unmaps it on free (whatever M_MMAP_MAX says), so
    every step page-faulted its whole working set again: ~95,000 faults and ~0.2 s of kernel time per step on
    the 2-core machine, a sixth of the step. With one arena, no mmap and no trimming, the same pages are reused
    and the faults drop to zero. The cost is that the process keeps its peak heap until it exits.

    Call it once per process, before the JAX backend starts (before the first `jax.devices()` or array):
    threads that already hold an arena keep it. A no-op off Linux/glibc.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _allocator_tuned = bool(mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
                            and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _allocator_tuned


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
