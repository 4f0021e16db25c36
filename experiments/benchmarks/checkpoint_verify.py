"""What verified checkpoints cost: the save, the manifest (sha256 of every file) and the verified restore of a
train state, at a pretraining size.

    python experiments/benchmarks/checkpoint_verify.py --config configs/pretrain.py:125m --workdir /tmp/ckpt_bench

Builds the config's train state on the local devices (params and AdamW moments, f32), then times, each the median
of `--repeats` fresh steps:
- `save`: `Checkpointer.save` until orbax's async save is handed off (what a train step waits for);
- `commit`: the wait for the save to land (overlapped with training steps in a run);
- `manifest`: hashing every file of the step and writing manifest.json (at the next save, `wait` or `close`);
- `verify`: reading the files back against the manifest (`manifest.verify`, on every restore);
- `restore`: orbax's restore and the finite-values check.
GB/s are checkpoint bytes over each phase. One JSON line with the figures, the machine and the date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from llm_jax import cli, config_lib, sharding  # noqa: E402
from llm_jax.model.config import ModelConfig  # noqa: E402
from llm_jax.train import manifest  # noqa: E402
from llm_jax.objectives import get_objective  # noqa: E402
from llm_jax.train.checkpoint import Checkpointer  # noqa: E402
from llm_jax.train.loop import build_training  # noqa: E402


def _bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(directory) for n in names)


def main(argv: list[str] | None = None) -> dict:
    rest, overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/pretrain.py:125m")
    parser.add_argument("--workdir", required=True, help="scratch folder (emptied first)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(rest)
    config = config_lib.load(args.config, overrides)
    model_cfg = ModelConfig.from_config(config.model)
    mesh = sharding.make_mesh(config.mesh)
    t = build_training(config, model_cfg, mesh, sharding.check_rules(config.mesh_rules),
                       get_objective(config.objective))
    state = t.create_state()
    shutil.rmtree(args.workdir, ignore_errors=True)
    checkpointer = Checkpointer(args.workdir, keep=args.repeats + 1, save_data_iterator=False)
    times: dict[str, list[float]] = {k: [] for k in ("save", "commit", "manifest", "verify", "restore")}
    for label in range(1, args.repeats + 1):
        start = time.perf_counter()
        checkpointer.save(state, label=label)
        times["save"].append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointer.manager.wait_until_finished()
        times["commit"].append(time.perf_counter() - start)
        start = time.perf_counter()
        checkpointer.wait()  # writes the manifest of the committed step
        times["manifest"].append(time.perf_counter() - start)
        start = time.perf_counter()
        manifest.verify(checkpointer.step_dir(label))
        times["verify"].append(time.perf_counter() - start)
        start = time.perf_counter()
        restored = checkpointer.restore(t.abstract_state, step=label)  # verified again: cached in this process
        jax.block_until_ready(restored)
        times["restore"].append(time.perf_counter() - start)
    size = _bytes(checkpointer.step_dir(1))
    checkpointer.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    result = dict(config=args.config, overrides=overrides, checkpoint_bytes=size,
                  seconds={k: round(v, 3) for k, v in median.items()},
                  gb_per_s={k: round(size / 1e9 / max(v, 1e-9), 3) for k, v in median.items()},
                  devices=len(jax.devices()), platform=jax.devices()[0].platform, machine=platform.processor()
                  or platform.machine(), date=datetime.date.today().isoformat())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
