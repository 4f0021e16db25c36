r"""Throughput of the lm-evaluation-harness adapter (llm_jax/eval/harness.py): loglikelihood requests per second
and generated tokens per second, through the adapter's own `loglikelihood` and `generate_until`, as lm-eval calls
them.

    python experiments/benchmarks/lm_eval_adapter.py [--shapes tiny,bench] [--requests 256] [--prompts 32] \
        [--new_tokens 64] [--batch_size 16] [--repeats 3] [--json out.json]

Per model shape of configs/pretrain.py (`tiny`, `bench`) the script writes a run directory without training: the
config (its chat template "hf"), random params (seed 0) as the run's checkpoint, and the Hugging Face tokenizer of
tests/hf/fixtures/llama (432 pieces; the model keeps the shape's own vocabulary, so the LM head costs what it
costs at that shape; ids past the tokenizer's decode to nothing). Requests are made of random words from a fixed
list (seed 0), so they tokenize to many lengths:

    loglikelihood  `--requests` (context, continuation) pairs: contexts of 4 to context/4 words (about 3 tokens a
                   word), continuations of 1 to 6 words (multiple-choice sized): rows of many lengths, in most
                   of the buckets
    generate_until `--prompts` prompts of 4 to (context − new_tokens)/3 words, greedy, `--new_tokens` new tokens
                   each, a stop string that never occurs (so each row runs to the end unless it emits an
                   end-of-sequence id)

Each is run once untimed (it compiles every bucket it needs: `compile_s` is that first pass), then `--repeats`
times; the figures are the median. `scored_tokens_per_s` counts the requests' real input tokens, and
`padding_share` is the share of the computed (rows × bucket) positions that were filler. On CPU the forward
FLOPs of the real tokens (scaling/flops.py `forward_flops_per_token` at the mean row length) are set against a
2048³ f32 matmul measured just before and after, as the other benchmarks here do (`mfu`). One JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import linen as nn

from llm_jax import config_lib
from llm_jax.data.hf_tokenizer import FILES, RUN_DIR
from llm_jax.eval.harness import LlmJaxLM
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer
from llm_jax.scaling.flops import forward_flops_per_token
from llm_jax.train import hardware, manifest
from llm_jax.train.checkpoint import checkpoint_dir

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import run_facts  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER = os.path.join(ROOT, "tests", "hf", "fixtures", "llama")
WORDS = ("the river runs fast in spring and slow in autumn a small fox lived at the edge of quiet forest every "
         "morning walked along bank looked fish listened birds counted stones on path one day heavy storm came "
         "from hills water rose over its banks").split()


def make_run(shape: str, workdir: str) -> str:
    """A run directory of configs/pretrain.py:<shape> with random params and the fixture's HF tokenizer."""
    config = config_lib.load(f"configs/pretrain.py:{shape}", ["data.chat_template=hf"])
    os.makedirs(os.path.join(workdir, RUN_DIR))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    for name in FILES:
        if os.path.isfile(os.path.join(TOKENIZER, name)):
            shutil.copy(os.path.join(TOKENIZER, name), os.path.join(workdir, RUN_DIR, name))
    model = Transformer(ModelConfig.from_config(config.model))
    params = nn.unbox(jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32)))(jax.random.key(0)))
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=ocp.CheckpointManagerOptions(create=True))
    manager.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    manager.wait_until_finished()
    manager.close()
    manifest.write(os.path.join(checkpoint_dir(workdir), "1"), 1)
    return workdir


def words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


class _Request:
    """What the adapter reads of an lm-eval Instance."""

    def __init__(self, *args):
        self.args = args


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    """(seconds of the first, compiling call, seconds of each of `repeats` calls after it)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, times


def bench_shape(shape: str, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lm = LlmJaxLM(make_run(shape, os.path.join(tmp, "run")), batch_size=args.batch_size)
        rng = np.random.default_rng(0)
        max_words = max(8, lm.context // 4)  # about 3 tokens a word: rows of ~12 tokens to ~3/4 of the context
        prompt_words = max(8, (lm.context - args.new_tokens) // 3)
        pairs = [_Request(words(rng, int(rng.integers(4, max_words))), " " + words(rng, int(rng.integers(1, 7))))
                 for _ in range(args.requests)]
        prompts = [_Request(words(rng, int(rng.integers(4, prompt_words))),
                            {"until": ["\u2603"], "max_gen_toks": args.new_tokens, "do_sample": False})
                   for _ in range(args.prompts)]

        tokens_before = dict(lm.tokens)
        compile_ll, ll_times = timed(lambda: lm.loglikelihood(pairs), args.repeats)
        passes = args.repeats + 1
        scored = (lm.tokens["scored_inputs"] - tokens_before["scored_inputs"]) // passes
        computed = (lm.tokens["computed_inputs"] - tokens_before["computed_inputs"]) // passes
        generated_before = lm.tokens["generated"]
        compile_gen, gen_times = timed(lambda: lm.generate_until(prompts), args.repeats)
        generated = (lm.tokens["generated"] - generated_before) // passes
        ll_s, gen_s = statistics.median(ll_times), statistics.median(gen_times)
        cfg = lm.run.model.cfg
        mean_len = scored / len(pairs)
        forward_flops = scored * forward_flops_per_token(cfg, max(1, round(mean_len)))
        return dict(
            shape=shape, n_layers=cfg.n_layers, d_model=cfg.d_model, vocab_size=cfg.vocab_size, context=lm.context,
            batch_rows=lm.rows, dtype=cfg.dtype,
            loglikelihood=dict(requests=len(pairs), requests_per_s=len(pairs) / ll_s, seconds=ll_s,
                               seconds_all=ll_times, compile_s=compile_ll, scored_tokens=scored,
                               scored_tokens_per_s=scored / ll_s, mean_row_tokens=mean_len,
                               padding_share=1 - scored / computed, model_tflops_per_s=forward_flops / ll_s / 1e12,
                               buckets=sorted({s[2] for s in lm.shapes if s[0] == "score"})),
            generate_until=dict(prompts=len(prompts), new_tokens=args.new_tokens, generated_tokens=generated,
                                tokens_per_s=generated / gen_s, seconds=gen_s, seconds_all=gen_times,
                                compile_s=compile_gen,
                                buckets=sorted({s[2] for s in lm.shapes if s[0] == "generate"})))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,bench", help="configs/pretrain.py sizes, comma-separated")
    parser.add_argument("--requests", type=int, default=256, help="loglikelihood requests per pass")
    parser.add_argument("--prompts", type=int, default=32, help="generate_until requests per pass")
    parser.add_argument("--new_tokens", type=int, default=64, help="max_gen_toks of each generation")
    parser.add_argument("--batch_size", type=int, default=16, help="the adapter's rows per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes after the compiling one")
    parser.add_argument("--json", help="also write the result to this path")
    args = parser.parse_args(argv)
    for name in ("requests", "prompts", "new_tokens", "batch_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    wall = time.perf_counter()
    devices = jax.devices()
    on_cpu = devices[0].platform == "cpu"
    matmul = [hardware.measure_matmul_flops("float32")] if on_cpu else []
    shapes = [bench_shape(shape, args) for shape in args.shapes.split(",")]
    if on_cpu:
        matmul.append(hardware.measure_matmul_flops("float32"))
        rate = statistics.median(matmul)
        for s in shapes:
            s["loglikelihood"]["mfu"] = s["loglikelihood"]["model_tflops_per_s"] * 1e12 / rate
    result = dict(benchmark="lm_eval_adapter", shapes=shapes, requests=args.requests, prompts=args.prompts,
                  new_tokens=args.new_tokens, batch_size=args.batch_size, repeats=args.repeats,
                  matmul_tflops_per_s=[m / 1e12 for m in matmul], load_avg_1m=os.getloadavg()[0],
                  **run_facts(devices), wall_s=time.perf_counter() - wall)
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
