r"""Seconds, FLOPs and MFU of each role of an RL iteration (generate, reward, score, train), from the real loop,
for any algorithm's preset.

    python experiments/benchmarks/rl_iteration.py --policy runs/pipeline/sft --reward runs/pipeline/reward \
        [--preset configs/grpo.py:tiny] [--iterations 5] [--warmup 1] [--config.rl.rollout_batch=256 ...]

The config is `--preset` (default `configs/ppo.py:tiny`) with the policy run's own `model` section (so any SFT
run works without restating its shape), `train.init_from=--policy`, `rl.reward_run=--reward` (`--reward ""`:
none, for verifiable rewards), then the `--config.x=y` overrides. It builds `rl.loop.RL` and runs
`rl.loop.Iterations.step` exactly as `llm-jax train` does (fresh states from the runs; iteration i samples the
i-th block of prompts), in a scratch workdir that is deleted.

The first iteration compiles every program (generation, scoring, the update steps): its wall seconds
(compilation plus one run) are reported apart as `compile_s`, and each role's as `compile_iteration_seconds`.
Then `--warmup - 1` untimed iterations, then `--iterations` timed ones. Each role's
seconds are the loop's own timing (each role waited on); its FLOPs are `RL.role_flops` of that iteration
(generation counts the decode steps of the longest response, so they vary a little between iterations).
Reported per role: the median seconds, the median FLOPs, the median of the per-iteration FLOP/s, and MFU =
that FLOP/s over the device's datasheet peak, or on CPU over the square-matmul rate (model dtype, median of 5)
measured just before and just after the timed iterations (their median). Also the sampler/trainer log-prob
mismatch of the timed iterations (`logp_mismatch_mean`, `_max`). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from llm_jax import cli, config_lib
from llm_jax.rl import loop as rl_loop
from llm_jax.rl import losses
from llm_jax.scaling import flops
from llm_jax.train import hardware, run_record

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import run_facts  # noqa: E402

BASE_CONFIG = "configs/ppo.py:tiny"
ROLES = ("generate", "reward", "score", "train")


def rl_config(preset: str, policy: str, reward: str, overrides: list[str]):
    """`preset` shaped like the policy run, pointed at the runs, then `overrides` (which win)."""
    shape = [f"model.{name}={value}" for name, value in run_record.read_run_config(policy).model.items()]
    return config_lib.load(preset, [*shape, f"train.init_from={policy}", f"rl.reward_run={reward}", *overrides])


def iterations(p: rl_loop.RL, states: dict):
    """Runs iterations 1, 2, ... of a run from these states, as `llm-jax train` does; yields for each its wall
    seconds and, per role, the loop's own seconds and FLOPs."""
    s = p.s
    kl_control = losses.make_kl_controller(s.kl_control, s.kl_coef, s.kl_target, s.kl_horizon)
    # With a peak of 1 the loop's mfu_<role> is role_flops[role] / seconds, its FLOP/s: the FLOPs are the
    # loop's own count for this iteration's rollout, with no second copy of its bookkeeping here.
    ptx = p.ptx_data.train_iterator() if p.ptx_data is not None else None
    steps = rl_loop.Iterations(p, states, None, kl_control, ptx, peak=1.0)
    for iteration in itertools.count(1):
        start = time.perf_counter()
        steps.step(iteration)
        logged = steps.metrics(iteration)
        wall = time.perf_counter() - start
        yield dict(wall=wall, mismatch=(logged["logp_mismatch_mean"], logged["logp_mismatch_max"]),
                   **{role: dict(seconds=logged[f"seconds_{role}"],
                                 flops=logged[f"mfu_{role}"] * logged[f"seconds_{role}"]) for role in ROLES})


def summarise(timed: list[dict], denominator: float) -> dict:
    """Per role: median seconds (and range), median FLOPs, median per-iteration FLOP/s, and MFU against
    `denominator`."""
    roles = {}
    for role in ROLES:
        seconds = np.array([it[role]["seconds"] for it in timed])
        role_flops = np.array([it[role]["flops"] for it in timed])
        flops_per_s = float(np.median(role_flops / seconds))
        roles[role] = dict(seconds=float(np.median(seconds)), seconds_min=float(seconds.min()),
                           seconds_max=float(seconds.max()), flops=float(np.median(role_flops)),
                           tflops_per_s=flops_per_s / 1e12, mfu=flops_per_s / denominator)  # 0 for a role with no FLOPs (judges)
    return roles


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = cli.split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="an SFT run directory (the policy and the reference)")
    parser.add_argument("--reward", required=True, help='a reward-model run directory ("": none)')
    parser.add_argument("--preset", default=BASE_CONFIG, help="an RL config: configs/{ppo,grpo,rloo,reinforce_pp}.py:...")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations; the first one compiles")
    parser.add_argument("--host_allocator", choices=("tuned", "default"), default="tuned",
                        help="tuned: hardware.tune_host_allocator() before the backend starts, as in "
                             "train_throughput.py")
    parser.add_argument("--matmul_n", type=int, default=2048, help="side of the square matmul that sets the "
                                                                      "CPU reference rate")
    args = parser.parse_args(rest)
    if args.iterations < 1 or args.warmup < 1:
        parser.error(f"--iterations and --warmup must be >= 1 (the first iteration compiles); got "
                     f"{args.iterations} and {args.warmup}")

    allocator_tuned = args.host_allocator == "tuned" and hardware.tune_host_allocator()
    config = rl_config(args.preset, args.policy, args.reward, overrides)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="rl_bench_") as workdir:
        p = rl_loop.RL(config, workdir, resuming=False)
        devices = jax.devices()
        on_cpu = devices[0].platform == "cpu"
        dtype = p.model_cfg.dtype
        run = iterations(p, p.fresh_states())
        first = next(run)  # compiles generation, scoring and both update steps
        for _ in range(args.warmup - 1):
            next(run)
        # On CPU the reference matmul runs right before and right after the timed iterations, so that it sees the
        # machine state they saw. Not between them: its fresh arrays would move the heap the loop's programs reuse.
        matmul = [hardware.measure_matmul_flops(dtype, n=args.matmul_n)] if on_cpu else []
        timed = [next(run) for _ in range(args.iterations)]
        if on_cpu:
            matmul.append(hardware.measure_matmul_flops(dtype, n=args.matmul_n))
    load_after = os.getloadavg()[0]

    peak, peak_source = hardware.peak_flops(dtype, devices)
    denominator = float(np.median(matmul)) if on_cpu else peak
    roles = summarise(timed, denominator)
    for role in ROLES:
        roles[role]["compile_iteration_seconds"] = first[role]["seconds"]
    iteration_s = float(np.median([it["wall"] for it in timed]))
    s = p.s
    result = dict(
        policy=args.policy, reward=args.reward, config=args.preset, overrides=overrides, estimator=s.estimator,
        roles=roles,
        iteration_s=iteration_s,
        iteration_s_min=min(it["wall"] for it in timed), iteration_s_max=max(it["wall"] for it in timed),
        responses_per_s=s.rollout_batch / iteration_s,
        # the sampler's log-probs against the trainer's recomputation (the loop's off-policy gap), over the timed
        # iterations: mean of the per-iteration means, max of the maxima
        logp_mismatch_mean=float(np.mean([it["mismatch"][0] for it in timed])),
        logp_mismatch_max=float(np.max([it["mismatch"][1] for it in timed])),
        compile_s=first["wall"], iterations=args.iterations, warmup=args.warmup,
        matmul_tflops_per_s=denominator / 1e12 if on_cpu else None,
        matmul_tflops_per_s_before_after=[m / 1e12 for m in matmul] if on_cpu else None,
        matmul_n=args.matmul_n,
        peak_tflops_per_s=None if on_cpu else peak / 1e12,
        mfu_against="measured matmul" if on_cpu else peak_source,
        rollout_batch=s.rollout_batch, samples_per_prompt=s.samples_per_prompt, minibatch=s.minibatch,
        epochs=s.epochs, max_new_tokens=s.max_new_tokens, seq_len=p.seq_len,
        prompt_width=int(p.prompts.tokens.shape[1]), value_model=p.value_model is not None,
        n_params=flops.param_counts(p.model_cfg)["total"],
        reward_n_params=None if p.rewards.rm_cfg is None else flops.param_counts(p.rewards.rm_cfg)["total"],
        n_layers=p.model_cfg.n_layers, d_model=p.model_cfg.d_model, vocab_size=p.model_cfg.vocab_size,
        dtype=dtype, host_allocator_tuned=allocator_tuned,
        load_avg_1m_before_after=[load_before, load_after], **run_facts(devices),
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
