r"""Reward models on the embedded task's preferences: with and without the edited answers, and with one pair per
row against packed rows (a prompt and its answers in one row), from the same SFT run, several seeds.

    python experiments/post_training/reward_data.py --sft runs/pipeline/sft --workdir runs/reward_data \
        [--seeds 0,1,2] [--steps 300] [--variants pairs_plain,pairs_edited,packed_edited] \
        [--on-policy heldout_pairs.jsonl] [--on-policy-train all.jsonl,ranking.jsonl]

Variants, each `llm-jax train --config configs/reward.py:tiny` (likelihood readout, batch 32, lr 5e-4) from
`--sft` on `default_task` (its train pairs; a third carry an edited answer, llm_jax/data/default_task.py):

    pairs_plain    data.use_edited=False: chosen > rejected only, one pair per row (seq_len 64, two sequences)
    pairs_edited   edited > chosen > rejected: three pairs from such a record, one pair per row
    packed_edited  the same data in packed rows of seq_len 64 (reward.layout=packed): a prompt and its two or
                   three answers in one sequence, so a step computes half the pairs layout's tokens and holds
                   more pairs (about 1.6 a row)

and with `--on-policy-train ALL,RANKING` (`llm-jax preference-pairs` of the SFT model on the train prompts, the
same samples written `--pairs all` and `--pairs ranking`), two more on the policy's own samples:

    onpolicy_all_pairs        every pair of the K samples, one pair per row (InstructGPT's comparisons as
                              independent rows)
    onpolicy_ranking_packed   each prompt's ranking of its samples in one packed row of seq_len 128 (up to 8
                              answers): a prompt's comparisons as one batch element (InstructGPT §3.5)

Every run is evaluated on all 1,000 held-out pairs of the task (no edits there: the same pairs for every variant),
and with `--on-policy PAIRS.jsonl` (e.g. the pipeline's `pairs` stage: the SFT model's own samples judged by gold)
on `--on-policy-n` of those pairs, evenly spaced through the file: the share the reward model orders as gold does,
on the mistakes the policy actually makes. Reported per variant: held-out pair accuracy and margin at the last
step, on-policy agreement (mean ± std over seeds), the train step's median time (from the logged tokens/s), and
pairs per step. A finished run is read back, an interrupted
one resumes. Writes `<workdir>/results.json` and `<workdir>/results.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from llm_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = {
    "pairs_plain": ["data.use_edited=False"],
    "pairs_edited": [],
    "packed_edited": ["reward.layout=packed", "reward.responses_per_row=3"],
}


def on_policy_variants(train_all: str, train_ranking: str) -> dict:
    """The variants trained on the policy's own samples (module docstring)."""
    return {"onpolicy_all_pairs": [f"data.train={os.path.abspath(train_all)}"],
            "onpolicy_ranking_packed": [f"data.train={os.path.abspath(train_ranking)}", "reward.layout=packed",
                                        "reward.responses_per_row=8", "data.seq_len=128"]}


def reward_run(sft: str, workdir: str, variant: str, seed: int, steps: int, variants: dict) -> dict:
    run_dir = os.path.join(workdir, f"{variant}_s{seed}")
    overrides = [f"train.init_from={os.path.abspath(sft)}", f"seed={seed}", f"train.steps={steps}",
                 f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.eval_batches=-1",
                 "data.train=default_task", "data.eval=default_task", *variants[variant]]
    if not any(m.get("step") == steps and "eval_accuracy" in m for m in read_metrics(run_dir)):
        command = [sys.executable, "-m", "llm_jax.cli", "train", "--config",
                   os.path.join(REPO, "configs", "reward.py:tiny"), "--workdir", run_dir,
                   *[f"--config.{o}" for o in overrides]]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    metrics = read_metrics(run_dir)
    final = [m for m in metrics if m.get("step") == steps and "eval_accuracy" in m][-1]
    stats = next(m for m in metrics if "n_train_rows" in m)
    train = [m for m in metrics if "tokens_per_s" in m]
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    sequences = 1 if config["reward"]["layout"] == "packed" else 2
    tokens_per_step = config["data"]["batch_size"] * config["data"]["seq_len"] * sequences
    return dict(run=run_dir, eval_accuracy=final["eval_accuracy"], eval_margin=final["eval_margin"],
                step_ms=float(np.median([tokens_per_step / m["tokens_per_s"] * 1e3 for m in train])),
                pairs_per_step=config["data"]["batch_size"] * stats["n_train_pairs"] / stats["n_train_rows"],
                train_pairs=stats["n_train_pairs"], train_rows=stats["n_train_rows"],
                tokens_per_pair=stats["train_tokens_per_pair"])


def on_policy_agreement(run_dir: str, pairs_path: str, n: int) -> float:
    """The share of n pairs of `pairs_path` (evenly spaced) whose chosen answer the reward run scores higher."""
    name = os.path.splitext(os.path.basename(pairs_path))[0]
    cache = os.path.join(run_dir, f"on_policy_{name}_{n}.json")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            return json.load(f)["agreement"]
    from llm_jax.objectives.reward import load_scorer
    with open(pairs_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    picked = [records[i] for i in np.linspace(0, len(records) - 1, min(n, len(records))).astype(int)]
    scorer = load_scorer(run_dir, batch_size=64)
    prompts = [r["prompt"] for r in picked]
    chosen = scorer.score(prompts, [r["chosen"] for r in picked])
    rejected = scorer.score(prompts, [r["rejected"] for r in picked])
    agreement = float(np.mean(chosen > rejected))
    with open(cache, "w", encoding="utf-8") as f:
        json.dump(dict(agreement=agreement, n=len(picked), pairs=pairs_path), f)
    return agreement


def _mean_std(values) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--on-policy", default="", help="gold-judged pairs of the policy's samples (pairs.jsonl)")
    parser.add_argument("--on-policy-n", type=int, default=2000)
    parser.add_argument("--on-policy-train", default="", help="ALL,RANKING: the train prompts' on-policy pairs "
                                                              "and rankings (adds the onpolicy_* variants)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = dict(VARIANTS)
    names = args.variants.split(",")
    if args.on_policy_train:
        variants.update(on_policy_variants(*args.on_policy_train.split(",")))
        names += [n for n in variants if n.startswith("onpolicy_") and n not in names]
    results = {v: [reward_run(args.sft, args.workdir, v, s, args.steps, variants) for s in seeds] for v in names}
    for runs in results.values():
        for r in runs:
            r["on_policy_agreement"] = (on_policy_agreement(r["run"], args.on_policy, args.on_policy_n)
                                        if args.on_policy else None)
    lines = ["| variant | held-out pair accuracy | margin | on-policy agreement | step ms | pairs per step "
             "| train pairs (rows) | real tokens per pair |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant, runs in results.items():
        agreement = _mean_std([r["on_policy_agreement"] for r in runs]) if args.on_policy else "–"
        lines.append(f"| {variant} | {_mean_std([r['eval_accuracy'] for r in runs])} | "
                     f"{_mean_std([r['eval_margin'] for r in runs])} | {agreement} | "
                     f"{np.median([r['step_ms'] for r in runs]):.0f} | {runs[0]['pairs_per_step']:.1f} | "
                     f"{runs[0]['train_pairs']:,} ({runs[0]['train_rows']:,}) | {runs[0]['tokens_per_pair']:.1f} |")
    on_policy = f"; on-policy: {args.on_policy_n} pairs of {args.on_policy}" if args.on_policy else ""
    table = ("\n".join(lines) + f"\n\n{len(seeds)} seeds ({args.seeds}), {args.steps} steps, from {args.sft}"
             f"{on_policy}.\n")
    print(table)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(dict(seeds=seeds, steps=args.steps, sft=args.sft, on_policy=args.on_policy,
                       on_policy_n=args.on_policy_n, runs=results), f, indent=1)
    with open(os.path.join(args.workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(table)
    return results


if __name__ == "__main__":
    main()
