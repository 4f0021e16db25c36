"""Throughput of `llm-jax prepare`'s full chain on a generated web-like corpus: documents/s and MB/s per core.

    python experiments/benchmarks/prepare_throughput.py --docs 20000 --files 8 --processes 1,2

The corpus: documents of the embedded default corpus (llm_jax/data/default_corpus.py) joined into web-page-sized
documents of 1 to 12 of them, with planted noise in fixed shares: exact copies of an earlier document (with other
case and spacing), near copies (every 40th word changed), an e-mail address or phone number, short fragments,
pages of repeated lines, paragraphs in another language (llm_jax/data/prepare/langid_text.txt) and a blocked
word. It is written as `--files` gzipped jsonl files, and a sentencepiece tokenizer is trained on a sample first
(neither is timed).

Timed: `run_prepare` of configs/prepare.py:default with every step (privacy, langid, heuristics,
quality_classifier, toxicity_classifier, blocklist, exact_dedup, minhash_dedup; the two classifiers trained first,
untimed, by configs/classifier.py's quality and toxicity presets), jsonl and token shards written, in a fresh
workdir, once per `--processes` value; the phases as run_prepare reports them. MB are the UTF-8 bytes of the
documents' text (uncompressed, before any step); per core divides by the worker processes. Then each document step
alone in this process on a sample (`--step-sample` documents, each step seeing every document), MinHash signing and
tokenization, so the chain's cost can be split by step. And, from the planted labels, the share of each kind of
document the chain dropped. One JSON line on stdout; the machine facts are in it.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import importlib.resources
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from llm_jax.config_lib import load
from llm_jax.data import default_corpus
from llm_jax.data.prepare.classifier_stage import run_classifier
from llm_jax.data.prepare import dedup, langid, shards
from llm_jax.data.prepare.steps import plan_steps
from llm_jax.data.prepare.prepare_stage import run_prepare
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer

BLOCKED = ("casino", "viagra")
CHAIN = ("privacy", "langid", "heuristics", "quality_classifier", "toxicity_classifier", "blocklist", "exact_dedup",
         "minhash_dedup")
# Shares of the generated documents (the rest are clean pages).
NOISE = dict(exact_copy=0.06, near_copy=0.04, pii=0.03, short=0.10, repeated_lines=0.03, other_language=0.02,
             blocked=0.01)


def _other_language_paragraphs() -> list[str]:
    shipped = importlib.resources.files("llm_jax.data.prepare").joinpath(langid.TRAINING_TEXT)
    texts = langid.read_training_text(shipped.read_text(encoding="utf-8"))
    return [p for lang, text in sorted(texts.items()) if lang != "en" for p in text.split("\n\n") if len(p) > 200]


def generate_corpus(n_docs: int, seed: int) -> tuple[list[str], list[str]]:
    """`n_docs` documents with the planted noise of NOISE, and each one's kind, in a fixed order for a given seed.
    Every page has default-corpus documents of its own (no page repeats another by chance), and a copy always
    comes after its original, as the files keep this order."""
    rng = np.random.default_rng(seed)
    kinds = list(NOISE) + ["clean"]
    drawn = [kinds[k] for k in rng.choice(len(kinds), p=list(NOISE.values()) + [1.0 - sum(NOISE.values())],
                                           size=n_docs)]
    drawn[0] = "clean"   # the copies need an original
    parts = [int(rng.integers(1, 13)) if k == "clean" else int(rng.integers(2, 8)) if k in ("pii", "blocked")
             else 1 if k == "short" else 0 for k in drawn]
    sentences_docs = iter(t for t, _ in default_corpus.generate_documents(sum(parts), seed=seed))
    foreign = _other_language_paragraphs()
    docs: list[str] = []
    for kind, n_parts in zip(drawn, parts):
        page = "\n\n".join(next(sentences_docs) for _ in range(n_parts))
        if kind == "exact_copy":
            doc = "  ".join(docs[rng.integers(len(docs))].upper().split(" "))
        elif kind == "near_copy":   # one word in a hundred changed: Jaccard of 5-word shingles about 0.9
            words = docs[rng.integers(len(docs))].split(" ")
            doc = " ".join("zzyzx" if i % 100 == 99 else w for i, w in enumerate(words))
        elif kind == "pii":
            doc = page + rng.choice(["\n\nWrite to jane.doe@example.com for details.",
                                     "\n\nCall 555-123-4567 after nine."])
        elif kind == "short":
            doc = page.split("\n")[0][:120]
        elif kind == "repeated_lines":
            doc = "\n".join(["Subscribe to our newsletter for the latest offers."] * int(rng.integers(20, 60)))
        elif kind == "other_language":
            doc = "\n\n".join(rng.choice(foreign, size=3))
        elif kind == "blocked":
            doc = page + f"\n\nThe {rng.choice(BLOCKED)} opens at nine."
        else:
            doc = page
        docs.append(doc)
    return docs, drawn


def write_files(docs: list[str], n_files: int, directory: str) -> tuple[str, list[str]]:
    """The spec of the files, and each document's `where` as prepare names it (path:line)."""
    os.makedirs(directory, exist_ok=True)
    wheres = []
    bounds = np.linspace(0, len(docs), n_files + 1).astype(int)   # contiguous blocks: file order is corpus order
    for i in range(n_files):
        path = os.path.join(directory, f"part-{i:03d}.jsonl.gz")
        with gzip.open(path, "wt", encoding="utf-8") as f:
            for line, doc in enumerate(docs[bounds[i]:bounds[i + 1]], 1):
                f.write(json.dumps({"text": doc}) + "\n")
                wheres.append(f"{path}:{line}")
    return os.path.join(directory, "part-*.jsonl.gz"), wheres


def planted_outcomes(workdir: str, wheres: list[str], planted: list[str]) -> dict:
    """Per planted kind: documents, and the share the chain dropped (all of a noise kind should go, clean pages
    stay unless Gopher's rules or the language filter have a reason)."""
    kept = {}
    for name in os.listdir(os.path.join(workdir, "clean")):
        if name.endswith(".jsonl"):
            with open(os.path.join(workdir, "clean", name), encoding="utf-8") as f:
                kept.update((r["where"], r["text"]) for r in map(json.loads, f))
    result = {}
    for kind in list(NOISE) + ["clean"]:
        of_kind = [w for w, k in zip(wheres, planted) if k == kind]
        dropped = sum(w not in kept for w in of_kind)
        result[kind] = dict(docs=len(of_kind), dropped=round(dropped / max(len(of_kind), 1), 4))
        if kind == "pii":   # scrubbed, not dropped, by the default preset: none may be left in a kept document
            result[kind]["kept_with_pii"] = sum(w in kept and ("@example.com" in kept[w] or "555-123" in kept[w])
                                                for w in of_kind)
    return result


def _rate(function, items) -> float:
    """Items per second of `function` over `items` (median of three passes)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for item in items:
            function(item)
        times.append(time.perf_counter() - start)
    return len(items) / statistics.median(times)


def step_rates(config, sample: list[str], tokenizer: Tokenizer) -> dict:
    """Each document step, MinHash signing and tokenization alone on `sample`: documents/s and MB/s."""
    mb = sum(len(t.encode()) for t in sample) / 1e6
    plan = plan_steps(config)
    rates = {name: _rate(lambda t, apply=apply: apply(t), sample) for name, apply in plan.document_steps()}
    minhash = plan.minhash

    def sign(text):
        dedup.minhash_signatures([dedup.shingle_hashes(text, minhash.shingle_size)], minhash)

    rates["minhash_signature"] = _rate(sign, sample)
    rates["tokenize"] = _rate(lambda t: shards.tokenize([t], tokenizer), sample)
    return {name: dict(docs_per_s=round(r), mb_per_s=round(r * mb / len(sample), 3)) for name, r in rates.items()}


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--processes", default="1,2", help="comma list of worker-process counts to time")
    parser.add_argument("--step-sample", type=int, default=2_000)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="", help="where the corpus and outputs go (default: a temporary dir)")
    args = parser.parse_args()
    root = args.workdir or tempfile.mkdtemp(prefix="prepare_bench_")
    start = time.perf_counter()
    docs, planted = generate_corpus(args.docs, args.seed)
    spec, wheres = write_files(docs, args.files, os.path.join(root, "raw"))
    mb = sum(len(d.encode()) for d in docs) / 1e6
    tokenizer_path = os.path.join(root, "tokenizer.model")
    train_tokenizer(docs[:2_000], tokenizer_path, vocab_size=args.vocab)
    print(f"corpus: {args.docs:,} documents, {mb:.1f} MB in {args.files} files, tokenizer ready after "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)

    overrides = [f"input.spec={spec}", f"output.tokenizer={tokenizer_path}", "host_count=1",
                 f"blocklist.words={BLOCKED!r}", f"steps={CHAIN!r}"]
    for kind in ("quality", "toxicity"):
        trained = run_classifier(load(f"configs/classifier.py:{kind}", []), os.path.join(root, f"{kind}_clf"))
        overrides.append(f"{kind}_classifier.model={trained['model']}")
    runs = []
    for processes in [int(p) for p in args.processes.split(",")]:
        workdir = os.path.join(root, f"out-p{processes}")
        shutil.rmtree(workdir, ignore_errors=True)
        config = load("configs/prepare.py:default", overrides + [f"processes={processes}"])
        summary = run_prepare(config, workdir)
        seconds = summary["seconds"]
        runs.append(dict(processes=processes, seconds=seconds, phase_seconds=summary["phase_seconds"],
                         docs_out=summary["docs_out"], tokens_out=summary["tokens"],
                         docs_per_s=round(args.docs / seconds), mb_per_s=round(mb / seconds, 3),
                         docs_per_s_per_core=round(args.docs / seconds / processes),
                         mb_per_s_per_core=round(mb / seconds / processes, 3)))
    config = load("configs/prepare.py:default", overrides)
    sample = docs[:args.step_sample]
    result = dict(docs=args.docs, mb=round(mb, 2), files=args.files, noise=NOISE, runs=runs,
                  planted=planted_outcomes(workdir, wheres, planted),
                  steps_alone=step_rates(config, sample, Tokenizer.load(tokenizer_path)),
                  step_sample=len(sample), cpu_count=os.cpu_count(), cpu=_cpu_model(),
                  load_average=os.getloadavg(), python=platform.python_version(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(json.dumps(result))
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
