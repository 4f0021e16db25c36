r"""The reward model's two row layouts on the same data: one pair per row against a prompt and several answers per
row (`reward.layout`, llm_jax/data/preference_rows.py): tokens per comparison and the train step's time.

    python experiments/benchmarks/preference_layouts.py [--tokenizer runs/pipeline/sft/tokenizer.model] \
        [--records 512] [--k 8] [--steps 10] [--rounds 2] [--json out.json] [--config.x=y ...]

Data, both from the embedded task (llm_jax/data/default_task.py), written as record files:
- `task`: its first `--records` train preference records: pairs, a third of them with an edited answer
  (three answers, three pairs);
- `k<K>`: `--records` train prompts, each with K different answers (the gold answer and K−1 corruptions of it),
  ranked by gold score with ties: the shape of K on-policy samples ranked by a judge (up to K(K−1)/2 pairs).

Each data set is rendered in both layouts by `render_preferences` (the real data path) with `configs/reward.py:tiny`
(a pair row of seq_len 64; packed rows of `--packed_seq_len`, default 128, with up to `--responses_per_row`
answers). Per layout: rows and pairs, real (non-padding) tokens per pair, computed tokens per pair (rows ×
seq_len × sequences per row / pairs: what the step processes, padding included). Then the real jitted train step
(`build_training`, the reward objective, one device, fresh params) on the first batch of rows of each layout:
compiled and warmed up apart, `--steps` timed steps, the layouts taking turns `--rounds` times; per layout the
median step time, pairs per step (the batch's real pairs) and pairs per second. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from llm_jax import cli, config_lib, sharding
from llm_jax.data import default_task
from llm_jax.data.preference_rows import render_preferences
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.objectives import get_objective
from llm_jax.train.loop import build_training, validate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import run_facts  # noqa: E402


def ranked_records(n: int, k: int, seed: int = 0) -> list[dict]:
    """n train prompts of the task, each with k different answers (gold and corruptions) ranked by gold score."""
    rng = np.random.default_rng(seed)
    out = []
    for record in default_task.iter_records("prompts_train", n, seed):
        prompt = record["prompt"]
        task, words = default_task.parse_prompt(prompt)
        answers = [default_task.gold_answer(prompt)]
        while len(answers) < k:
            answer = " ".join(default_task.corrupt(rng, task, words))
            if answer not in answers:
                answers.append(answer)
        scores = [default_task.gold_score(prompt, a) for a in answers]
        levels = sorted(set(scores), reverse=True)
        ranking = [[i for i, s in enumerate(scores) if s == level] for level in levels]
        out.append({"prompt": prompt, "responses": answers, "ranking": [r[0] if len(r) == 1 else r for r in ranking]})
    return out


def _write(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def _layout_config(base: str, train: str, layout: str, seq_len: int, per_row: int, overrides: list[str]):
    return config_lib.load(base, [f"data.train={train}", f"data.eval={train}", f"reward.layout={layout}",
                                  f"reward.responses_per_row={per_row}", f"data.seq_len={seq_len}", *overrides])


def _timed(training, state, batch, steps: int) -> tuple[object, list[float]]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = training.train_step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return state, times


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = cli.split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/reward.py:tiny")
    parser.add_argument("--tokenizer", default="", help="a trained tokenizer.model (default: train one)")
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--k", type=int, default=8, help="answers per prompt of the ranked data set")
    parser.add_argument("--packed_seq_len", type=int, default=128)
    parser.add_argument("--responses_per_row", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(rest)

    workdir = tempfile.mkdtemp(prefix="preference_layouts_")
    base = config_lib.load(args.config, overrides)
    tokenizer_path = args.tokenizer
    if not tokenizer_path:
        from llm_jax.data.tokenizer_stage import run_tokenizer
        tokenizer_path = run_tokenizer(base, workdir)["path"]
    tokenizer = Tokenizer.load(tokenizer_path)
    overrides = [*overrides, f"tokenizer.path={tokenizer_path}"]
    data_sets = {
        "task": _write(os.path.join(workdir, "task.jsonl"),
                       list(default_task.iter_records("preferences_train", args.records))),
        f"k{args.k}": _write(os.path.join(workdir, f"k{args.k}.jsonl"), ranked_records(args.records, args.k)),
    }
    layouts = {"pairs": (int(base.data.seq_len), 2), "packed": (args.packed_seq_len, args.responses_per_row)}

    results, runs = {}, []
    for name, path in data_sets.items():
        for layout, (seq_len, per_row) in layouts.items():
            config = _layout_config(args.config, path, layout, seq_len, per_row, overrides)
            config.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
            rows, _, stats = render_preferences(config, tokenizer, workdir, layout, per_row, log=lambda _: None)
            sequences = 2 if layout == "pairs" else 1
            pairs, n_rows = stats["n_train_pairs"], stats["n_train_rows"]
            b = int(config.data.batch_size)
            batch_rows = {k: v[:b] for k, v in rows.items()}
            pairs_in_batch = (b if layout == "pairs" else float(batch_rows["pair_valid"].sum()))
            model_cfg = validate(config)
            mesh, rules = sharding.make_mesh(config.mesh, jax.devices()[:1]), sharding.check_rules(config.mesh_rules)
            training = build_training(config, model_cfg, mesh, rules, get_objective("reward"))
            state = training.create_state()
            batch = sharding.global_batch_from_local(batch_rows, mesh, rules)
            start = time.perf_counter()
            state, _ = _timed(training, state, batch, 1)
            compile_s = time.perf_counter() - start
            state, _ = _timed(training, state, batch, args.warmup)
            results[(name, layout)] = dict(
                records=stats["n_train_records"], rows=n_rows, pairs=pairs, seq_len=seq_len, batch_size=b,
                responses_per_row=per_row if layout == "packed" else None,
                records_split=stats.get("n_train_records_split", 0), too_long=stats["n_train_too_long"],
                real_tokens_per_pair=stats["train_tokens_per_pair"],
                computed_tokens_per_pair=n_rows * seq_len * sequences / pairs, pairs_per_step=pairs_in_batch,
                compile_s=compile_s, step_ms_rounds=[])
            runs.append((name, layout, training, state, batch))
    for _ in range(args.rounds):  # the layouts take turns, so a machine that changes speed shifts them alike
        for i, (name, layout, training, state, batch) in enumerate(runs):
            state, times = _timed(training, state, batch, args.steps)
            runs[i] = (name, layout, training, state, batch)
            results[(name, layout)]["step_ms_rounds"].append(float(np.median(times)) * 1e3)
    for r in results.values():
        r["step_ms"] = float(np.median(r["step_ms_rounds"]))
        r["pairs_per_s"] = r["pairs_per_step"] / r["step_ms"] * 1e3
    summary = {name: {layout: results[(name, layout)] for layout in layouts} for name in data_sets}
    for by_layout in summary.values():
        by_layout["packed_vs_pairs"] = dict(
            real_tokens_per_pair=by_layout["packed"]["real_tokens_per_pair"] / by_layout["pairs"]["real_tokens_per_pair"],
            computed_tokens_per_pair=(by_layout["packed"]["computed_tokens_per_pair"]
                                      / by_layout["pairs"]["computed_tokens_per_pair"]),
            pairs_per_s=by_layout["packed"]["pairs_per_s"] / by_layout["pairs"]["pairs_per_s"])
    out = dict(config=args.config, overrides=overrides, records=args.records, k=args.k, steps=args.steps,
               rounds=args.rounds, data=summary, load_avg_1m=os.getloadavg()[0], **run_facts(jax.devices()))
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
