r"""Training throughput and MFU of the real train step (model, loss, gradients, optimizer) on synthetic batches.

    python experiments/benchmarks/train_throughput.py --config configs/pretrain.py:bench [--steps 10] \
        [--warmup 2] [--json out.json] [--config.model.scan_layers=False ...]

Builds the config's mesh and `build_training(...)` exactly as `llm-jax train` does, feeds random packed batches
of the config's shape (no tokenizer or corpus), compiles once, warms up, times `--steps` steps (each waited on
with block_until_ready) and prints one JSON line. MFU divides the model FLOP/s (`scaling/flops.py`) by the
device's datasheet peak on accelerators, and on CPU by the square-matmul rate measured in the same process,
same dtype, just before and just after the timed steps (each the median of 5; MFU uses their mean). By default the host
allocator is tuned first (`hardware.tune_host_allocator`, which `--host_allocator=default` skips).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import numpy as np

from llm_jax import cli, config_lib, sharding
from llm_jax.scaling import flops
from llm_jax.train import hardware

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import run_facts  # noqa: E402
from llm_jax.objectives import get_objective
from llm_jax.train.loop import build_training, validate


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random packed rows: documents of random length back to back, positions restarting at each one."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch_size, seq_len + 1), dtype=np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    segment_ids = np.zeros((batch_size, seq_len), np.int32)
    for row in range(batch_size):
        start, segment = 0, 1
        while start < seq_len:
            length = int(rng.integers(seq_len // 8, seq_len + 1))
            end = min(start + length, seq_len)
            positions[row, start:end] = np.arange(end - start)
            segment_ids[row, start:end] = segment
            start, segment = end, segment + 1
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=positions, segment_ids=segment_ids,
                loss_mask=np.ones((batch_size, seq_len), np.int32))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = cli.split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--host_allocator", choices=("tuned", "default"), default="tuned",
                        help="tuned: hardware.tune_host_allocator() before the backend starts (see its docstring)")
    parser.add_argument("--matmul_n", type=int, default=2048, help="side of the square matmul that sets the "
                                                                      "CPU reference rate")
    parser.add_argument("--json", help="also write the result as JSON to this path")
    args = parser.parse_args(rest)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0; got {args.steps} and {args.warmup}")

    allocator_tuned = args.host_allocator == "tuned" and hardware.tune_host_allocator()
    config = config_lib.load(args.config, overrides)
    model_cfg = validate(config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.check_rules(config.mesh_rules)
    b, t = config.data.batch_size, config.data.seq_len
    sharding.check_batch(b, t, mesh, rules, config.optim.grad_accum)

    training = build_training(config, model_cfg, mesh, rules, get_objective(config.objective))
    state = training.create_state()
    batch = sharding.global_batch_from_local(synthetic_batch(b, t, model_cfg.vocab_size, config.seed), mesh, rules)

    start = time.perf_counter()
    state, metrics = training.train_step(state, batch)
    jax.block_until_ready((state, metrics))
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup):
        state, metrics = training.train_step(state, batch)
        jax.block_until_ready((state, metrics))

    devices = jax.devices()
    on_cpu = devices[0].platform == "cpu"
    # On CPU the reference matmul (median of 5) runs right before and right after the timed steps, so that it
    # sees the machine state the model saw. Not between steps: its fresh arrays would move the step's heap.
    matmul = [hardware.measure_matmul_flops(model_cfg.dtype, n=args.matmul_n)] if on_cpu else []
    times, faults, user_s, system_s = [], 0, 0.0, 0.0
    for _ in range(args.steps):
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        state, metrics = training.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults += after.ru_minflt - usage.ru_minflt
        user_s += after.ru_utime - usage.ru_utime
        system_s += after.ru_stime - usage.ru_stime
    if on_cpu:
        matmul.append(hardware.measure_matmul_flops(model_cfg.dtype, n=args.matmul_n))
    if not np.isfinite(float(metrics["loss"])):
        raise RuntimeError(f"the benchmark's loss is not finite: {float(metrics['loss'])}")

    step_s = float(np.median(times))
    tokens_per_step = b * t
    flops_per_token = flops.training_flops_per_token(model_cfg, t)
    model_flops_per_s = flops_per_token * tokens_per_step / step_s
    matmul_flops_per_s = float(np.median(matmul)) if matmul else None
    peak, peak_source = hardware.peak_flops(model_cfg.dtype, devices)
    denominator = matmul_flops_per_s if on_cpu else peak
    result = dict(
        config=args.config, overrides=overrides,
        tokens_per_s=tokens_per_step / step_s,
        step_ms=step_s * 1e3,
        step_ms_min=min(times) * 1e3, step_ms_max=max(times) * 1e3,
        steps=args.steps, warmup=args.warmup, compile_s=compile_s,
        n_params=flops.param_counts(model_cfg)["total"],
        model_flops_per_token=flops_per_token,
        model_tflops_per_s=model_flops_per_s / 1e12,
        matmul_tflops_per_s=matmul_flops_per_s / 1e12 if matmul_flops_per_s else None,
        matmul_tflops_per_s_before_after=[m / 1e12 for m in matmul] if matmul else None,
        matmul_n=args.matmul_n,
        peak_tflops_per_s=None if on_cpu else peak / 1e12,
        mfu=model_flops_per_s / denominator,
        mfu_against="measured matmul" if on_cpu else peak_source,
        loss=float(metrics["loss"]),
        host_allocator_tuned=allocator_tuned,
        page_faults_per_step=faults / args.steps,
        cpu_s_per_step=dict(user=user_s / args.steps, system=system_s / args.steps),
        batch_size=b, seq_len=t, dtype=model_cfg.dtype,
        load_avg_1m=os.getloadavg()[0], **run_facts(devices),
    )
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
