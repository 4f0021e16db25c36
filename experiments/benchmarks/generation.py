r"""Generation speed: new tokens per second with the KV cache against re-running the full forward every step.

    python experiments/benchmarks/generation.py --config configs/pretrain.py:tiny [--new_tokens 256] \
        [--batch_size 8] [--prompt_len 64] [--repeats 3] [--warmup 1] [--json out.json] [--config.model.x=y ...]

The config's model with random params (seed `config.seed`; no run, tokenizer or corpus) on the config's mesh,
`--batch_size` random prompts of `--prompt_len` tokens each. Both samplers of `llm_jax/generate.py` run greedy
with no stop tokens, so each emits exactly `--new_tokens` tokens per row, and the script asserts they emit the
same tokens. Each path is compiled once (timed apart), run `--warmup` times, then timed `--repeats` times
(each waited on); the table gives the median. The time covers the whole generation: the prompt's forward
(prefill) and every decode step. A step emits one token for each of the batch's rows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llm_jax import cli, config_lib, sharding
from llm_jax.generate import SamplingConfig, make_full_forward_generate_fn, make_generate_fn
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer
from llm_jax.runs import abstract_params
from llm_jax.train import hardware

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import compile_and_time, run_facts  # noqa: E402

PATHS = (("KV cache", make_generate_fn), ("full forward", make_full_forward_generate_fn))


def random_model(config, mesh, rules):
    """The config's model and random params placed on their shardings."""
    model = Transformer(ModelConfig.from_config(config.model), mesh, rules)
    shardings = jax.tree.map(lambda a: a.sharding, abstract_params(model, mesh, rules))
    init = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))), out_shardings=shardings)
    return model, init(jax.random.key(config.seed))


def time_path(make_fn, model, params, prompts_bp, lengths_b, sampling, warmup: int, repeats: int):
    """(generation, compile seconds, seconds of each timed run) of one sampler."""
    return compile_and_time(make_fn(model, sampling, prompts_bp.shape[1]),
                            (params, prompts_bp, lengths_b, jax.random.key(0)), warmup, repeats)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = cli.split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain.py:tiny", help="path/to/config.py[:arg]")
    parser.add_argument("--new_tokens", type=int, default=256, help="tokens generated per row")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs after compilation")
    parser.add_argument("--host_allocator", choices=("tuned", "default"), default="tuned",
                        help="tuned: hardware.tune_host_allocator() before the backend starts (see its docstring)")
    parser.add_argument("--json", help="also write the result as JSON to this path")
    args = parser.parse_args(rest)
    for name in ("new_tokens", "batch_size", "prompt_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be ≥ 0, got {args.warmup}")

    wall_start = time.perf_counter()
    allocator_tuned = args.host_allocator == "tuned" and hardware.tune_host_allocator()
    config = config_lib.load(args.config, overrides)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.check_rules(config.mesh_rules)
    b, p, n = args.batch_size, args.prompt_len, args.new_tokens
    sharding.check_batch(b, p, mesh, rules)
    model, params = random_model(config, mesh, rules)
    rng = np.random.default_rng(config.seed)
    prompts_bp = jax.device_put(rng.integers(4, model.cfg.vocab_size, (b, p), dtype=np.int32),
                                sharding.named_sharding(mesh, ("batch", None), rules))
    lengths_b = jax.device_put(np.full((b,), p, np.int32), sharding.named_sharding(mesh, ("batch",), rules))
    sampling = SamplingConfig(max_new_tokens=n, temperature=0.0)  # greedy, no stop ids: exactly n tokens per row

    paths = {}
    for name, make_fn in PATHS:
        out, compile_s, times = time_path(make_fn, model, params, prompts_bp, lengths_b, sampling, args.warmup,
                                          args.repeats)
        if not np.all(np.asarray(out.lengths) == n):
            raise RuntimeError(f"{name}: rows emitted {np.asarray(out.lengths).tolist()} tokens, expected {n} each")
        seconds = float(np.median(times))
        paths[name] = dict(tokens=np.asarray(out.tokens), seconds=seconds, seconds_min=min(times),
                           seconds_max=max(times), compile_s=compile_s, tokens_per_s=b * n / seconds,
                           ms_per_step=seconds / n * 1e3)
    cached, full = (paths[name].pop("tokens") for name, _ in PATHS)
    if not np.array_equal(cached, full):
        row, col = np.argwhere(cached != full)[0]
        raise AssertionError(f"the KV-cache and full-forward samplers disagree first at row {row}, token {col}: "
                             f"{cached[row, col]} vs {full[row, col]}")
    baseline = paths["full forward"]["tokens_per_s"]
    for stats in paths.values():
        stats["speedup"] = stats["tokens_per_s"] / baseline

    devices = jax.devices()
    result = dict(
        config=args.config, overrides=overrides, batch_size=b, prompt_len=p, new_tokens=n,
        repeats=args.repeats, warmup=args.warmup, identical_tokens=True, paths=paths,
        speedup=paths["KV cache"]["speedup"], n_layers=model.cfg.n_layers, d_model=model.cfg.d_model,
        vocab_size=model.cfg.vocab_size, dtype=model.cfg.dtype, attention_impl=model.cfg.attention_impl,
        host_allocator_tuned=allocator_tuned,
        load_avg_1m=os.getloadavg()[0], **run_facts(devices),
        wall_s=time.perf_counter() - wall_start,
    )
    print(f"{' '.join([args.config, *overrides])}: batch {b}, prompt {p}, {n} new tokens per row, greedy; "
          f"median of {args.repeats}; {devices[0].device_kind} x{len(devices)}; tokens identical")
    print("| path | new tokens/s | ms per step | speedup | compile s |")
    print("|---|---|---|---|---|")
    for name, stats in paths.items():
        print(f"| {name} | {stats['tokens_per_s']:,.0f} | {stats['ms_per_step']:.2f} | {stats['speedup']:.1f}x | "
              f"{stats['compile_s']:.1f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
