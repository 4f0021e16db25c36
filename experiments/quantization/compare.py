r"""LoRA on a full-precision, an int8 and an NF4 base, from the same pretrained run: what quantizing the frozen
base costs in quality, and how far the quantized weights and logits are from the full ones.

    python experiments/quantization/compare.py --pretrain runs/pipeline/pretrain --workdir runs/quant_compare \
        [--seeds 0,1,2] [--steps 600] [--bases none,int8,nf4] [--hf-fixture tests/hf/fixtures/llama]

1. Quantization error on the pretrained model's own weights: for int8 and NF4 (blocks of 64, double-quantized
   scales), each projection of each layer: ‖W − deq(q(W))‖ / ‖W‖ (relative RMS error), and the pretrained
   model's next-token distribution on held-out text against the full model's (mean KL in nats per token, top-1
   agreement).
2. On an imported Hugging Face fixture checkpoint (`--hf-fixture`, a tiny random model in the format of the
   real family's): imported in full precision and with `model.base_quant=nf4`, the logits of both on the same
   tokens (max |Δ|, KL, top-1 agreement).
3. SFT with LoRA (rank 16 on all seven projections, α 32, the embedding trained too: `optim.also_train`, for
   the chat tokens the pretrained model never saw) on the embedded task from `--pretrain` with each
   base, `--seeds`: every run is `llm-jax train --config configs/sft.py:tiny` in `<workdir>/sft_<base>_s<seed>`
   (a finished run is read back; an interrupted one resumes), then the pipeline's gold-scored evaluation of
   greedy and sampled answers to the held-out prompts (`--eval-prompts`, llm_jax/pipeline.py `evaluate`).

Writes `<workdir>/results.json` and `<workdir>/results.md`.
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
# The chat tokens (<|user|>, <|end|>, ...) are new to the pretrained model: their embeddings train beside the
# adapters (optim.also_train), as PEFT's modules_to_save does. Without it LoRA alone stalls at a loss of about 5.4
# on the answers after 200 steps (2.8 with the embedding training), and no base scores above 0.02 gold.
LORA = ["model.lora_rank=16", "model.lora_alpha=32", "model.lora_targets=wq,wk,wv,wo,w_gate,w_up,w_down",
        "optim.also_train=embedding"]


def sft_run(pretrain: str, workdir: str, base: str, seed: int, steps: int, extra: list[str]) -> dict:
    run_dir = os.path.join(workdir, f"sft_{base}_s{seed}")
    overrides = [f"train.init_from={os.path.abspath(pretrain)}", f"seed={seed}", f"train.steps={steps}",
                 f"train.eval_every={steps}", f"train.checkpoint_every={steps}", f"model.base_quant={base}",
                 *LORA, *extra]
    if not any(m.get("step") == steps and "eval_loss" in m for m in read_metrics(run_dir)):
        command = [sys.executable, "-m", "llm_jax.cli", "train", "--config",
                   os.path.join(REPO, "configs", "sft.py:tiny"), "--workdir", run_dir,
                   *[f"--config.{o}" for o in overrides]]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)
    metrics = read_metrics(run_dir)
    final = [m for m in metrics if m.get("step") == steps and "eval_loss" in m][-1]
    train = [m for m in metrics if "loss" in m and "tokens_per_s" in m]
    return dict(run=run_dir, eval_loss=final["eval_loss"],
                s_per_step=float(np.median([m.get("seconds_per_step", np.nan) for m in train]))
                if train and "seconds_per_step" in train[0] else None,
                tokens_per_s=float(np.median([m["tokens_per_s"] for m in train])) if train else None)


def gold(run_dir: str, n_prompts: int) -> dict:
    import ml_collections

    from llm_jax.pipeline import evaluate
    cache = os.path.join(run_dir, "gold.json")
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            return json.load(f)
    settings = ml_collections.ConfigDict(dict(prompts="default_task", n_prompts=n_prompts, max_new_tokens=16,
                                              temperature=1.0, seed=0, batch_size=64))
    result = evaluate(run_dir, settings)
    with open(cache, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return result


def _flat_projections(params, cfg):
    """{(layer, name): weight} of the quantized projections (scanned layers split)."""
    from llm_jax.model import quant
    out = {}
    blocks = params["params"]["blocks"]
    for module in ("attn", "mlp"):
        for name, w in blocks[module].items():
            if name in quant.QUANTIZED:
                for layer in range(cfg.n_layers):
                    out[(layer, name)] = np.asarray(w[layer], np.float32)
    return out


def weight_error(pretrain: str) -> dict:
    """Per-tensor relative RMS error of int8 and NF4 on the pretrained weights, and the quantized models'
    next-token distributions against the full model's on held-out text."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from llm_jax import runs
    from llm_jax.model import quant
    from llm_jax.model.transformer import Transformer
    run = runs.load_run(pretrain)
    cfg = run.model_cfg
    full = _flat_projections(run.params, cfg)
    rows, logits_vs = {}, {}
    tokens = _held_out_tokens(run)
    full_logits = run.model.apply(run.params, tokens, method=Transformer.logits)
    full_logp = jax.nn.log_softmax(full_logits, axis=-1)
    for scheme in ("int8", "nf4"):
        qcfg = dataclasses.replace(cfg, base_quant=scheme, quant_block=64, quant_double=True)
        quantized = quant.quantize_tree(run.params, qcfg)
        deq = _flat_projections(quant.dequantize_tree(quantized, qcfg), cfg)
        rows[scheme] = {f"{name}[{layer}]": float(np.linalg.norm(full[(layer, name)] - deq[(layer, name)])
                                                  / np.linalg.norm(full[(layer, name)]))
                        for (layer, name) in full}
        q_logp = jax.nn.log_softmax(Transformer(qcfg).apply(quantized, tokens, method=Transformer.logits), axis=-1)
        kl = jnp.sum(jnp.exp(full_logp) * (full_logp - q_logp), axis=-1)
        logits_vs[scheme] = dict(kl_mean=float(kl.mean()), kl_max=float(kl.max()),
                                 top1_agree=float(jnp.mean(jnp.argmax(full_logp, -1) == jnp.argmax(q_logp, -1))))
    single = dataclasses.replace(cfg, base_quant="nf4", quant_block=64, quant_double=False)
    deq = _flat_projections(quant.dequantize_tree(quant.quantize_tree(run.params, single), single), cfg)
    rows["nf4, f32 scales"] = {f"{name}[{layer}]": float(np.linalg.norm(full[(layer, name)] - deq[(layer, name)])
                                                         / np.linalg.norm(full[(layer, name)]))
                               for (layer, name) in full}
    rows["int4 (uniform, for reference)"] = _uniform_int4_error(full, cfg)
    return dict(relative_rms_error=rows, next_token_vs_full=logits_vs, n_tokens=int(tokens.size))


def _uniform_int4_error(full: dict, cfg) -> dict:
    """The same blocks with Qwix's uniform int4 (absmax/7.5 steps) instead of NF4's normal quantiles: what the
    NormalFloat levels buy (not a base_quant scheme)."""
    import dataclasses

    import jax.numpy as jnp
    import qwix

    from llm_jax.model import quant
    qcfg = dataclasses.replace(cfg, base_quant="nf4", quant_block=64, quant_double=False)
    shapes = quant.projection_shapes(cfg)
    out = {}
    for (layer, name), w in full.items():
        lay = quant.layout(qcfg, name, *shapes[name])
        q = qwix.quantize(jnp.asarray(w), jnp.int4, channelwise_axes=[a for a, t in enumerate(lay.tiles) if t == 1],
                          tiled_axes={a: t for a, t in enumerate(lay.tiles) if t > 1})
        out[f"{name}[{layer}]"] = float(np.linalg.norm(np.asarray(qwix.dequantize(q)) - w) / np.linalg.norm(w))
    return out


def _held_out_tokens(run, rows: int = 16):
    """`rows` rows of 128 tokens of text the pretraining never saw: documents of the embedded corpus's generator
    under another seed."""
    from llm_jax.data.default_corpus import generate_documents
    length = 128
    ids: list[int] = []
    for text, _ in generate_documents(4 * rows, seed=9_999):
        ids += run.tokenizer.encode(text)
        if len(ids) >= rows * length:
            break
    return np.asarray(ids[:rows * length], np.int32).reshape(rows, length)


def fixture_logits(fixture: str, workdir: str) -> dict:
    """An HF fixture checkpoint imported in full precision and with an NF4 base: their logits compared."""
    import jax
    import jax.numpy as jnp

    from llm_jax import runs
    from llm_jax.hf.import_hf import import_hf
    from llm_jax.model.transformer import Transformer
    out = {}
    for scheme in ("none", "int8", "nf4"):
        target = os.path.join(workdir, f"import_{os.path.basename(fixture)}_{scheme}")
        import_hf(fixture, target, [f"model.base_quant={scheme}", "model.quant_block=32"])
        run = runs.load_run(target)
        tokens = (np.arange(64, dtype=np.int32).reshape(2, 32) * 37) % run.model_cfg.vocab_size
        out[scheme] = np.asarray(run.model.apply(run.params, tokens, method=Transformer.logits), np.float32)
    full_logp = jax.nn.log_softmax(out["none"], axis=-1)
    result = {}
    for scheme in ("int8", "nf4"):
        logp = jax.nn.log_softmax(out[scheme], axis=-1)
        result[scheme] = dict(max_abs_logit_diff=float(np.abs(out[scheme] - out["none"]).max()),
                              logit_scale=float(np.abs(out["none"]).max()),
                              kl_mean=float(jnp.mean(jnp.sum(jnp.exp(full_logp) * (full_logp - logp), -1))),
                              top1_agree=float(np.mean(out[scheme].argmax(-1) == out["none"].argmax(-1))))
    return result


def markdown(results: dict) -> str:
    lines = ["## LoRA SFT on each base (mean ± std over seeds)", "",
             "| base | eval loss | gold greedy | gold sampled | runs |", "|---|---:|---:|---:|---:|"]
    def ms(rows, key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if values else "—"
    for base, rows in results["sft"].items():
        lines.append(f"| {base} | {ms(rows, 'eval_loss')} | {ms(rows, 'gold_greedy')} | {ms(rows, 'gold_sampled')} | "
                     f"{len(rows)} |")
    err = results["weights"]["relative_rms_error"]
    schemes = list(err)
    lines += ["", "## Quantization error on the pretrained weights (relative RMS, per tensor)", "",
              "| tensor | " + " | ".join(schemes) + " |", "|---|" + "---:|" * len(schemes)]
    for key in err["int8"]:
        lines.append(f"| {key} | " + " | ".join(f"{err[s][key]:.5f}" for s in schemes) + " |")
    lines.append("| mean | " + " | ".join(f"{np.mean(list(err[s].values())):.5f}" for s in schemes) + " |")
    lines += ["", "## Next-token distributions against the full model", "",
              "| model | scheme | mean KL (nats/token) | top-1 agreement |", "|---|---|---:|---:|"]
    for scheme, row in results["weights"]["next_token_vs_full"].items():
        lines.append(f"| pretrained (held-out text, {results['weights']['n_tokens']} tokens) | {scheme} | "
                     f"{row['kl_mean']:.2e} | {row['top1_agree']:.4f} |")
    for scheme, row in results.get("fixture", {}).items():
        lines.append(f"| HF fixture {results['fixture_name']} (max logit Δ {row['max_abs_logit_diff']:.4f} of "
                     f"{row['logit_scale']:.3f}) | {scheme} | {row['kl_mean']:.2e} | {row['top1_agree']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--bases", default="none,int8,nf4")
    parser.add_argument("--eval-prompts", type=int, default=256)
    parser.add_argument("--hf-fixture", default=os.path.join(REPO, "tests", "hf", "fixtures", "llama"))
    args, extra = parser.parse_known_args(argv)
    extra = [e[len("--config."):] for e in extra if e.startswith("--config.")]
    os.makedirs(args.workdir, exist_ok=True)
    results = dict(weights=weight_error(args.pretrain), sft={})
    if args.hf_fixture:
        results["fixture"] = fixture_logits(args.hf_fixture, args.workdir)
        results["fixture_name"] = os.path.basename(args.hf_fixture)
    for base in args.bases.split(","):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            row = sft_run(args.pretrain, args.workdir, base, seed, args.steps, extra)
            g = gold(row["run"], args.eval_prompts)
            rows.append({**row, "gold_greedy": g.get("gold_greedy"), "gold_sampled": g.get("gold_sampled")})
        results["sft"][base] = rows
        with open(os.path.join(args.workdir, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    with open(os.path.join(args.workdir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
