"""Where the answers of `llm-jax generate` to arithmetic-task prompts go wrong: accuracy by the number of carries
and by the operands' digits, and for responses that write the steps, whether the columns or the answer
after them failed.

    python experiments/arithmetic/analyze.py runs/arith_steps/generations/prompts_eval.jsonl [more.jsonl ...]
    python experiments/arithmetic/analyze.py --samples s0.jsonl s1.jsonl ...   # k sampled answers to the same prompts

With --samples the files are k answers to the same prompts (generate with k seeds): the mean accuracy, how many
prompts have at least one right answer (pass@k), all k right, and a mix of right and wrong, the prompts on which a
group-relative RL estimator (GRPO, RLOO) gets a signal.
"""
import argparse
import collections
import json

from llm_jax.data import arithmetic_task as at
from llm_jax.eval.judges import last_number


def analyze(path: str) -> dict:
    by_carries, by_digits = collections.defaultdict(list), collections.defaultdict(list)
    kinds = collections.Counter()
    for line in open(path, encoding="utf-8"):
        row = json.loads(line)
        a, b = at.parse_prompt(row["prompt"])
        right = last_number(row["response"]) == a + b
        by_carries[sum(total >= 10 for _, total in at.columns(a, b))].append(right)
        by_digits[f"{len(str(a))}+{len(str(b))}"].append(right)
        steps, so, _ = row["response"].rpartition(", so ")
        if not so:
            kinds["right" if right else "no steps, wrong"] += 1
            continue
        gold_steps = at.demonstration(row["prompt"]).rpartition(", so ")[0]
        kinds[("right" if right else "wrong") + (" after right steps" if steps == gold_steps else
                                                  " after wrong steps")] += 1
    n = sum(kinds.values())
    rate = lambda xs: f"{sum(xs) / len(xs):.3f} of {len(xs)}"
    return dict(file=path, n=n, accuracy=round(sum(v for k, v in kinds.items() if k.startswith("right")) / n, 4),
                outcomes=dict(sorted(kinds.items())),
                accuracy_by_carries={k: rate(v) for k, v in sorted(by_carries.items())},
                accuracy_by_operand_digits={k: rate(v) for k, v in sorted(by_digits.items())})


def samples(paths: list[str]) -> dict:
    right = collections.defaultdict(list)
    for path in paths:
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            a, b = at.parse_prompt(row["prompt"])
            right[row["where"]].append(last_number(row["response"]) == a + b)
    k = {len(v) for v in right.values()}
    if k != {len(paths)}:
        raise ValueError(f"the files do not answer the same prompts once each (answers per prompt: {sorted(k)})")
    n = len(right)
    return dict(k=len(paths), prompts=n, accuracy=round(sum(map(sum, right.values())) / (n * len(paths)), 4),
                pass_at_k=round(sum(map(any, right.values())) / n, 4),
                all_right=round(sum(map(all, right.values())) / n, 4),
                mixed=round(sum(any(v) and not all(v) for v in right.values()) / n, 4))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="generate's output jsonl")
    parser.add_argument("--samples", action="store_true", help="the files are k answers to the same prompts")
    args = parser.parse_args()
    if args.samples:
        print(json.dumps(samples(args.files), indent=1))
        return
    for path in args.files:
        print(json.dumps(analyze(path), indent=1))


if __name__ == "__main__":
    main()
