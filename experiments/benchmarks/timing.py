"""The benchmarks' one timing discipline: compile once (timed apart), warm up, then time each call to completion;
and the facts every benchmark records about the machine it ran on."""
from __future__ import annotations

import datetime
import os
import platform
import time

import jax


def run_facts(devices) -> dict:
    """The machine and software a figure was measured on, and when (UTC)."""
    return dict(device_kind=devices[0].device_kind, device_count=len(devices), platform=devices[0].platform,
                cpu_count=os.cpu_count(), jax_version=jax.__version__, python=platform.python_version(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def compile_and_time(fn, args, warmup: int, iters: int):
    """(last output, compile seconds, wall seconds of each of `iters` calls of jit(fn)(*args) after `warmup`)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    out, times = None, []
    for _ in range(iters):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return out, compile_s, times
