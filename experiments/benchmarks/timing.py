"""The benchmarks' one timing discipline: compile once (timed apart), warm up, then time each call to completion."""
from __future__ import annotations

import time

import jax


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
