r"""Forward and forward+backward time of each attention implementation, over sequence lengths and head dims.

    python experiments/benchmarks/attention.py [--seq-lens 1024,2048,4096,8192] [--head-dims 64,128] \
        [--impls xla,pallas,cudnn] [--dtype bfloat16] [--no-causal] [--tokens 16384] [--heads H] \
        [--kv-heads K] [--warmup 2] [--iters 10] [--blocks q,kv,q_bwd,kv_bwd] [--json PATH] [--quick]

For each (implementation, sequence length T, head dim D) it builds random q (B, T, H, D), k and v (B, T, K, D)
with B = max(1, tokens // T) (so every call handles about the same number of tokens) and H·D = 2048 unless
`--heads` says otherwise, jits `attention(...)` (forward) and `value_and_grad` of sum(out · cotangent) over
q, k, v (forward+backward) once, runs `--warmup` untimed calls, then reports the median of `--iters` timed
calls, each waited on with block_until_ready. Compilation is not timed.

FLOPs (the FlashAttention-2 paper's convention, also its benchmark script's): forward = 4·B·H·T·S·D (Q·Kᵀ
and P·V, 2 FLOPs per multiply-add), halved when causal; forward+backward = 3.5 × forward, since the
backward's five matmuls (Q·Kᵀ recomputed, dV, dP, dQ, dK) are 2.5 × the forward's two. Note that
`scaling/flops.py` credits model FLOPs without the recomputation (forward+backward = 3 × forward), so its
rates for the same call are 6/7 of these. The same count is used for every implementation, whatever it
actually computes (XLA computes the masked half of a causal score matrix; the kernels skip it).

Utilisation divides TFLOP/s by one device's dense peak (`train/hardware.py`): the datasheet figure on
accelerators; on CPU the square-matmul rate in the benchmark's dtype measured in this run, just before and
just after the sweep (each the median of 5; their mean is used), as `train_throughput.py` does.

Default implementations: GPU xla,pallas,cudnn; TPU xla,pallas; CPU xla only (pallas would run in Pallas
interpret mode, whose timings mean nothing, and reference materialises the whole score matrix, as xla
does in the forward but also keeps it for the backward). A configuration that fails (cudnn missing, out of
memory) becomes a row carrying the first line of its error, and the sweep goes on. On CPU, where running out
of memory kills the process instead of raising, the XLA paths are skipped (with a row saying so) when their
score matrices would not fit in the memory available.

Progress goes to stderr; stdout gets the header and a markdown table, ready to paste into the README.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.kernels.attention import IMPLEMENTATIONS, BlockSizes, attention, platform_of, resolve_impl
from llm_jax.train import hardware

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import compile_and_time  # noqa: E402

DEFAULT_IMPLS = {"tpu": "xla,pallas", "cpu": "xla"}  # anything else is a GPU: xla,pallas,cudnn
FWD_BWD_FACTOR = 3.5  # FlashAttention-2: backward = 2.5 × forward (recomputation included)
# Peak host memory of forward+backward in (B, H, T, S) float32 score arrays, measured on CPU (peak RSS, bf16 and
# f32 inputs, B=4 H=32 T=1024 D=64): xla 3.4-5.0, reference 7.2-7.9 (it keeps its probabilities for autodiff).
# Used only for the CPU memory check.
SCORE_COPIES = {"xla": 5, "reference": 8}


def attention_flops(batch: int, heads: int, seq_q: int, seq_kv: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs: Q·Kᵀ and P·V, 2·T·S·D each per (batch, head); causal counts half the score matrix."""
    full = 4 * batch * heads * seq_q * seq_kv * head_dim
    return full / 2 if causal else full


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def time_compiled(fn, args, warmup: int, iters: int) -> tuple[float, float]:
    """(median seconds of `iters` calls of jit(fn) after `warmup` calls, compile seconds)."""
    _, compile_s, times = compile_and_time(fn, args, warmup, iters)
    return float(np.median(times)), compile_s


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


def _cpu_memory_error(impl: str, b: int, h: int, t: int) -> str | None:
    """Why an XLA path would exhaust host memory (which kills the process rather than raising), else None."""
    need = SCORE_COPIES.get(impl, 0) * b * h * t * t * 4
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.8 * available:
        return (f"skipped: ~{need / 2**30:.1f} GiB of (B, H, T, S) float32 scores would not fit in the "
                f"{available / 2**30:.1f} GiB of host memory available")
    return None


def run_one(impl, t, d, h, kv, args, blocks, on_cpu) -> dict:
    """One table row: times, FLOPs and rates of the forward and the forward+backward (or the error)."""
    b = max(1, args.tokens // t)
    row = dict(impl=impl, seq=t, head_dim=d, batch=b, heads=h, kv_heads=kv)
    flops_fwd = attention_flops(b, h, t, t, d, args.causal)
    row.update(fwd_gflop=flops_fwd / 1e9, fwd_bwd_gflop=FWD_BWD_FACTOR * flops_fwd / 1e9)
    if on_cpu and (error := _cpu_memory_error(impl, b, h, t)):
        return dict(row, error=error)
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    q, k, v, cotangent = (jnp.asarray(rng.standard_normal(shape), dtype)
                          for shape in ((b, t, h, d), (b, t, kv, d), (b, t, kv, d), (b, t, h, d)))

    def forward(q, k, v):
        return attention(q, k, v, causal=args.causal, impl=impl, blocks=blocks)

    def loss(q, k, v, cotangent):  # sum(out · c) makes the output's cotangent c: a dense, fixed dO
        return jnp.sum(forward(q, k, v).astype(jnp.float32) * cotangent.astype(jnp.float32))

    # The two are measured separately so that a backward that fails still leaves its forward's figures.
    for name, fn, fn_args, flops in (
            ("fwd", forward, (q, k, v), flops_fwd),
            ("fwd_bwd", jax.value_and_grad(loss, argnums=(0, 1, 2)), (q, k, v, cotangent),
             FWD_BWD_FACTOR * flops_fwd)):
        try:
            seconds, compile_s = time_compiled(fn, fn_args, args.warmup, args.iters)
        except Exception as e:  # noqa: BLE001  (cudnn unavailable, out of memory, a kernel that fails to compile)
            row.setdefault("error", f"{name}: {_first_line(e)}")
            continue
        row.update({f"{name}_ms": seconds * 1e3, f"{name}_tflops_per_s": flops / seconds / 1e12,
                    f"{name}_compile_s": compile_s})
    return row


def _sig3(x: float) -> str:
    """Three significant digits, trailing zeros kept, no exponent: 0.0100, 12.3, 989, 5040."""
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}" if x else "0"


def markdown_table(rows: list[dict]) -> str:
    def num(row, key):
        return _sig3(row[key]) if key in row else "–"

    columns = ["impl", "seq", "head_dim", "batch", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
               "fwd util"]
    with_errors = any("error" in r for r in rows)
    columns += ["error"] if with_errors else []
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r["impl"], str(r["seq"]), str(r["head_dim"]), str(r["batch"]), num(r, "fwd_ms"),
                 num(r, "fwd_tflops_per_s"), num(r, "fwd_bwd_ms"), num(r, "fwd_bwd_tflops_per_s"), num(r, "fwd_util")]
        cells += [r.get("error", "").replace("|", "/")] if with_errors else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=_ints, default=[1024, 2048, 4096, 8192], help="comma list")
    parser.add_argument("--head-dims", type=_ints, default=[64, 128], help="comma list")
    parser.add_argument("--impls", default=None, help="comma list of " + ",".join(IMPLEMENTATIONS[1:]) +
                        "; default by platform: GPU xla,pallas,cudnn, TPU xla,pallas, CPU xla")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="full (bidirectional) attention")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per call: batch = max(1, tokens // seq)")
    parser.add_argument("--heads", type=int, default=None, help="query heads; default 2048 // head_dim")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = heads")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    parser.add_argument("--iters", type=int, default=10, help="timed calls; the median is reported")
    parser.add_argument("--blocks", type=_ints, default=None,
                        help="pallas tile sizes q,kv,q_bwd,kv_bwd; default the kernels' own per platform")
    parser.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmul that sets the "
                                                                     "CPU reference rate")
    parser.add_argument("--json", default=None, help="also write the header and rows to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: seq 256,512, head dim 64, warmup 1, iters 2, tokens 4096 "
                             "(flags given explicitly still win)")
    args = parser.parse_args(argv)
    if args.quick:  # new defaults, then parse again so that explicit flags override them
        # 4096 tokens: with 16384 the quick run takes over a minute on a 2-core CPU
        parser.set_defaults(seq_lens=[256, 512], head_dims=[64], warmup=1, iters=2, tokens=4096)
        args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0; got {args.iters} and {args.warmup}")
    heads = {d: args.heads or max(1, 2048 // d) for d in args.head_dims}
    kv_heads = {d: args.kv_heads or h for d, h in heads.items()}
    for d in args.head_dims:
        if heads[d] % kv_heads[d]:
            parser.error(f"--kv-heads {kv_heads[d]} does not divide the {heads[d]} query heads of head dim {d}")
    if args.blocks is not None and len(args.blocks) != 4:
        parser.error(f"--blocks wants four sizes q,kv,q_bwd,kv_bwd; got {args.blocks}")
    blocks = BlockSizes(*args.blocks) if args.blocks else None

    # The host allocator is left as it is (train_throughput.py tunes it): in a CPU probe of the xla forward
    # (B=64 T=256 H=32 D=64, bf16) `hardware.tune_host_allocator()` did not stop its GB-sized score arrays from
    # page-faulting on every call, it doubled to quintupled the kernel time, and the median call was ~2x slower.
    platform = platform_of()
    impls = (args.impls or DEFAULT_IMPLS.get(platform, "xla,pallas,cudnn")).split(",")
    for impl in impls:
        resolve_impl(impl, platform, args.dtype)  # fails now, with the valid names, on a typo
    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])

    # On CPU the reference matmul runs before and after the sweep, so that it sees the machine the sweep saw.
    matmul = [hardware.measure_matmul_flops(args.dtype, n=args.matmul_n)] if on_cpu else []
    rows = []
    for d in args.head_dims:
        for t in args.seq_lens:
            for impl in impls:
                row = run_one(impl, t, d, heads[d], kv_heads[d], args, blocks, on_cpu)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    if on_cpu:
        matmul.append(hardware.measure_matmul_flops(args.dtype, n=args.matmul_n))
        peak = float(np.mean(matmul))
        peak_source = (f"measured {args.dtype} {args.matmul_n}³ matmul on {device.device_kind}, mean of before "
                       f"and after the sweep: " + ", ".join(f"{m / 1e9:.0f}" for m in matmul) + " GFLOP/s")
    else:
        peak, peak_source = hardware.peak_flops(args.dtype, [device])
    for row in rows:
        for name in ("fwd", "fwd_bwd"):
            if f"{name}_tflops_per_s" in row:
                row[f"{name}_util"] = row[f"{name}_tflops_per_s"] * 1e12 / peak

    header = dict(
        command=command, device_kind=device.device_kind, platform=device.platform, jax_version=jax.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        dtype=args.dtype, causal=args.causal, tokens_per_call=args.tokens, warmup=args.warmup, iters=args.iters,
        blocks=args.blocks, peak_tflops_per_s=peak / 1e12, peak_source=peak_source,
        flops_convention="fwd = 4·B·H·T·S·D (halved when causal); fwd+bwd = 3.5 × fwd (FlashAttention-2)",
        load_avg_1m=os.getloadavg()[0], cpu_count=os.cpu_count())
    heads_text = ", ".join(f"D={d}: H={heads[d]}, K={kv_heads[d]}" for d in args.head_dims)
    print(f"attention benchmark: {device.device_kind} ({device.platform}), jax {jax.__version__}, {header['date']}")
    print(f"command: `{command}`")
    print(f"{'causal' if args.causal else 'full (non-causal)'}, {args.dtype}, {args.tokens} tokens per call "
          f"(batch = tokens // seq), {heads_text}; median of {args.iters} timed calls after {args.warmup} untimed")
    print(f"FLOPs: {header['flops_convention']}")
    print(f"util = fwd TFLOP/s / peak {peak / 1e12:.4g} TFLOP/s ({peak_source})")
    if on_cpu and "pallas" in impls:
        print("pallas on CPU runs in Pallas interpret mode: its timings say nothing about the kernels")
    print()
    print(markdown_table(rows))
    result = dict(header, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
