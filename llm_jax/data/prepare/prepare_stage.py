r"""The data-preparation command: raw files in, cleaned and tokenized shards and a report out.

    llm-jax prepare --config configs/prepare.py:default --workdir runs/data
    llm-jax prepare --config configs/prepare.py:default --workdir runs/data --config.input.spec='raw/*.jsonl.gz' \
        --config.processes=8 --config.output.tokenizer=runs/tok/tokenizer.model

Every input file is one shard (llm_jax/data/prepare/inputs.py: text, jsonl or parquet, gzip or zstd). A shard goes
through three phases, and the steps of `config.steps` (llm_jax/data/prepare/steps.py) are split between them:

    1 filter   per shard, in `processes` worker processes: read the documents, run the per-document steps in order
               (privacy, langid, heuristics, quality_classifier, toxicity_classifier, blocklist), keep the
               survivors with their MinHash signatures (work/shard-NNNNN/)
    2 dedup    one pass over the shards in file order: exact_dedup and minhash_dedup add each document to an
               incremental index and drop those that repeat an earlier one (work/dedup.host-I-of-N/)
    3 write    per shard, in worker processes: the kept documents as clean/shard-NNNNN.jsonl (and .parquet), and
               tokenized as tokens/shard-NNNNN.{tokens,offsets}.npy when output.tokenizer names a sentencepiece
               model (llm_jax/data/prepare/shards.py); done/shard-NNNNN.json marks the shard written

then report.json and report.md (llm_jax/data/prepare/report.py): documents, characters and (with a tokenizer)
tokens in and out of every step, the first `report.examples` documents each step dropped with the reason, a
histogram of every score, and the input errors. The signatures are computed in parallel and the decisions taken in
file order, so every output is the same whatever `processes` is, and the same on every run of the same input and
config.

Resuming: phase 1 writes a shard's directory under a temporary name and renames it when complete; phase 2 does the
same with its whole directory; phase 3 writes every file under a temporary name and the shard's done marker last. A
rerun skips what is complete and redoes the rest; leftovers of an interrupted shard are removed or overwritten.
`<workdir>/prepare.json` records the config and the input files (sizes, modification times); a rerun with other
settings or changed inputs stops with an error instead of mixing two preparations.

Hosts: host I of N (`host_index`, `host_count`; `host_count=0` asks jax.process_index() and process_count()) takes
the files whose index in the whole list is I modulo N, writes its shards under their global names into the same
workdir (a filesystem every host sees), and its report as report.host-I-of-N.{json,md}. With `dedup_scope="run"`
(the default) deduplication covers every file of the run: after phase 1 each host waits, up to `dedup_wait_seconds`,
until every host's shards are filtered, then runs the same ordered pass over all of them and keeps its own files'
decisions, so the union of the hosts' outputs is exactly what one host would write. `dedup_scope="host"` dedups each
host's files alone and waits for no one.

Bad input (inputs.py, read by llm_jax/data/sources.py): with `on_error="stop"` the first unreadable file (corrupt
or truncated gzip or zstd, broken parquet) or broken record stops the command with one DataError naming its file and
line, and every shard already complete stays on disk; with `"skip"` the record (or the rest of the file) is skipped,
counted and listed in the report.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import multiprocessing
import os
import shutil
import sys
import time

import numpy as np

from llm_jax.config_lib import ConfigError
from llm_jax.data.prepare import dedup, inputs, report, shards
from llm_jax.data.prepare.steps import Outcome, StepPlan, plan_steps
from llm_jax.data import sources
from llm_jax.data.sources import DataError
from llm_jax.data.prepared import CLEAN, DONE, STAGE_FILE, TOKENS, shard_name
from llm_jax.files import write_json_atomic, write_text_atomic

WORK = "work"
SIGNATURE_CHUNK_DOCS = 1024
# Settings that change how the work is spread, not what it produces: a rerun may change them.
NOT_IN_IDENTITY = ("processes", "host_index", "dedup_wait_seconds")
DEDUP_SCOPES = ("run", "host")
WAIT_POLL_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a worker needs, as plain picklable values."""
    workdir: str
    files: tuple[inputs.InputFile, ...]     # this host's shards, in file order
    dedup_files: tuple[inputs.InputFile, ...]   # the shards whose documents this host's dedup pass sees, in order
    dedup_wait_seconds: float
    steps: StepPlan
    on_error: str
    processes: int
    host_index: int
    host_count: int
    tokenizer: str
    jsonl: bool
    parquet: bool
    examples: int
    example_chars: int
    bins: int

    @property
    def host_tag(self) -> str:
        return f"host-{self.host_index}-of-{self.host_count}"

    def owns(self, file: inputs.InputFile) -> bool:
        return _host_of(file, self.host_count) == self.host_index

    def host_file(self, stem: str, ext: str) -> str:
        """`<stem>.<ext>`, or `<stem>.host-I-of-N.<ext>` when several hosts write into the workdir."""
        return f"{stem}.{ext}" if self.host_count == 1 else f"{stem}.{self.host_tag}.{ext}"


def _host_of(file: inputs.InputFile, host_count: int) -> int:
    """The host that filters and writes a file: every host_count-th file, by its index in the whole list."""
    return file.index % host_count


def _hosts(config) -> tuple[int, int]:
    if config.host_count == 0:
        import jax  # the multi-host job's own numbering; set host_count to avoid starting JAX here
        return jax.process_index(), jax.process_count()
    if config.host_count < 0 or not 0 <= config.host_index < config.host_count:
        raise ConfigError(f"config.host_index={config.host_index} is not in [0, host_count={config.host_count})")
    return config.host_index, config.host_count


def _int_setting(config, dotted: str, minimum: int) -> int:
    node = config
    for name in dotted.split("."):
        node = node[name]
    if not isinstance(node, int) or isinstance(node, bool) or node < minimum:
        raise ConfigError(f"config.{dotted} must be an int >= {minimum}, got {node!r}")
    return node


def make_plan(config, workdir: str) -> Plan:
    """Checks the config (ConfigError) and lists the inputs (DataError when a file or glob names nothing)."""
    steps = plan_steps(config)
    if config.input.format not in sources.FORMATS:
        raise ConfigError(f"config.input.format must be one of {sources.FORMATS}, got {config.input.format!r}")
    if config.on_error not in inputs.ON_ERROR:
        raise ConfigError(f"config.on_error must be one of {inputs.ON_ERROR}, got {config.on_error!r}")
    processes = _int_setting(config, "processes", 1)
    examples = _int_setting(config, "report.examples", 0)
    example_chars = _int_setting(config, "report.example_chars", 1)
    bins = _int_setting(config, "report.bins", 1)
    tokenizer = config.output.tokenizer
    if tokenizer and not os.path.isfile(tokenizer):
        raise ConfigError(f"config.output.tokenizer {tokenizer!r} does not exist")
    if not config.output.jsonl and not config.output.parquet and not tokenizer:
        raise ConfigError("config.output writes nothing: set output.jsonl, output.parquet or output.tokenizer")
    if config.dedup_scope not in DEDUP_SCOPES:
        raise ConfigError(f"config.dedup_scope must be one of {DEDUP_SCOPES}, got {config.dedup_scope!r}")
    wait = config.dedup_wait_seconds
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
        raise ConfigError(f"config.dedup_wait_seconds must be a number >= 0, got {wait!r}")
    host_index, host_count = _hosts(config)
    files = inputs.list_input_files(config.input.spec, config.input.format, config.input.text_key)
    seen = set()
    for f in files:
        if f.path in seen:   # its documents would be read, and named, twice
            raise ConfigError(f"config.input.spec={config.input.spec!r} names {f.path} twice")
        seen.add(f.path)
    mine = tuple(f for f in files if _host_of(f, host_count) == host_index)
    dedup_files = tuple(files) if config.dedup_scope == "run" else mine
    return Plan(os.path.abspath(workdir), mine, dedup_files, float(wait), steps, config.on_error, processes,
                host_index, host_count, tokenizer, bool(config.output.jsonl), bool(config.output.parquet), examples,
                example_chars, bins)


def _identity(config, plan: Plan) -> dict:
    settings = {k: v for k, v in config.to_dict().items() if k not in NOT_IN_IDENTITY}
    # As resolved: which host writes which shard (and with dedup_scope="host", which files share a pass) depends on it.
    settings["host_count"] = plan.host_count
    for name, sha256 in plan.steps.model_sha256.items():   # a classifier step's output depends on its model's bytes
        settings[name] = dict(settings[name], model_sha256=sha256)
    every_file = inputs.list_input_files(config.input.spec, config.input.format, config.input.text_key)
    files = [[f.path, os.stat(f.path).st_size, os.stat(f.path).st_mtime_ns] for f in every_file]
    tokenizer = None
    if plan.tokenizer:
        tokenizer = _load_tokenizer(plan.tokenizer).sha256
    return json.loads(json.dumps(dict(config=settings, inputs=files, tokenizer_sha256=tokenizer), default=str))


def _check_workdir(config, plan: Plan) -> None:
    """Records what this workdir prepares, or stops if it already holds the preparation of something else."""
    path = os.path.join(plan.workdir, STAGE_FILE)
    identity = _identity(config, plan)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        what = {"config": "config", "inputs": "input files (paths, sizes, modification times)",
                "tokenizer_sha256": "tokenizer"}
        for key, name in what.items():
            if recorded.get(key) != identity[key]:
                detail = _first_difference(recorded.get(key), identity[key]) if key == "config" else ""
                raise ConfigError(f"{path}: this workdir was prepared with other {name}{detail}; use a new "
                                  "--workdir (or delete it to start over)")
        return
    write_json_atomic(path, identity)


def _first_difference(before, now, prefix: str = "") -> str:
    """`" (field: before → now)"` for the first field that differs between two config dicts."""
    if isinstance(before, dict) and isinstance(now, dict):
        for key in list(before) + [k for k in now if k not in before]:
            if before.get(key) != now.get(key):
                return _first_difference(before.get(key), now.get(key), f"{prefix}{key}.")
        return ""
    return f" ({prefix.rstrip('.')}: {before!r} then, {now!r} now)"


@functools.lru_cache(maxsize=2)
def _load_tokenizer(path: str):
    from llm_jax.data.tokenizer import Tokenizer
    return Tokenizer.load(path)


def _shard_dir(plan: Plan, file: inputs.InputFile) -> str:
    return os.path.join(plan.workdir, WORK, shard_name(file.index))


def _dedup_dir(plan: Plan) -> str:
    return os.path.join(plan.workdir, WORK, f"dedup.{plan.host_tag}")


def _remove_leftovers(plan: Plan) -> None:
    """Temporaries of this host's interrupted shards (another host's are not ours to touch)."""
    patterns = [f"{_dedup_dir(plan)}.tmp.*"]
    for file in plan.files:
        name = shard_name(file.index)
        patterns += [f"{_shard_dir(plan, file)}.tmp.*", os.path.join(plan.workdir, CLEAN, f"{name}.*.tmp.*"),
                     os.path.join(plan.workdir, TOKENS, f"{name}.*.tmp.*")]
    for pattern in patterns:
        for path in glob.glob(pattern):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _read_docs(directory: str) -> tuple[list[str], list[str], list[int]]:
    """(wheres, texts, token counts) of the documents phase 1 kept in a shard."""
    wheres, texts, tokens = [], [], []
    with open(os.path.join(directory, "docs.jsonl"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            wheres.append(record["where"])
            texts.append(record["text"])
            tokens.append(record["tokens"])
    return wheres, texts, tokens


# ------------------------------------------------------------------------------------------------ 1: filter

def filter_shard(plan: Plan, file: inputs.InputFile) -> str:
    """Phase 1 of one shard (module docstring); returns its directory."""
    out = _shard_dir(plan, file)
    if os.path.isdir(out):
        return out
    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        _filter_into(plan, file, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # a stopped shard leaves nothing; a killed one, a temporary
        raise
    os.rename(tmp, out)   # the shard is complete once its directory has its final name
    return out


def _signatures(pending: list, kept_hashes: list, signatures: list, minhash: dedup.MinHashConfig) -> None:
    """Signs a chunk of documents in one numpy pass and empties `pending`."""
    signatures.append(dedup.minhash_signatures(pending, minhash))
    if minhash.exact_jaccard:
        kept_hashes.extend(pending)
    pending.clear()


def _filter_into(plan: Plan, file: inputs.InputFile, tmp: str) -> None:
    document_steps = plan.steps.document_steps()
    stats = report.ShardStats(plan.steps.steps, plan.examples, plan.example_chars)
    minhash = plan.steps.minhash
    pending, kept_hashes, signatures = [], [], []   # shingle hashes are kept only for exact_jaccard
    errors: list[DataError] = []
    tokenizer = _load_tokenizer(plan.tokenizer) if plan.tokenizer else None

    def count_tokens(text: str) -> int:   # as a token shard holds the document: [bos] ids [eos]
        return len(tokenizer.encode(text)) + 2 if tokenizer else 0

    with open(os.path.join(tmp, "docs.jsonl"), "w", encoding="utf-8") as docs:
        for where, text in inputs.iter_input_documents(file, plan.on_error, errors):
            n_tokens = count_tokens(text)
            stats.docs_in += 1
            stats.chars_in += len(text)
            stats.tokens_in += n_tokens
            for name, apply in document_steps:
                outcome = apply(text)
                # Only a step that rewrites the text (privacy's scrubbing) changes its token count.
                n_out = n_tokens if not outcome.keep or outcome.text == text else count_tokens(outcome.text)
                stats.record(name, where, text, outcome, n_tokens, n_out)
                if not outcome.keep:
                    break
                text, n_tokens = outcome.text, n_out
            else:
                docs.write(json.dumps({"where": where, "text": text, "tokens": n_tokens}, ensure_ascii=False) + "\n")
                if minhash:
                    pending.append(dedup.shingle_hashes(text, minhash.shingle_size))
                    if len(pending) == SIGNATURE_CHUNK_DOCS:
                        _signatures(pending, kept_hashes, signatures, minhash)
    if minhash:
        _signatures(pending, kept_hashes, signatures, minhash)
        np.save(os.path.join(tmp, "signatures.npy"), np.concatenate(signatures))
        if minhash.exact_jaccard:
            np.savez(os.path.join(tmp, "shingles.npz"), counts=np.array([len(h) for h in kept_hashes], np.int64),
                     hashes=np.concatenate(kept_hashes or [np.zeros(0, np.uint64)]))
    stats.errors = [inputs.error_record(e) for e in errors]
    with open(os.path.join(tmp, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats.to_json(), f, indent=1)
    np.savez(os.path.join(tmp, "scores.npz"), **stats.score_arrays())


# ------------------------------------------------------------------------------------------------ 2: dedup

def _shingle_sets(directory: str) -> list[np.ndarray] | None:
    path = os.path.join(directory, "shingles.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as saved:
        ends = np.cumsum(saved["counts"])
        return [saved["hashes"][end - n:end] for end, n in zip(ends, saved["counts"])]


def _dedup_outcome(name: str, text: str, result: dedup.DedupResult) -> Outcome:
    if result.keep:
        return Outcome(text, True, scores={"similarity": result.similarity})
    if name == "exact_dedup":
        reason = f"exact duplicate of {result.duplicate_of}"
    elif result.matched_id == result.duplicate_of:
        reason = f"near duplicate of {result.duplicate_of} (similarity {result.similarity:.3f})"
    else:
        reason = (f"near duplicate of {result.duplicate_of} (similarity {result.similarity:.3f} to "
                  f"{result.matched_id}, dropped as a copy of it)")
    return Outcome(text, False, reason, {"similarity": result.similarity}, name)


def wait_for_filtered(plan: Plan) -> None:
    """Returns once phase 1 of every shard the dedup pass reads is complete, whichever host filters it; raises
    DataError naming the missing shards and their hosts after `dedup_wait_seconds`."""
    deadline = time.monotonic() + plan.dedup_wait_seconds
    waited = False
    while True:
        missing = [f for f in plan.dedup_files if not os.path.isdir(_shard_dir(plan, f))]
        if not missing:
            return
        if not waited:
            _log(f"waiting for {len(missing)} shards of the other hosts (dedup across the run)")
            waited = True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            named = ", ".join(f"{shard_name(f.index)} ({f.path}, host {_host_of(f, plan.host_count)})"
                              for f in missing[:5])
            raise sources.DataError(
                f"deduplication across the run waited {plan.dedup_wait_seconds:g} s for other hosts to filter "
                f"{len(missing)} shards: {named}{' ...' if len(missing) > 5 else ''}; start the other hosts (or "
                "rerun with a longer dedup_wait_seconds), or set dedup_scope=host")
        time.sleep(min(WAIT_POLL_SECONDS, remaining))


def dedup_pass(plan: Plan) -> str:
    """Phase 2 over `plan.dedup_files` in file order, recording this host's files' decisions; returns its
    directory. Another host's documents only enter the indexes, so every host takes the same decisions."""
    out = _dedup_dir(plan)
    if os.path.isdir(out):
        return out
    tmp = f"{out}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = plan.steps.dedup_step_names
    exact, near = dedup.ExactIndex(), dedup.MinHashIndex(plan.steps.minhash or dedup.MinHashConfig())
    # step -> kept document -> the documents of this host dropped as its copies, in stream order
    clusters: dict[str, dict[str, list[dict]]] = {name: {} for name in names}
    for file in plan.dedup_files:
        directory = _shard_dir(plan, file)
        wheres, texts, n_tokens = _read_docs(directory)
        signatures = np.load(os.path.join(directory, "signatures.npy")) if plan.steps.minhash else None
        shingle_sets = _shingle_sets(directory)
        mine = plan.owns(file)
        stats = report.ShardStats(names, plan.examples, plan.example_chars)
        keep = np.ones(len(texts), bool)
        for i, (where, text) in enumerate(zip(wheres, texts)):
            for name in names:
                if name == "exact_dedup":
                    result = exact.add(where, text)
                else:
                    result = near.add_signature(where, signatures[i], shingle_sets[i] if shingle_sets else None)
                outcome = _dedup_outcome(name, text, result)
                if mine:
                    stats.record(name, where, text, outcome, n_tokens[i], n_tokens[i])
                if not outcome.keep:
                    keep[i] = False
                    if mine:
                        clusters[name].setdefault(result.duplicate_of, []).append(
                            dict(where=where, matched=result.matched_id, similarity=round(result.similarity, 4)))
                    break
        if not mine:
            continue
        prefix = os.path.join(tmp, shard_name(file.index))
        np.save(f"{prefix}.keep.npy", keep)
        with open(f"{prefix}.stats.json", "w", encoding="utf-8") as f:
            json.dump(stats.to_json(), f, indent=1)
        np.savez(f"{prefix}.scores.npz", **stats.score_arrays())
    with open(os.path.join(tmp, "clusters.json"), "w", encoding="utf-8") as f:
        json.dump({name: [dict(kept=kept, removed=removed) for kept, removed in by_kept.items()]
                   for name, by_kept in clusters.items()}, f)
    os.rename(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------ 3: write

def _marker(plan: Plan, file: inputs.InputFile) -> str:
    return os.path.join(plan.workdir, DONE, f"{shard_name(file.index)}.json")


def write_shard(plan: Plan, file: inputs.InputFile) -> dict:
    """Phase 3 of one shard; returns (and marks the shard done with) its output counts."""
    name = shard_name(file.index)
    marker = _marker(plan, file)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            return json.load(f)
    wheres, texts, _ = _read_docs(_shard_dir(plan, file))
    if plan.steps.dedup_step_names:
        keep = np.load(os.path.join(_dedup_dir(plan), f"{name}.keep.npy"))
        wheres = [w for w, k in zip(wheres, keep) if k]
        texts = [t for t, k in zip(texts, keep) if k]
    for sub in (CLEAN, DONE) + ((TOKENS,) if plan.tokenizer else ()):
        os.makedirs(os.path.join(plan.workdir, sub), exist_ok=True)
    if plan.jsonl:
        shards.write_jsonl(os.path.join(plan.workdir, CLEAN, f"{name}.jsonl"), texts, wheres)
    if plan.parquet:
        shards.write_parquet(os.path.join(plan.workdir, CLEAN, f"{name}.parquet"), texts, wheres)
    n_tokens = None
    if plan.tokenizer:
        tokens, offsets = shards.tokenize(texts, _load_tokenizer(plan.tokenizer))
        shards.write_token_shard(os.path.join(plan.workdir, TOKENS, name), tokens, offsets)
        n_tokens = int(len(tokens))
    result = dict(shard=name, input=file.path, docs=len(texts), chars=sum(map(len, texts)), tokens=n_tokens)
    write_json_atomic(marker, result)   # last: the shard counts as written only when all its files are
    return result


# ------------------------------------------------------------------------------------------------ all

def _log(text: str) -> None:
    print(f"prepare: {text}", file=sys.stderr, flush=True)


def _map(plan: Plan, function, files) -> list:
    """`function(plan, file)` for each file, in order: in this process, or in `processes` spawned workers (spawn,
    not fork: the parent may have started JAX's threads, which a forked child would inherit half-copied)."""
    files = list(files)
    if plan.processes == 1 or len(files) <= 1:
        return [function(plan, f) for f in files]
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(plan.processes, len(files))) as pool:
        return pool.starmap(function, [(plan, f) for f in files], chunksize=1)


def _load_stats(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _clusters(plan: Plan) -> dict[str, list[dict]]:
    """step -> [{"kept": where, "removed": [{"where", "matched", "similarity"}, ...]}] of this host's drops."""
    return _load_stats(os.path.join(_dedup_dir(plan), "clusters.json"))


def build_report(plan: Plan, written: list[dict], clusters: dict[str, list[dict]]) -> dict:
    """The merged report of this host's shards; `clusters` as `_clusters` gives them."""
    stats, score_files = [], []
    for file in plan.files:
        directory = _shard_dir(plan, file)
        shard_stats = _load_stats(os.path.join(directory, "stats.json"))
        score_files.append(os.path.join(directory, "scores.npz"))
        if plan.steps.dedup_step_names:
            prefix = os.path.join(_dedup_dir(plan), shard_name(file.index))
            shard_stats["steps"].update(_load_stats(f"{prefix}.stats.json")["steps"])
            score_files.append(f"{prefix}.scores.npz")
        stats.append(shard_stats)
    result = report.merge(plan.steps.steps, stats, score_files, plan.examples, plan.bins, bool(plan.tokenizer))
    result["inputs"]["files"] = len(plan.files)
    for step in result["steps"]:
        if step["step"] in clusters:
            step["clusters"] = report.cluster_summary(clusters[step["step"]], plan.examples)
    tokens = [w["tokens"] for w in written]
    result["output"] = dict(docs=sum(w["docs"] for w in written), chars=sum(w["chars"] for w in written),
                            tokens=sum(tokens) if plan.tokenizer else None,
                            token_dtype=(str(shards.token_dtype(_load_tokenizer(plan.tokenizer).vocab_size))
                                         if plan.tokenizer else None),
                            shards=written)
    return result


def run_prepare(config, workdir: str) -> dict:
    """Prepares every shard of this host not yet done (module docstring); returns a summary of the run, with the
    seconds of each phase (not in the report, which stays the same from run to run)."""
    start = time.perf_counter()
    phases: dict[str, float] = {}

    def lap(phase: str) -> None:
        phases[phase] = round(max(0.0, time.perf_counter() - start - sum(phases.values())), 3)

    plan = make_plan(config, workdir)
    os.makedirs(os.path.join(plan.workdir, WORK), exist_ok=True)
    _check_workdir(config, plan)
    _remove_leftovers(plan)
    todo = [f for f in plan.files if not os.path.isdir(_shard_dir(plan, f))]
    _log(f"{len(plan.files)} input files for {plan.host_tag}, {len(plan.files) - len(todo)} already filtered; steps "
         f"{', '.join(plan.steps.steps)}; processes={plan.processes}")
    lap("plan")
    _map(plan, filter_shard, todo)
    lap("filter")
    if plan.steps.dedup_step_names:
        if not os.path.isdir(_dedup_dir(plan)):   # a finished pass needs no one's shards again
            wait_for_filtered(plan)
        lap("wait")
        _log(f"[{time.perf_counter() - start:7.1f} s] deduplicating {len(plan.dedup_files)} shards in file order")
        dedup_pass(plan)
        lap("dedup")
    unwritten = [f for f in plan.files if not os.path.exists(_marker(plan, f))]
    _log(f"[{time.perf_counter() - start:7.1f} s] writing {len(unwritten)} shards")
    _map(plan, write_shard, unwritten)
    written = [write_shard(plan, f) for f in plan.files]   # every shard is done now: this reads the markers
    lap("write")
    clusters = _clusters(plan) if plan.steps.dedup_step_names else {}
    result = build_report(plan, written, clusters)
    write_json_atomic(os.path.join(plan.workdir, plan.host_file("report", "json")), result)
    write_text_atomic(os.path.join(plan.workdir, plan.host_file("report", "md")), report.to_markdown(result))
    if clusters:
        write_text_atomic(os.path.join(plan.workdir, plan.host_file("clusters", "jsonl")),
                          "".join(json.dumps(dict(step=step, **cluster), ensure_ascii=False) + "\n"
                                  for step, listed in clusters.items() for cluster in listed))
    lap("report")
    output = result["output"]
    _log(f"[{time.perf_counter() - start:7.1f} s] done: {result['inputs']['docs']:,} documents in, "
         f"{output['docs']:,} out, {result['inputs']['errors']} input errors")
    return dict(workdir=plan.workdir, report=os.path.join(plan.workdir, plan.host_file("report", "md")),
                files=len(plan.files), filtered_now=len(todo), docs_in=result["inputs"]["docs"],
                docs_out=output["docs"], tokens=output["tokens"], input_errors=result["inputs"]["errors"],
                seconds=round(time.perf_counter() - start, 2), phase_seconds=phases)
