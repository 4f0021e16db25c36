r"""Step time of full fine-tuning, LoRA, and LoRA on an int8 and an NF4 base (QLoRA), in one process: what
dequantizing the base inside every matmul costs.

    python experiments/benchmarks/qlora_step.py [--config configs/pretrain.py:bench] [--steps 10] [--rounds 2] \
        [--json out.json] [--config.x=y ...]

Each mode is `train_throughput.py`'s measurement (the real jitted train step on random packed batches; median
of `--steps` timed steps after compilation and warm-up) of the same config with LoRA rank 16 on all seven
projections (α 32) and `model.base_quant` none / int8 / nf4 (blocks of 64, double-quantized scales). The modes
run in turn `--rounds` times (full, lora, int8, nf4, full, ...) so that a machine that slows down or speeds up
during the run shifts them all alike; each mode's figure is the median over its rounds. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput  # noqa: E402

LORA = ["model.lora_rank=16", "model.lora_alpha=32", "model.lora_targets=wq,wk,wv,wo,w_gate,w_up,w_down"]
MODES = {
    "full": [],
    "lora": LORA,
    "qlora_int8": LORA + ["model.base_quant=int8"],
    "qlora_nf4": LORA + ["model.base_quant=nf4"],
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain.py:bench")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json")
    args, extra = parser.parse_known_args(argv)
    runs: dict[str, list[dict]] = {m: [] for m in args.modes.split(",")}
    first = True
    for _ in range(args.rounds):
        for mode in runs:
            result = train_throughput.main(
                ["--config", args.config, "--steps", str(args.steps), "--warmup", "2",
                 "--host_allocator", "tuned" if first else "default", *extra, *[f"--config.{o}" for o in MODES[mode]]])
            first = False
            runs[mode].append(result)
    summary = {mode: dict(step_ms=float(np.median([r["step_ms"] for r in rs])),
                          step_ms_rounds=[round(r["step_ms"], 2) for r in rs],
                          tokens_per_s=float(np.median([r["tokens_per_s"] for r in rs])),
                          mfu=float(np.median([r["mfu"] for r in rs])))
               for mode, rs in runs.items()}
    if "lora" in summary:
        for mode in summary:
            summary[mode]["vs_lora"] = summary[mode]["step_ms"] / summary["lora"]["step_ms"]
    any_run = next(iter(runs.values()))[0]
    out = dict(config=args.config, overrides=extra, steps=args.steps, rounds=args.rounds, modes=summary,
               **{k: any_run[k] for k in ("batch_size", "seq_len", "dtype", "n_params") if k in any_run},
               **{k: any_run[k] for k in any_run if k.startswith(("device", "jax", "date", "cpu_count"))})
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
