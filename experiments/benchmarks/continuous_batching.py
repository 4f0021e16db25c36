r"""Rollout throughput: static batches against continuous batching, on prompts whose answers have mixed lengths.

    python experiments/benchmarks/continuous_batching.py [--shapes tiny,bench] [--prompts 64] [--slots 16] \
        [--new_tokens 256] [--prompt_len 64] [--skew 4] [--repeats 3] [--warmup 1] [--json out.json] \
        [--config.model.dtype=bfloat16 --config.mesh.data=8 ...]   (overrides apply to every shape)

Per model shape of configs/pretrain.py (`tiny`, `bench`; their own dtype, width, depth and vocabulary, on the
default mesh), `--prompts` prompts are answered two ways with the same parallel width:

    static      `generate.make_generate_fn`: the prompts in batches of `--slots` rows, one call per batch (one
                compiled program), each batch decoding until its longest answer ends
    continuous  `continuous_batching.make_continuous_generate_fn` with `--slots` slots: one call for all prompts,
                a slot whose answer ends taking the next prompt

How the answers' lengths are controlled: the random params are rewritten into a "successor" model. Embedding rows
are random Gaussian directions g_t (RMS 1, so they dominate the residual stream: the blocks' random weights at
init_std add little) and LM-head column u is 40·g_{u-1}/d, so the logit of t+1 after token t leads the next best
by about 25 (the cosine of unrelated random directions is ~1/√d), and temperature-1 sampling emits t+1 with
probability 1 - 1e-8 or closer. The stop id is the last id V-1. A prompt whose last token is V-1-L is therefore
answered by exactly L tokens, V-L .. V-1, the stop included. Planned lengths L = ceil(new_tokens · u^skew), u
uniform (seed 0): at skew 4 the median answer is new_tokens/16, the mean about new_tokens/5, and one in six is
longer than new_tokens/2 (the long tail of RL rollouts). The script asserts that both paths emit exactly the
planned lengths and the same tokens. The blocks keep their random weights, so every matmul, the attention over
the cache and the sampling cost what they cost in a trained model of that shape; `tiny`'s tied embeddings are
untied for this (the head is one d×V matmul either way: same FLOPs; the successor map needs a head apart from
the embedding). Prompt lengths are uniform in [prompt_len/2, prompt_len], their other tokens random.

Each path is compiled once (timed apart), run `--warmup` times, then timed `--repeats` times, each run waited on;
the two paths take turns, so that a shared machine's load falls on both alike. Figures are medians.
`tokens_per_s` counts the answers' tokens only (the sum of the planned lengths: no padding, no rows decoding after
their answer ended). MFU: the useful model FLOPs (scaling/flops.py: each prompt's real tokens and its answer's
tokens but the last, attending causally; the LM head only where a token is sampled) per second over the device's
datasheet peak (hardware.peak_flops), or on CPU over a 2048³ matmul in the model's dtype measured just before and
just after (median). `occupancy`: useful tokens over the (decode steps × rows) computed.
One JSON line (and a table) per run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import cli, config_lib, sharding
from llm_jax.continuous_batching import make_continuous_generate_fn
from llm_jax.generate import SamplingConfig, make_generate_fn
from llm_jax.model.config import ModelConfig
from llm_jax.scaling.flops import forward_flops_per_token
from llm_jax.train import hardware

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generation import random_model  # noqa: E402
from timing import run_facts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOGIT_SCALE = 40.0  # the successor's logit; the next best is about 40·√(2 ln V / d) ≤ 15 at these shapes


def successor_params(params, cfg: ModelConfig, seed: int):
    """The params with embedding rows g_t and head columns 40·g_{u-1}/d: after token t the model emits t+1."""
    g_vd = jax.random.normal(jax.random.key(seed + 1), (cfg.vocab_size, cfg.d_model), jnp.float32)
    head_dv = LOGIT_SCALE / cfg.d_model * jnp.roll(g_vd, 1, axis=0).T  # column u = g_{u-1}
    p = dict(params["params"])
    p["embedding"] = jax.device_put(g_vd.astype(p["embedding"].dtype), p["embedding"].sharding)
    p["lm_head"] = jax.device_put(head_dv.astype(p["lm_head"].dtype), p["lm_head"].sharding)
    return {**params, "params": p}


def planned_rollout(cfg: ModelConfig, n: int, prompt_len: int, new_tokens: int, skew: float, seed: int):
    """(prompt tokens (n, P), prompt lengths (n,), planned answer lengths (n,)) for the successor model."""
    if cfg.vocab_size <= new_tokens + 1:
        raise ValueError(f"vocab_size={cfg.vocab_size} must exceed new_tokens + 1 = {new_tokens + 1} for the "
                         f"successor chain to reach the stop id")
    rng = np.random.default_rng(seed)
    answer_n = np.maximum(1, np.ceil(new_tokens * rng.random(n) ** skew)).astype(np.int32)
    prompt_lengths_n = rng.integers(max(1, prompt_len // 2), prompt_len + 1, n).astype(np.int32)
    tokens_np = rng.integers(0, cfg.vocab_size - 1, (n, prompt_len)).astype(np.int32)
    tokens_np[np.arange(n), prompt_lengths_n - 1] = cfg.vocab_size - 1 - answer_n  # answered by V-L .. V-1
    return tokens_np, prompt_lengths_n, answer_n


def useful_flops(cfg: ModelConfig, prompt_lengths_n, answer_n) -> float:
    """Forward FLOPs of the real work: each prompt's tokens and its answer's fed tokens (all but the last), causal
    over the whole row; the LM head only at the positions that are sampled (the last prompt token, the answer's)."""
    head = 2 * cfg.d_model * cfg.vocab_size
    total = 0.0
    for p, a in zip(prompt_lengths_n.tolist(), answer_n.tolist()):
        fed = p + a - 1
        total += fed * forward_flops_per_token(cfg, fed) - (p - 1) * head
    return total


def static_steps(answer_n, rows: int) -> int:
    """Decode steps of the static batches: each batch runs to its longest answer."""
    return sum(int(answer_n[i:i + rows].max()) for i in range(0, len(answer_n), rows))


def continuous_steps(answer_n, slots: int) -> int:
    """Decode steps of the continuous schedule (a freed slot takes the next prompt before the next token)."""
    free_at = [0] * min(slots, len(answer_n))  # the step after which each slot is free
    for a in answer_n.tolist():
        i = min(range(len(free_at)), key=free_at.__getitem__)  # the first slot to free up, lowest index first
        free_at[i] += a
    return max(free_at)


def time_interleaved(runs: dict, warmup: int, repeats: int):
    """{name: (last output, seconds of each of `repeats` runs after `warmup`)}, each run waited on. The paths take
    turns (static, continuous, static, ...), so a shared machine's load moves both alike."""
    for _ in range(warmup):
        for run in runs.values():
            jax.block_until_ready(run())
    result = {name: (None, []) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            out = jax.block_until_ready(run())
            result[name][1].append(time.perf_counter() - start)
            result[name] = (out, result[name][1])
    return result


def bench_shape(shape: str, args, overrides) -> dict:
    config = config_lib.load(f"{ROOT}/configs/pretrain.py:{shape}", ["model.tie_embeddings=False", *overrides])
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.check_rules(config.mesh_rules)
    model, params = random_model(config, mesh, rules)
    cfg = model.cfg
    params = successor_params(params, cfg, config.seed)
    n, s, p, new = args.prompts, args.slots, args.prompt_len, args.new_tokens
    tokens_np, prompt_lengths_n, answer_n = planned_rollout(cfg, n, p, new, args.skew, config.seed)
    sampling = SamplingConfig(max_new_tokens=new, temperature=1.0, stop_ids=(cfg.vocab_size - 1,))
    rng = jax.random.key(config.seed)

    # static: ceil(n / s) calls of one compiled (s, P) program; a last, partial batch is filled with copies of
    # prompt 0 whose answers are dropped (they are computed: that is what a static batch costs)
    padded = -(-n // s) * s
    fill = np.concatenate([np.arange(n), np.zeros(padded - n, np.int64)])
    batches = [(jnp.asarray(tokens_np[fill[i:i + s]]), jnp.asarray(prompt_lengths_n[fill[i:i + s]]))
               for i in range(0, padded, s)]
    start = time.perf_counter()
    static_fn = jax.jit(make_generate_fn(model, sampling, p)).lower(params, *batches[0], rng).compile()
    static_compile_s = time.perf_counter() - start

    keys = [jax.random.fold_in(rng, k) for k in range(len(batches))]

    def run_static():
        return [static_fn(params, t, lengths, key) for (t, lengths), key in zip(batches, keys)]

    start = time.perf_counter()
    args_c = (params, jnp.asarray(tokens_np), jnp.asarray(prompt_lengths_n), rng)
    continuous_fn = jax.jit(make_continuous_generate_fn(model, sampling, p, min(s, n))).lower(*args_c).compile()
    continuous_compile_s = time.perf_counter() - start

    matmul = [hardware.measure_matmul_flops(cfg.dtype)] if jax.devices()[0].platform == "cpu" else []
    timed = time_interleaved(dict(static=run_static, continuous=lambda: continuous_fn(*args_c)), args.warmup,
                             args.repeats)
    (static_out, static_times), (continuous_out, continuous_times) = timed["static"], timed["continuous"]
    if matmul:
        matmul.append(hardware.measure_matmul_flops(cfg.dtype))
        peak, peak_source = statistics.median(matmul), f"measured {cfg.dtype} 2048³ matmul, median of before/after"
    else:
        peak, peak_source = hardware.peak_flops(cfg.dtype)

    static_tokens = np.concatenate([np.asarray(o.tokens) for o in static_out])[:n]
    static_lengths = np.concatenate([np.asarray(o.lengths) for o in static_out])[:n]
    continuous_lengths, continuous_tokens = np.asarray(continuous_out.lengths), np.asarray(continuous_out.tokens)
    for name, lengths, tokens in (("static", static_lengths, static_tokens),
                                  ("continuous", continuous_lengths, continuous_tokens)):
        if not np.array_equal(lengths, answer_n):
            j = int(np.argmax(lengths != answer_n))
            raise AssertionError(f"{shape} {name}: prompt {j} answered {lengths[j]} tokens, planned {answer_n[j]}")
        want = tokens_np[np.arange(n), prompt_lengths_n - 1][:, None] + 1 + np.arange(new)[None, :]
        if not np.array_equal(np.where(np.arange(new) < answer_n[:, None], want, 0), tokens):
            raise AssertionError(f"{shape} {name}: the answers are not the successor chains")

    useful = int(answer_n.sum())
    flops = useful_flops(cfg, prompt_lengths_n, answer_n)
    paths = {}
    for name, times, compile_s, steps in (("static", static_times, static_compile_s, static_steps(answer_n, s)),
                                          ("continuous", continuous_times, continuous_compile_s,
                                           continuous_steps(answer_n, s))):
        seconds = statistics.median(times)
        paths[name] = dict(seconds=seconds, seconds_min=min(times), seconds_max=max(times), compile_s=compile_s,
                           tokens_per_s=useful / seconds, decode_steps=steps,
                           occupancy=useful / (steps * min(s, n) if name == "continuous" else steps * s),
                           model_tflops_per_s=flops / seconds / 1e12, mfu=flops / seconds / peak)
    paths["continuous"]["speedup"] = paths["continuous"]["tokens_per_s"] / paths["static"]["tokens_per_s"]
    return dict(shape=shape, n_layers=cfg.n_layers, d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                vocab_size=cfg.vocab_size, dtype=cfg.dtype, attention_impl=cfg.attention_impl,
                mesh={k: int(v) for k, v in mesh.shape.items()}, useful_tokens=useful,
                answer_lengths=dict(min=int(answer_n.min()), median=float(np.median(answer_n)),
                                    mean=float(answer_n.mean()), max=int(answer_n.max()),
                                    over_half=int((answer_n > new / 2).sum())),
                useful_gflop=flops / 1e9, peak_tflops_per_s=peak / 1e12, peak_source=peak_source,
                matmul_tflops_per_s=[m / 1e12 for m in matmul], paths=paths)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = cli.split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,bench", help="configs/pretrain.py sizes, comma-separated")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16, help="rows decoding together (the static batch size too)")
    parser.add_argument("--new_tokens", type=int, default=256, help="max_new_tokens: the longest answer")
    parser.add_argument("--prompt_len", type=int, default=64, help="P: prompts are padded to it")
    parser.add_argument("--skew", type=float, default=4.0, help="answer length = ceil(new_tokens · u^skew)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after compilation")
    parser.add_argument("--json", help="also write the result as JSON to this path")
    args = parser.parse_args(rest)
    for name in ("prompts", "slots", "new_tokens", "prompt_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.skew <= 0:
        parser.error(f"--warmup must be ≥ 0 and --skew > 0, got {args.warmup} and {args.skew}")

    wall = time.perf_counter()
    allocator_tuned = hardware.tune_host_allocator()
    shapes = [bench_shape(shape, args, overrides) for shape in args.shapes.split(",")]
    devices = jax.devices()
    result = dict(benchmark="continuous_batching", overrides=overrides, shapes=shapes, prompts=args.prompts,
                  slots=args.slots, new_tokens=args.new_tokens, prompt_len=args.prompt_len, skew=args.skew,
                  repeats=args.repeats, warmup=args.warmup, sampling="temperature 1, stop id V-1",
                  host_allocator_tuned=allocator_tuned,
                  load_avg_1m=os.getloadavg()[0], **run_facts(devices), wall_s=time.perf_counter() - wall)
    print(f"{args.prompts} prompts of ≤ {args.prompt_len} tokens, answers of 1..{args.new_tokens} tokens "
          f"(ceil(N·u^{args.skew:g})), {args.slots} rows; median of {args.repeats}; "
          f"{devices[0].device_kind} x{len(devices)}")
    print("| shape | path | useful tokens/s | s per rollout | decode steps | occupancy | MFU | speedup | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in shapes:
        for name, st in s["paths"].items():
            print(f"| {s['shape']} | {name} | {st['tokens_per_s']:,.0f} | {st['seconds']:.2f} | {st['decode_steps']} | "
                  f"{st['occupancy']:.2f} | {st['mfu']:.3f} | {st.get('speedup', 1.0):.2f}x | {st['compile_s']:.1f} |")
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
