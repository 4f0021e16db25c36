"""What data preparation did, per step: documents, characters and tokens in and out, what it dropped and why, its
scores.

Each input shard gathers a `ShardStats` (counts, the first examples of each step's drops, every score); the report
merges the shards in file order, so it is the same however many processes prepared them. Score histograms have
`bins` equal bins between the smallest and largest score of all shards; a score that never varies has one bin.

    report.json   {"inputs": ..., "steps": [...], "output": ...}; each step: docs_in, docs_out, dropped, chars_in,
                  chars_out, tokens_in, tokens_out, dropped_by (rule -> documents), counts (privacy: matches per
                  kind), examples (where, reason, text), histograms (score -> edges, counts, min, max, mean);
                  the dedup steps also clusters (count, removed, sizes, largest: see `cluster_summary`)
    clusters.jsonl  every cluster of every dedup step: {"step", "kept", "removed": [{"where", "matched",
                  "similarity"}]}, the kept document first seen, its copies in stream order

Tokens are counted with the output tokenizer, as the token shards hold a document ([bos] ids [eos]), and are None
when no tokenizer is named.
    report.md     the same as tables, each score's histogram drawn as one line of bars
"""
from __future__ import annotations

import array

import numpy as np

from llm_jax.data.prepare.steps import Outcome

MAX_LISTED_ERRORS = 100


COUNTS = ("docs_in", "docs_out", "chars_in", "chars_out", "tokens_in", "tokens_out")


def _step_record() -> dict:
    return dict(**{key: 0 for key in COUNTS}, dropped_by={}, counts={}, examples=[])


class ShardStats:
    """Counts of one shard: `record` each step's outcome for each document that reaches it."""

    def __init__(self, steps, max_examples: int, example_chars: int):
        self.steps = {name: _step_record() for name in steps}
        # array("d"): 8 bytes a score, where a list of floats would take 32
        self.scores: dict[str, dict[str, array.array]] = {name: {} for name in steps}
        self.docs_in = self.chars_in = self.tokens_in = 0
        self.errors: list[dict] = []
        self.max_examples, self.example_chars = max_examples, example_chars

    def record(self, step: str, where: str, text_in: str, outcome: Outcome, tokens_in: int = 0,
               tokens_out: int = 0) -> None:
        """`tokens_in` and `tokens_out`: the document's tokens before and after the step (0 when not counted)."""
        s = self.steps[step]
        s["docs_in"] += 1
        s["chars_in"] += len(text_in)
        s["tokens_in"] += tokens_in
        for kind, n in outcome.counts.items():
            s["counts"][kind] = s["counts"].get(kind, 0) + n
        for name, value in outcome.scores.items():
            self.scores[step].setdefault(name, array.array("d")).append(value)
        if outcome.keep:
            s["docs_out"] += 1
            s["chars_out"] += len(outcome.text)
            s["tokens_out"] += tokens_out
            return
        rule = outcome.rule or step
        s["dropped_by"][rule] = s["dropped_by"].get(rule, 0) + 1
        if len(s["examples"]) < self.max_examples:
            # The text after the step: privacy's drops are quoted scrubbed, never with the data they held.
            s["examples"].append(dict(where=where, reason=outcome.reason, text=outcome.text[:self.example_chars]))

    def to_json(self) -> dict:
        return dict(docs_in=self.docs_in, chars_in=self.chars_in, tokens_in=self.tokens_in, errors=self.errors,
                    steps=self.steps)

    def score_arrays(self) -> dict[str, np.ndarray]:
        """{"step/score": (n,) float64}, for an .npz file."""
        return {f"{step}/{name}": np.frombuffer(values, np.float64)
                for step, by_name in self.scores.items() for name, values in by_name.items()}


def score_histograms(score_files: list[str], bins: int) -> dict[str, dict]:
    """{"step/score": histogram} over the .npz files of `ShardStats.score_arrays`, read one at a time (twice: the
    range first, then the counts), so memory holds one shard's scores, never the corpus'."""
    ranges: dict[str, list] = {}   # key -> [n, min, max, sum], in the order the scores first appear
    for path in score_files:
        with np.load(path) as saved:
            for key in saved.files:
                values = saved[key]
                if len(values):
                    r = ranges.setdefault(key, [0, np.inf, -np.inf, 0.0])
                    r[0] += len(values)
                    r[1], r[2] = min(r[1], float(values.min())), max(r[2], float(values.max()))
                    r[3] += float(values.sum())
    counts = {key: np.zeros(bins if hi > lo else 1, np.int64) for key, (_, lo, hi, _) in ranges.items()}
    for path in score_files:
        with np.load(path) as saved:
            for key in saved.files:
                if key in ranges:
                    _, lo, hi, _ = ranges[key]
                    counts[key] += np.histogram(saved[key], bins=len(counts[key]),
                                                range=(lo, hi) if hi > lo else (lo, lo + 1))[0]
    result = {}
    for key, (n, lo, hi, total) in ranges.items():
        edges = np.linspace(lo, hi, bins + 1) if hi > lo else np.array([lo, lo + 1])
        result[key] = dict(n=n, min=lo, max=hi, mean=total / n, edges=[float(e) for e in edges],
                           counts=[int(c) for c in counts[key]])
    return result


def merge(steps, shard_stats: list[dict], score_files: list[str], max_examples: int, bins: int,
          count_tokens: bool) -> dict:
    """One report from the shards' `to_json`, in shard order, and the .npz files of their `score_arrays`; token
    counts are None unless `count_tokens`."""
    histograms = score_histograms(score_files, bins)
    merged = []
    for step in steps:
        total = _step_record()
        for stats in shard_stats:
            s = stats["steps"][step]
            for key in COUNTS:
                total[key] += s[key]
            for field in ("dropped_by", "counts"):
                for k, n in s[field].items():
                    total[field][k] = total[field].get(k, 0) + n
            total["examples"] += s["examples"][:max_examples - len(total["examples"])]
        total["histograms"] = {key.split("/", 1)[1]: h for key, h in histograms.items()
                               if key.split("/", 1)[0] == step}
        total["dropped"] = total["docs_in"] - total["docs_out"]
        if not count_tokens:
            total.update(tokens_in=None, tokens_out=None)
        merged.append(dict(step=step, **total))
    errors = [e for stats in shard_stats for e in stats["errors"]]
    inputs = dict(docs=sum(s["docs_in"] for s in shard_stats), chars=sum(s["chars_in"] for s in shard_stats),
                  tokens=sum(s["tokens_in"] for s in shard_stats) if count_tokens else None,
                  errors=len(errors), listed_errors=errors[:MAX_LISTED_ERRORS])
    return dict(inputs=inputs, steps=merged)


def cluster_summary(clusters: list[dict], max_listed: int) -> dict:
    """A dedup step's clusters (a kept document and the copies it removed): how many, how many documents removed,
    how many clusters of each size (the kept document included), and the largest `max_listed` (first seen first)."""
    sizes: dict[int, int] = {}
    for cluster in clusters:
        size = 1 + len(cluster["removed"])
        sizes[size] = sizes.get(size, 0) + 1
    largest = sorted(clusters, key=lambda c: -len(c["removed"]))[:max_listed]   # stable: ties in stream order
    return dict(count=len(clusters), removed=sum(len(c["removed"]) for c in clusters),
                sizes={str(k): sizes[k] for k in sorted(sizes)},
                largest=[dict(kept=c["kept"], size=1 + len(c["removed"]),
                              removed=[r["where"] for r in c["removed"][:5]]) for c in largest])


_LEVELS = " ▁▂▃▄▅▆▇█"


def _sparkline(counts: list[int]) -> str:
    """One character a bin, its height the bin's share of the fullest bin; blank only for an empty bin."""
    most = max(counts)
    return "".join(_LEVELS[0] if not c else _LEVELS[max(1, round(8 * c / most))] for c in counts)


def bins_of(shown: list[tuple[str, dict]]) -> int:
    return max(len(h["counts"]) for _, h in shown)


def to_markdown(report: dict) -> str:
    inputs, output = report["inputs"], report["output"]
    tokens = inputs.get("tokens") is not None
    lines = ["# Data preparation report", "",
             f"Input: {inputs['files']} files, {inputs['docs']:,} documents, {inputs['chars']:,} characters"
             + (f", {inputs['tokens']:,} tokens" if tokens else "") + f"; {inputs['errors']} records or files not "
             "read.",
             f"Output: {output['docs']:,} documents, {output['chars']:,} characters"
             + (f", {output['tokens']:,} tokens" if output.get("tokens") is not None else "") + ".", "",
             "| step | docs in | docs out | dropped | chars in | chars out |"
             + (" tokens in | tokens out |" if tokens else "") + " dropped by |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if tokens else "") + "---|"]
    for s in report["steps"]:
        by = ", ".join(f"{rule} {n:,}" for rule, n in sorted(s["dropped_by"].items(), key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"| {s['step']} | {s['docs_in']:,} | {s['docs_out']:,} | {s['dropped']:,} | {s['chars_in']:,} "
                     f"| {s['chars_out']:,} |" + (f" {s['tokens_in']:,} | {s['tokens_out']:,} |" if tokens else "")
                     + f" {by} |")
    if inputs["listed_errors"]:
        lines += ["", "## Input errors", ""]
        lines += [f"- `{e['where']}`: {e['message']}" for e in inputs["listed_errors"]]
        if inputs["errors"] > len(inputs["listed_errors"]):
            lines.append(f"- ... and {inputs['errors'] - len(inputs['listed_errors'])} more")
    for s in report["steps"]:
        lines += ["", f"## {s['step']}", ""]
        if s["counts"]:
            lines += ["Matches: " + ", ".join(f"{k} {n:,}" for k, n in sorted(s["counts"].items())), ""]
        if s.get("clusters"):
            c = s["clusters"]
            lines += [f"Clusters: {c['count']:,} removed {c['removed']:,} documents; by size (kept one included): "
                      + ", ".join(f"{size}: {n:,}" for size, n in c["sizes"].items()), ""]
            for cluster in c["largest"]:
                more = cluster["size"] - 1 - len(cluster["removed"])
                lines.append(f"- `{cluster['kept']}` kept, {cluster['size'] - 1} removed: "
                             + ", ".join(f"`{w}`" for w in cluster["removed"]) + (f" and {more} more" if more else ""))
            if c["largest"]:
                lines.append("")
        shown = [(name, h) for name, h in s["histograms"].items() if h["n"]]
        if shown:
            lines += [f"| score | documents | min | mean | max | histogram ({bins_of(shown)} bins, min to max) |",
                      "|---|---:|---:|---:|---:|---|"]
            lines += [f"| {name} | {h['n']:,} | {h['min']:.4g} | {h['mean']:.4g} | {h['max']:.4g} | "
                      f"`{_sparkline(h['counts'])}` |" for name, h in shown]
            lines.append("")
        if s["examples"]:
            lines += ["Dropped, first examples:", ""]
            for e in s["examples"]:
                text = " ".join(e["text"].split())
                lines.append(f"- `{e['where']}` ({e['reason']}): {text[:200]}")
    return "\n".join(lines) + "\n"
