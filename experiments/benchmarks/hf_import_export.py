"""Import and export of a 1B-class Llama 3 checkpoint: GB/s, peak host memory, and sharded = one-device.

    python experiments/benchmarks/hf_import_export.py --workdir /tmp/hf_bench [--dtype bfloat16 --layers 16]

1. Writes a Llama 3.2 1B-shaped checkpoint with random values (hidden 2048, 16 layers, 32 heads, 8 K/V heads,
   MLP 8192, vocab 128,256, tied; 1.24 B params) as sharded safetensors, with a small byte-level tokenizer
   (tests/hf/fixtures/llama's), so nothing is downloaded.
2. In a fresh process each (so peak RSS is the import's own): `import_hf` onto one device, and onto 8 emulated
   CPU devices as FSDP 4 × tensor 2. Each reports seconds, GB/s (checkpoint bytes over the load phase) and the
   process's peak RSS (ru_maxrss) against the checkpoint's size.
3. Compares every param of the sharded import with the one-device import, bit for bit.
4. `export_hf` of the sharded run in a fresh process: seconds, GB/s (bytes written), peak RSS; the exported
   tensors are checked equal to the originals.
One JSON line with every figure, the machine and the date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHAPE = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, head_dim=64)


def write_checkpoint(directory: str, dtype: str, layers: int, shard_gb: float) -> int:
    import ml_dtypes  # noqa: F401  (numpy bfloat16)
    import numpy as np

    from llm_jax.hf.safetensors_io import write_sharded
    os.makedirs(directory, exist_ok=True)
    shape = dict(SHAPE, num_hidden_layers=layers)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
                  max_position_embeddings=131072, tie_word_embeddings=True, dtype=dtype, bos_token_id=420,
                  eos_token_id=429, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                                                         low_freq_factor=1.0, high_freq_factor=4.0,
                                                         original_max_position_embeddings=8192), **shape)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(os.path.join(REPO, "tests", "hf", "fixtures", "llama", name), directory)
    d, f_, v, h, k, hd = (shape[n] for n in ("hidden_size", "intermediate_size", "vocab_size",
                                              "num_attention_heads", "num_key_value_heads", "head_dim"))
    rng = np.random.default_rng(0)
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(ml_dtypes_bf16())

    def tensor(*dims):
        return (rng.standard_normal(dims, np.float32) * 0.02).astype(np_dtype)

    def tensors():
        yield "model.embed_tokens.weight", tensor(v, d)
        yield "model.norm.weight", np.ones(d, np_dtype)
        for i in range(layers):
            p = f"model.layers.{i}."
            yield p + "input_layernorm.weight", np.ones(d, np_dtype)
            yield p + "post_attention_layernorm.weight", np.ones(d, np_dtype)
            yield p + "self_attn.q_proj.weight", tensor(h * hd, d)
            yield p + "self_attn.k_proj.weight", tensor(k * hd, d)
            yield p + "self_attn.v_proj.weight", tensor(k * hd, d)
            yield p + "self_attn.o_proj.weight", tensor(d, h * hd)
            yield p + "mlp.gate_proj.weight", tensor(f_, d)
            yield p + "mlp.up_proj.weight", tensor(f_, d)
            yield p + "mlp.down_proj.weight", tensor(d, f_)

    write_sharded(tensors(), directory, int(shard_gb * 1024 ** 3))
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".safetensors"))


def ml_dtypes_bf16():
    import ml_dtypes
    return ml_dtypes.bfloat16


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(args) -> None:
    """One measured step in this process: import (with --mesh) or export; prints one JSON line."""
    start = time.perf_counter()
    if args.child == "import":
        from llm_jax.hf.import_hf import import_hf
        summary = import_hf(args.source, args.run, args.overrides)
        result = dict(seconds=time.perf_counter() - start, gb_per_s=summary["gb_per_s"], phases=summary["seconds"],
                      bytes=summary["bytes"], mesh=summary["mesh"])
    else:
        from llm_jax.hf.export_hf import export_hf
        summary = export_hf(args.run, args.out, overwrite=True)
        seconds = time.perf_counter() - start
        result = dict(seconds=seconds, bytes=summary["bytes"], gb_per_s=summary["bytes"] / 1e9 / seconds)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


def run_child(kind: str, devices: int, **paths) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    command = [sys.executable, __file__, "--child", kind]
    for key, value in paths.items():
        if key == "overrides":
            command += [x for o in value for x in ("--override", o)]
        else:
            command += [f"--{key}", value]
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(run_a: str, run_b: str) -> bool:
    import jax
    import numpy as np

    from llm_jax import runs
    a, b = runs.load_run(run_a), runs.load_run(run_b)
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))),
                                            a.params, b.params)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/hf_bench")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--child")
    parser.add_argument("--source")
    parser.add_argument("--run")
    parser.add_argument("--out")
    parser.add_argument("--override", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    source = os.path.join(args.workdir, "hf")
    t0 = time.perf_counter()
    size = write_checkpoint(source, args.dtype, args.layers, args.shard_gb)
    write_seconds = time.perf_counter() - t0
    one = run_child("import", 1, source=source, run=os.path.join(args.workdir, "one"),
                    overrides=["mesh.data=1", "mesh.fsdp=1"])
    sharded = run_child("import", 8, source=source, run=os.path.join(args.workdir, "sharded"),
                        overrides=["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
    exported = run_child("export", 8, run=os.path.join(args.workdir, "sharded"), out=os.path.join(args.workdir, "out"))
    equal = compare(os.path.join(args.workdir, "one"), os.path.join(args.workdir, "sharded"))
    from safetensors.numpy import load_file  # the export holds the original tensors, bit for bit
    import numpy as np
    original, written = {}, {}
    for directory, into in ((source, original), (os.path.join(args.workdir, "out"), written)):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".safetensors"):
                into.update(load_file(os.path.join(directory, name)))
    export_equal = sorted(original) == sorted(written) and all(np.array_equal(original[n], written[n]) for n in original)
    print(json.dumps(dict(
        checkpoint_bytes=size, dtype=args.dtype, layers=args.layers, write_seconds=round(write_seconds, 1),
        import_one_device=one, import_fsdp4_tensor2=sharded, export=exported,
        peak_rss_over_checkpoint=dict(one=round(one["peak_rss_bytes"] / size, 3),
                                      sharded=round(sharded["peak_rss_bytes"] / size, 3),
                                      export=round(exported["peak_rss_bytes"] / size, 3)),
        sharded_equals_one_device=equal, export_equals_source=export_equal, machine=platform.processor() or
        platform.machine(), cpus=os.cpu_count(), python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))))


if __name__ == "__main__":
    main()
