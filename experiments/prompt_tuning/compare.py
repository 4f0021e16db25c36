r"""Prompt tuning against LoRA at equal trainable parameters: SFT on the embedded task from one pretrained run.

    python experiments/prompt_tuning/compare.py --pretrain runs/pipeline/pretrain --workdir runs/pt_compare \
        [--seeds 0,1,2] [--steps 500] [--pilot-steps 150] [--eval-prompts 256]

The `tiny` model (d_model 128, 4 layers, 4 query and 2 K/V heads of 32) is frozen in both arms:
- LoRA rank 2 on wq and wv (α 16): per layer 2·(128 + 128) + 2·(128 + 64) = 896 params, 3,584 in all;
- prompt tuning with 28 soft tokens: 28 · 128 = 3,584 params, initialised from the embeddings of 28 random
  vocabulary tokens (model/prompt_tuning.py).

1. A learning-rate pilot (`--pilot-steps` each, seed 0): each arm at each of its `--pilot-lrs`, the lr of the
   lowest held-out loss kept for that arm. Prompt tuning is known to want a much larger step than LoRA
   (Lester et al. 2021 train the prompt at 0.3 with Adafactor), so one shared lr would compare the lr.
2. Each arm at its lr for `--steps`, `--seeds`: the answer-token held-out loss at the end (`eval_loss`, the
   `sft` objective's, over `train.eval_batches`), and the gold score of greedy answers to `--eval-prompts`
   held-out prompts (`default_task.gold_score`, 16 new tokens, as the pipeline's SFT row reports it).

Every run is `llm-jax train --config configs/sft.py:tiny` in `<workdir>/<arm>_lr<lr>_s<seed>[_pilot]` (a
finished run is read back, an interrupted one resumes). Writes `<workdir>/results.json` and `results.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from llm_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARMS = {
    "lora": ["model.lora_rank=2", "model.lora_alpha=16", "model.lora_targets=wq,wv"],
    "prompt": ["model.prompt_tuning_tokens=28"],
}


def sft_run(pretrain: str, run_dir: str, arm: str, lr: float, seed: int, steps: int, extra: list[str]) -> dict:
    overrides = [f"train.init_from={os.path.abspath(pretrain)}", f"seed={seed}", f"train.steps={steps}",
                 f"optim.lr={lr}", f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
                 "train.log_every=50", "train.progress_bar=False", *ARMS[arm], *extra]
    started = time.time()
    if not any(m.get("step") == steps and "eval_loss" in m for m in read_metrics(run_dir)):
        command = [sys.executable, "-m", "llm_jax.cli", "train", "--config",
                   os.path.join(REPO, "configs", "sft.py:tiny"), "--workdir", run_dir,
                   *[f"--config.{o}" for o in overrides]]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    metrics = read_metrics(run_dir)
    final = [m for m in metrics if m.get("step") == steps and "eval_loss" in m][-1]
    train = [m for m in metrics if "loss" in m and "tokens_per_s" in m]
    first = next((m for m in metrics if "n_params_trainable" in m), {})
    return dict(run=run_dir, arm=arm, lr=lr, seed=seed, steps=steps, eval_loss=final["eval_loss"],
                train_loss=train[-1]["loss"] if train else None, n_trainable=first.get("n_params_trainable"),
                tokens_per_s=float(np.median([m["tokens_per_s"] for m in train])) if train else None,
                wall_s=time.time() - started)


def gold_greedy(run_dir: str, n_prompts: int) -> float:
    """Mean gold score of greedy answers (16 new tokens) to the first `n_prompts` held-out prompts."""
    from llm_jax.eval.judges import GoldJudge
    from llm_jax.generate import SamplingConfig
    from llm_jax.generation_io import generate_file
    from llm_jax.pipeline import prompts_file
    cache = os.path.join(run_dir, "gold_greedy.json")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            return json.load(f)["gold_greedy"]
    out_dir = os.path.join(run_dir, "generations")
    prompts = prompts_file("default_task", "eval", n_prompts, os.path.join(out_dir, "eval_prompts.jsonl"))
    result = generate_file(run_dir, prompts, os.path.join(out_dir, "greedy.jsonl"),
                           SamplingConfig(max_new_tokens=16, temperature=0.0), batch_size=64, seed=0,
                           progress=False, judge=GoldJudge())
    with open(cache, "w", encoding="utf-8") as f:
        json.dump(dict(gold_greedy=result["gold_score"], count=result["count"]), f)
    return result["gold_score"]


def markdown(results: dict) -> str:
    lines = ["## Learning-rate pilot (seed 0)", "",
             f"| arm | lr | held-out loss after {results['pilot_steps']} steps |", "|---|---:|---:|"]
    for row in results["pilot"]:
        lines.append(f"| {row['arm']} | {row['lr']:g} | {row['eval_loss']:.4f} |")
    lines += ["", f"## {results['steps']} steps, mean ± std over seeds {results['seeds']}", "",
              "| arm | trainable params | lr | held-out answer loss | gold greedy | tokens/s | per seed (loss / gold) |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for arm, rows in results["runs"].items():
        loss = np.array([r["eval_loss"] for r in rows])
        gold = np.array([r["gold_greedy"] for r in rows])
        seeds = "; ".join(f"{r['eval_loss']:.4f} / {r['gold_greedy']:.3f}" for r in rows)
        lines.append(f"| {arm} | {rows[0]['n_trainable']:,} | {rows[0]['lr']:g} | {loss.mean():.4f} ± "
                     f"{loss.std():.4f} | {gold.mean():.3f} ± {gold.std():.3f} | "
                     f"{np.median([r['tokens_per_s'] for r in rows]):,.0f} | {seeds} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--pilot-steps", type=int, default=150)
    parser.add_argument("--pilot-lrs", default="lora=3e-3,1e-2;prompt=3e-3,3e-2,1e-1")
    parser.add_argument("--eval-prompts", type=int, default=256)
    args, extra = parser.parse_known_args(argv)
    extra = [e[len("--config."):] for e in extra if e.startswith("--config.")]
    os.makedirs(args.workdir, exist_ok=True)
    lrs = {arm: [float(x) for x in values.split(",")]
           for arm, values in (part.split("=") for part in args.pilot_lrs.split(";"))}
    seeds = [int(s) for s in args.seeds.split(",")]
    results = dict(steps=args.steps, pilot_steps=args.pilot_steps, seeds=seeds, pilot=[], runs={})
    best = {}
    for arm in ARMS:
        for lr in lrs[arm]:
            run_dir = os.path.join(args.workdir, f"{arm}_lr{lr:g}_s0_pilot")
            results["pilot"].append(sft_run(args.pretrain, run_dir, arm, lr, 0, args.pilot_steps, extra))
        best[arm] = min((r for r in results["pilot"] if r["arm"] == arm), key=lambda r: r["eval_loss"])["lr"]
    for arm in ARMS:
        rows = []
        for seed in seeds:
            run_dir = os.path.join(args.workdir, f"{arm}_lr{best[arm]:g}_s{seed}")
            row = sft_run(args.pretrain, run_dir, arm, best[arm], seed, args.steps, extra)
            row["gold_greedy"] = gold_greedy(run_dir, args.eval_prompts)
            rows.append(row)
            print(json.dumps(row), flush=True)
        results["runs"][arm] = rows
    with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
