#!/usr/bin/env bash
# Every accelerator figure in one run, under 10 minutes:
#
#     bash experiments/benchmarks/device_check.sh DIR
#
# On a machine with a GPU or TPU it installs the accelerator extra of setup.py (`.[gpu]` or `.[tpu]`), then runs,
# each in its own process under its own time limit (a global deadline caps them all):
#
#     step         limit  writes into DIR
#     install       90 s  logs/install.log only
#     machine       30 s  machine.json (GPU name, jax and plugin versions, device kind and memory, train plan)
#     tests        100 s  tests.json (+ tests.xml): the accelerator-only tests (pytest -k "on_the_device or cudnn")
#     attention     90 s  attention.json: attention.py, bf16, causal, head dim 128, seq 2k/4k/8k
#     train_125m    80 s  train_125m.json: train_throughput.py at configs/pretrain.py:125m, bf16
#     train_1b     110 s  train_1b.json: the same at :1b, on as many of its 16 layers as fit the device memory
#     generation    70 s  generation.json: generation.py at :125m, bf16 (KV cache against the full forward)
#
# then DIR/summary.json (each step's file, status ok / failed / timeout / skipped, seconds, exit code), printed.
# A step that fails or runs out of time leaves a JSON with its error (and any JSON lines it printed before, as
# `partial_results`) in place of its measurement, and the run goes on. Every step's output is in DIR/logs/.
# Exit status: 0 when every step is ok, 1 otherwise, 2 on a usage error.
#
# On a machine with neither (jax's default backend is cpu, no `nvidia-smi -L`, no /dev/accel*) it prints one line,
# "device_check: no GPU or TPU here (jax backend: cpu); nothing to measure", writes nothing (DIR is not created),
# and exits 0 at once: having no accelerator is not a failure, so CI can call it unconditionally.
#
# Knobs (environment): PYTHON (default python, else python3); DEVICE_CHECK_BUDGET_S (total, default 570);
# DEVICE_CHECK_INSTALL=0 (skip the pip step: an offline machine with jax for its device already installed);
# DEVICE_CHECK_BATCH_125M (rows per device, default 16 of 2048 tokens), DEVICE_CHECK_BATCH_1B (default 4 of 4096);
# DEVICE_CHECK_LAYERS_125M, DEVICE_CHECK_LAYERS_1B (default auto: by plan() below, a rough memory estimate, the
# batch is halved down to 8k tokens a device while the whole model would not fit, then layers are dropped; a
# number sets the layers and keeps the batch); DEVICE_CHECK_ATTENTION_ARGS; DEVICE_CHECK_TESTS_K (pytest -k).
set -euo pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
    echo "usage: $0 DIR   (writes one JSON per measurement into DIR; see the comment at the top)" >&2
    exit 2
fi
START_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
case $1 in /*) OUT=$1 ;; *) OUT=$PWD/$1 ;; esac  # DIR as the caller meant it, before the cd below
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
# The caller's platform choice (the test suite's conftest sets JAX_PLATFORMS=cpu) would hide the accelerator
# from every step; "" lets jax pick it, and tests/conftest.py keeps a value that is already set.
export JAX_PLATFORMS=""
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1  # a step killed at its time limit still leaves what it printed in its log
cd "$REPO"

# --- 1. Is there an accelerator? (before installing anything) ---------------------------------------------------
JAX_BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null | tail -n 1) || JAX_BACKEND=""
JAX_BACKEND=${JAX_BACKEND:-none}
case $JAX_BACKEND in
    gpu | tpu) ACCEL=$JAX_BACKEND ;;
    *)  # jax missing, or a CPU-only jaxlib on an accelerator machine: the extra below brings the device's jaxlib
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ACCEL=gpu
        elif compgen -G "/dev/accel*" >/dev/null; then ACCEL=tpu
        else
            echo "device_check: no GPU or TPU here (jax backend: $JAX_BACKEND); nothing to measure"
            exit 0
        fi ;;
esac
EXTRA=$ACCEL  # setup.py's extras are named "gpu" (jax[cuda13]) and "tpu" (jax[tpu])

mkdir -p "$OUT/logs"
DIR=$(cd "$OUT" && pwd)
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-570}
DEADLINE=$((SECONDS + BUDGET_S))
STEPS="$DIR/logs/steps.jsonl"
: >"$STEPS"
echo "device_check: $ACCEL (jax backend before install: $JAX_BACKEND); writing into $DIR; budget ${BUDGET_S}s"

# record NAME FILE STATUS RC SECONDS LIMIT LOG [NOTE]: one line of steps.jsonl; where FILE should hold the
# measurement but does not, it gets the step's error instead.
record() {
    "$PY" - "$@" <<'PY'
import json, os, sys
name, path, status, rc, seconds, limit, log = sys.argv[1:8]
note = sys.argv[8] if len(sys.argv) > 8 else ""
entry = dict(name=name, file=os.path.basename(path) if path else None, status=status,
             rc=int(rc) if rc else None, seconds=int(seconds), limit_s=int(limit), log=os.path.relpath(log, os.path.dirname(os.path.dirname(log))))
if note:
    entry["note"] = note
if path and not os.path.exists(path):
    text = open(log, errors="replace").read() if os.path.exists(log) else ""
    lines = text.splitlines()
    partial = []
    for line in lines:
        if line.startswith("{"):
            try:
                partial.append(json.loads(line))
            except ValueError:
                pass
    error = {"skipped": "no time left in the budget", "timeout": f"ran past its {limit} s limit"}.get(status)
    error = error or next((l for l in reversed(lines) if l.strip() and not l.startswith(" ")), f"exit status {rc}")
    with open(path, "w") as f:
        json.dump(dict(entry, error=error, log_tail=lines[-40:], partial_results=partial), f, indent=1)
with open(os.path.join(os.path.dirname(log), "steps.jsonl"), "a") as f:
    f.write(json.dumps(entry) + "\n")
PY
}

# run_step NAME LIMIT_S FILE CMD...: CMD under `timeout`, capped by the global deadline; the step is ok when CMD
# exits 0 and (if FILE is given) FILE exists.
run_step() {
    local name=$1 limit=$2 file=$3 left start rc=0 status
    shift 3
    local log="$DIR/logs/$name.log"
    if [[ -n $file ]]; then rm -f "$file"; fi  # a file left by an earlier run must not pass for this one's
    left=$((DEADLINE - SECONDS - 5))
    if ((left < limit)); then limit=$left; fi
    if ((limit < 10)); then
        echo "device_check: $name skipped (no time left)"
        record "$name" "$file" skipped "" 0 0 "$log" "${NOTE:-}"
        return 0
    fi
    echo "device_check: $name (at most ${limit}s)"
    start=$SECONDS
    timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1 || rc=$?
    if declare -F "post_$name" >/dev/null; then "post_$name" "$rc"; fi
    if ((rc == 124 || rc == 137)); then status=timeout
    elif ((rc != 0)) || [[ -n $file && ! -s $file ]]; then status=failed
    else status=ok; fi
    echo "device_check: $name $status in $((SECONDS - start))s"
    record "$name" "$file" "$status" "$rc" "$((SECONDS - start))" "$limit" "$log" "${NOTE:-}"
}

# --- 2. The accelerator extra, and pytest for the tests ---------------------------------------------------------
# --no-build-isolation: the editable install then needs no download of setuptools (device machines may be offline,
# with jax and its plugin preinstalled; where pip still fails, the steps run on what is there, via PYTHONPATH).
if [[ ${DEVICE_CHECK_INSTALL:-1} == 0 ]]; then
    record install "" skipped "" 0 0 "$DIR/logs/install.log" "DEVICE_CHECK_INSTALL=0"
    echo "device_check: install skipped (DEVICE_CHECK_INSTALL=0)"
else
    run_step install 90 "" bash -c '"$0" -m pip install --no-build-isolation -e ".[$1]" &&
        { "$0" -c "import pytest" 2>/dev/null || "$0" -m pip install pytest; }' "$PY" "$EXTRA"
fi

# --- 3. Machine facts, and how much of each train shape fits ----------------------------------------------------
run_step machine 30 "$DIR/machine.json" "$PY" - "$DIR/machine.json" "$ACCEL" \
    "${DEVICE_CHECK_LAYERS_125M:-auto}" "${DEVICE_CHECK_BATCH_125M:-16}" \
    "${DEVICE_CHECK_LAYERS_1B:-auto}" "${DEVICE_CHECK_BATCH_1B:-4}" <<'PY'
import datetime, importlib.metadata as md, json, os, platform, subprocess, sys
import jax
out, accel, l125, b125, l1b, b1b = sys.argv[1:]
devices = jax.devices()
stats = devices[0].memory_stats() or {}
limit = stats.get("bytes_limit")
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None

from llm_jax import config_lib
from llm_jax.model.config import ModelConfig
from llm_jax.scaling.flops import param_counts

def plan(size, layers, per_device_batch):
    """Layers and rows per device of `size` to train: with `layers` given, those at `per_device_batch`; else the
    batch halved (down to 8k tokens a device) while the whole model would not fit 0.85 of the device's memory
    limit, then as many layers as fit. The estimate is rough: f32 params, gradients and two AdamW moments (16
    bytes a parameter, sharded when the config's mesh is FSDP over every device); bf16 activations kept by the
    remat policy, about 6·d_model + 2·kv_dim + 3·d_ff values a token a layer; f32 logits and their gradient plus
    a bf16 copy, 10 bytes a token and vocab entry."""
    config = config_lib.load(f"configs/pretrain.py:{size}", [])
    cfg = ModelConfig.from_config(config.model)
    counts = param_counts(cfg)
    shards = len(devices) if config.mesh.fsdp == -1 else 1
    t = config.data.seq_len

    def estimate(n, rows):
        tokens = rows * t
        per_layer = 16 * counts["per_layer"] / shards + tokens * 2 * (
            6 * cfg.d_model + 2 * cfg.n_kv_heads * cfg.head_dim + 3 * cfg.d_ff)
        return 16 * (counts["embedding"] + counts["lm_head"]) / shards + tokens * cfg.vocab_size * 10 + n * per_layer

    rows = int(per_device_batch)
    if layers != "auto":
        n, why = int(layers), "given"
    elif not limit:
        n, why = cfg.n_layers, "the device reports no memory limit: all layers"
    else:
        budget = 0.85 * limit
        while estimate(cfg.n_layers, rows) > budget and rows * t > 8192:
            rows //= 2
        n = cfg.n_layers
        while n > 1 and estimate(n, rows) > budget:
            n -= 1
        why = "all layers fit" if n == cfg.n_layers else f"a slice: {n} of {cfg.n_layers} layers fit"
        if rows != int(per_device_batch):
            why += f" at {rows} rows a device (of {per_device_batch} asked)"
    return dict(n_layers=n, full_n_layers=cfg.n_layers, batch_size=rows * len(devices), seq_len=t,
                estimate_gb=round(estimate(n, rows) / 1e9, 1),
                full_estimate_gb=round(estimate(cfg.n_layers, rows) / 1e9, 1),
                memory_limit_gb=round(limit / 1e9, 1) if limit else None, reason=why)

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

facts = dict(
    accelerator=accel, backend=jax.default_backend(), platform=devices[0].platform,
    device_kind=devices[0].device_kind, device_count=len(devices), process_count=jax.process_count(),
    memory_bytes_limit=limit, memory_stats=stats,
    nvidia_smi=run("nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader"),
    jax_version=jax.__version__,
    packages={d.metadata["Name"]: d.version for d in md.distributions()
              if d.metadata["Name"] and d.metadata["Name"].lower().startswith(("jax", "libtpu", "nvidia-cudnn"))},
    flax_version=version("flax"), python=platform.python_version(), cpu_count=os.cpu_count(),
    xla_flags=os.environ.get("XLA_FLAGS"),
    git_commit=run("git", "rev-parse", "HEAD"), git_dirty=bool(run("git", "status", "--porcelain", "--untracked-files=no")),
    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
)
facts["train_plan"] = {"125m": plan("125m", l125, b125), "1b": plan("1b", l1b, b1b)}
with open(out, "w") as f:
    json.dump(facts, f, indent=1)
print(json.dumps(facts, indent=1))
PY

# the plan as "layers batch" for each shape, and the backend jax found (the configs' full shapes, "none", where
# machine.json is missing)
PLAN=$("$PY" - "$DIR/machine.json" <<'PY' || true
import json, sys
try:
    m = json.load(open(sys.argv[1]))
    p = m["train_plan"]
    print(p["125m"]["n_layers"], p["125m"]["batch_size"], p["1b"]["n_layers"], p["1b"]["batch_size"], m["backend"])
except (OSError, KeyError, ValueError):
    print(12, 16, 16, 4, "none")
PY
)
read -r L125 B125 L1B B1B BACKEND_NOW <<<"$PLAN" || true
if [[ -z ${BACKEND_NOW:-} ]]; then L125=12 B125=16 L1B=16 B1B=4 BACKEND_NOW=none; fi
if [[ $BACKEND_NOW != gpu && $BACKEND_NOW != tpu ]]; then
    echo "device_check: after installing .[$EXTRA] jax's backend is '$BACKEND_NOW', not the $ACCEL; expect failures"
fi

# --- 4. The measurements ----------------------------------------------------------------------------------------
# tests.json from pytest's junit xml, whatever pytest's exit status (a step's post_NAME runs after its command)
post_tests() {
    "$PY" - "$DIR/tests.xml" "$DIR/tests.json" "$1" <<'PY' || true
import json, os, sys
import xml.etree.ElementTree as ET
xml, out, rc = sys.argv[1:]
if os.path.exists(xml):
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = node.get("message")
                break
        cases.append(dict(id=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                          seconds=float(case.get("time") or 0), message=message))
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    with open(out, "w") as f:
        json.dump(dict(pytest_rc=int(rc), **counts, tests=cases), f, indent=1)
PY
}
rm -f "$DIR/tests.xml"
NOTE="pytest -k '${DEVICE_CHECK_TESTS_K:-on_the_device or cudnn}' on $BACKEND_NOW"
run_step tests 100 "$DIR/tests.json" "$PY" -m pytest -o addopts="" -p no:cacheprovider tests/kernels -q -rs \
    -k "${DEVICE_CHECK_TESTS_K:-on_the_device or cudnn}" --junitxml "$DIR/tests.xml"

NOTE=""
# shellcheck disable=SC2086  # the attention arguments are a word list on purpose
run_step attention 90 "$DIR/attention.json" "$PY" experiments/benchmarks/attention.py \
    ${DEVICE_CHECK_ATTENTION_ARGS:---head-dims 128 --seq-lens 2048,4096,8192 --warmup 2 --iters 10} \
    --json "$DIR/attention.json"

NOTE="configs/pretrain.py:125m, $L125 layers, batch $B125"
run_step train_125m 80 "$DIR/train_125m.json" "$PY" experiments/benchmarks/train_throughput.py \
    --config configs/pretrain.py:125m --config.model.n_layers="$L125" --config.data.batch_size="$B125" \
    --steps 10 --warmup 2 --json "$DIR/train_125m.json"

NOTE="configs/pretrain.py:1b, $L1B layers, batch $B1B"
run_step train_1b 110 "$DIR/train_1b.json" "$PY" experiments/benchmarks/train_throughput.py \
    --config configs/pretrain.py:1b --config.model.n_layers="$L1B" --config.data.batch_size="$B1B" \
    --steps 10 --warmup 2 --json "$DIR/train_1b.json"

NOTE="configs/pretrain.py:125m"
run_step generation 70 "$DIR/generation.json" "$PY" experiments/benchmarks/generation.py \
    --config configs/pretrain.py:125m --json "$DIR/generation.json"

# --- 5. The summary ---------------------------------------------------------------------------------------------
"$PY" - "$DIR" "$ACCEL" "$START_DATE" "$SECONDS" "$BUDGET_S" <<'PY'
import json, os, sys
out, accel, started, wall, budget = sys.argv[1:]
steps = [json.loads(l) for l in open(os.path.join(out, "logs", "steps.jsonl"))]
summary = dict(accelerator=accel, started=started, wall_s=int(wall), budget_s=int(budget),
               machine="machine.json" if os.path.exists(os.path.join(out, "machine.json")) else None,
               ok=all(s["status"] == "ok" for s in steps), steps=steps)
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(json.dumps(summary, indent=1))
sys.exit(0 if summary["ok"] else 1)
PY
