r"""Per-device training memory of Llama 2 7B and 13B, full fine-tuning against LoRA and QLoRA, before launch.

    python experiments/memory/memory_table.py [--models 7b,13b] [--modes full,lora,qlora] [--devices 1,8] \
        [--remat none,full] [--compilers default,no-hoist] [--seq-len 512] [--json experiments/memory/results.json]

Each cell is `llm-jax memory` (train/loop.py `memory_before_launch`): the SFT train step compiled on abstract
shapes only, nothing allocated, on one device or on an N-way FSDP mesh of emulated CPU devices (the script sets
`--xla_force_host_platform_device_count` for its cells), batch 1 sequence per device either way. The model section
comes from the public Hugging Face config.json of meta-llama/Llama-2-7b-hf and Llama-2-13b-hf (below), converted
by the importer's own `hf.import_hf.run_config`, as `llm-jax import-hf` does; `65b` is LLaMA 65B's shapes, the
QLoRA paper's largest model.

    full    every param trains: f32 master weights and AdamW state, bf16 compute (model.dtype)
    lora    rank 16, alpha 32 on wq,wk,wv,wo,w_gate,w_up,w_down; the base frozen in bf16 (the adapters and their
            AdamW state bf16 too: the param dtype), bf16 compute
    qlora   lora plus model.base_quant=nf4 (skipped, with a message, where this checkout has no such field)

`--compilers`: XLA's CPU compiler as it is ("default"), and with while-loop-invariant code motion off
("no-hoist"; see COMPILERS below). Every cell runs in a subprocess of its own, so its peak host memory
(`ru_maxrss`) is its own; results go to `--json` and a markdown table on stdout (experiments/memory/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

# The public config.json files (https://huggingface.co/meta-llama/Llama-2-7b-hf and .../Llama-2-13b-hf).
LLAMA2_HF = {
    "7b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-05, "max_position_embeddings": 4096,
           "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1,
           "eos_token_id": 2, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True},
    "13b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
            "num_key_value_heads": 40, "vocab_size": 32000, "rms_norm_eps": 1e-05, "max_position_embeddings": 4096,
            "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 1,
            "eos_token_id": 2, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True},
}
# The QLoRA paper's largest model, for its headline claim: LLaMA 65B's shapes (Touvron et al. 2023, Table 2: width
# 8192, 64 heads, 80 layers; the FFN width 22016 and vocabulary 32000 of its released checkpoints).
LLAMA_65B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 8192,
             "intermediate_size": 22016, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 64, "vocab_size": 32000, "rms_norm_eps": 1e-06, "max_position_embeddings": 2048,
             "tie_word_embeddings": False, "torch_dtype": "float16"}
HF_CONFIGS = {**LLAMA2_HF, "65b": LLAMA_65B}
ALL_PROJECTIONS = "wq,wk,wv,wo,w_gate,w_up,w_down"
# XLA's CPU compiler has no bf16 matmul: it converts bf16 weights to f32 and hoists the conversion of the scanned
# layer stack out of the layer loop, so an f32 copy of every bf16 weight sits among the temporaries (24 GiB for
# 7B). "no-hoist" compiles with that pass off: one layer's copy at a time, nearer to a device with bf16 matmuls.
COMPILERS = {"default": "", "no-hoist": "--xla_disable_hlo_passes=while-loop-invariant-code-motion"}
MODES = {
    "full": ["model.param_dtype=float32", "model.dtype=bfloat16"],
    "lora": ["model.param_dtype=bfloat16", "model.dtype=bfloat16", "model.lora_rank=16", "model.lora_alpha=32.0",
             f"model.lora_targets={ALL_PROJECTIONS}"],
}
MODES["qlora"] = MODES["lora"] + ["model.base_quant=nf4"]


def cell_config(model: str, mode: str, devices: int, remat: str, seq_len: int):
    from llm_jax.hf.import_hf import run_config
    mesh = ["mesh.data=1", f"mesh.fsdp={devices}", "mesh.tensor=1", "mesh.sequence=1"]
    overrides = MODES[mode] + mesh + [f"model.remat={remat}", f"data.seq_len={seq_len}",
                                      f"data.batch_size={devices}", "objective=sft"]
    source = f"meta-llama/Llama-2-{model}-hf" if model in LLAMA2_HF else f"llama-{model}"
    return run_config(source, HF_CONFIGS[model], overrides)


def measure_cell(model: str, mode: str, devices: int, remat: str, seq_len: int, compiler: str) -> dict:
    import jax

    from llm_jax.objectives import get_objective
    from llm_jax.train.loop import memory_before_launch
    began = time.perf_counter()
    config = cell_config(model, mode, devices, remat, seq_len)
    report = memory_before_launch(config, get_objective(config.objective), jax.devices()[:devices])
    return dict(model=model, mode=mode, devices=devices, remat=remat, compiler=compiler, seq_len=seq_len,
                batch_per_device=1,
                **report.to_json(), seconds=round(time.perf_counter() - began, 1),
                peak_host_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def has_field(name: str) -> bool:
    from llm_jax.configs_common import base_config
    return name in base_config().model


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    """One line per cell; temporaries and total under each compiler setting that was run."""
    cells, compilers = {}, []
    for r in rows:
        cells.setdefault((r["model"], r["mode"], r["devices"], r["remat"]), {})[r["compiler"]] = r
        if r["compiler"] not in compilers:
            compilers.append(r["compiler"])

    def mesh(n):
        return "1 device" if n == 1 else f"fsdp {n}"
    head = "| model | mode | mesh | remat | params | optimizer | gradients (in temp) |"
    rule = "|---|---|---|---|---:|---:|---:|"
    for c in compilers:
        head += f" temp ({c}) | total ({c}) |"
        rule += "---:|---:|"
    lines = [head, rule]
    for (model, mode, devices, remat), by in cells.items():
        r = next(iter(by.values()))
        line = (f"| {model} | {mode} | {mesh(devices)} | {remat} | {_gib(r['params_bytes'])} | "
                f"{_gib(r['optimizer_bytes'])} | {_gib(r['grads_bytes'])} |")
        for c in compilers:
            line += (f" {_gib(by[c]['temp_bytes'])} | **{_gib(by[c]['total_bytes'])}** |" if c in by else " | |")
        lines.append(line)
    return "\n".join(lines) + "\n\n(GiB per device)\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="7b,13b")
    parser.add_argument("--modes", default="full,lora,qlora")
    parser.add_argument("--devices", default="1,8", help="mesh sizes: 1 (one device) and/or N (N-way FSDP)")
    parser.add_argument("--remat", default="none,full", help="model.remat values")
    parser.add_argument("--compilers", default="default,no-hoist", help=f"XLA CPU settings: {list(COMPILERS)}")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # model,mode,devices,remat,compiler: one cell's JSON
    args = parser.parse_args(argv)
    if args.cell:
        model, mode, devices, remat, compiler = args.cell.split(",")
        print(json.dumps(measure_cell(model, mode, int(devices), remat, args.seq_len, compiler)))
        return 0

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; known {sorted(MODES)}")
    if "qlora" in modes and not has_field("base_quant"):
        print("skipping qlora: this checkout's model config has no base_quant field yet (QLoRA's quantized base); "
              "rerun with --modes qlora once it has", file=sys.stderr)
        modes.remove("qlora")
    most = max(int(d) for d in args.devices.split(","))
    rows, failed = [], []
    cells = [(model, mode, devices, remat, compiler) for model in args.models.split(",") for mode in modes
             for devices in args.devices.split(",") for remat in args.remat.split(",")
             for compiler in args.compilers.split(",")]
    for model, mode, devices, remat, compiler in cells:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
            f"--xla_force_host_platform_device_count={most} {COMPILERS[compiler]}").strip())
        cell = f"{model},{mode},{devices},{remat},{compiler}"
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--cell", cell,
                               "--seq-len", str(args.seq_len)], env=env, capture_output=True, text=True)
        if done.returncode:
            failed.append(cell)
            print(f"{cell}: failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}",
                  file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{cell}: total {_gib(r['total_bytes'])} GiB per device ({r['seconds']} s, host peak "
              f"{_gib(r['peak_host_rss_bytes'])} GiB)", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, failed=failed, machine=f"{platform.machine()}, {os.cpu_count()} CPUs",
                           date=time.strftime("%Y-%m-%d %H:%M %Z")), f, indent=1)
    print(table(rows), end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
