"""LoRA: low-rank adapters on the projections of a trained transformer, which stays frozen (Hu et al. 2021).

Config (`config.model`, checked by `ModelConfig.validate`)
    lora_rank     r; 0 turns LoRA off: no adapter params, and every param trains as before
    lora_alpha    α; the update is scaled by α/r, so a change of r keeps the update's size at a given lr
    lora_dropout  dropout on each adapter's input, in training steps only
    lora_targets  a comma-separated subset of wq,wk,wv,wo,w_gate,w_up,w_down (default "wq,wk,wv,wo")

The model (`transformer.project`)
    Each target W, (in → out) with in/out possibly several dims (wq is (d, h, hd), wo is (h, hd, d)), gives
        y = x·W + (α/r)·dropout(x)·A·B,      A (in, r) Kaiming-uniform,  B (r, out) zeros,
    two thin matmuls; W + A·B is never formed in training. B = 0 makes a fresh adapter change nothing.
    A and B sit beside W in a module of their own, `<W>_lora/a` and `<W>_lora/b`: a LoRA model's base params
    have exactly a plain model's paths (and the same init for the same key), so a pretrain or SFT
    checkpoint restores into the base part (`without_adapters` gives that part's shapes).
    Dropout runs only when `model.apply` gets a "dropout" rng: `rngs=transformer.dropout_rngs(rng)` with the
    `rng` the train step hands the loss; the eval step hands it None, which turns dropout off.

What trains
    `trainable_for(cfg)` is the rule: the adapters, plus every param a plain Transformer of the same config
    lacks (a task head, such as the reward model's, starts untrained and must learn); None without LoRA or a
    soft prompt. The soft prompt of prompt tuning (model/prompt_tuning.py) counts as an adapter here: it trains,
    `without_adapters` leaves it out, and `without_lora` (the plain model) has none. An
    optimizer built with it (`train.optimizer.make_optimizer(..., trainable=rule)`) holds state for those
    leaves only, the train step differentiates w.r.t. them only, and the frozen base comes out of every step
    bit for bit unchanged. `split` / `combine` cut a param tree into (trainable, frozen) nested dicts and back.

Sharding
    A carries W's input logical axes then "lora_rank"; B "lora_rank" then W's output axes; "lora_rank" maps
    to no mesh axis (configs_common.DEFAULT_RULES). So A is split like W's rows (FSDP over embed, tensor over
    heads for wo), B like W's columns (tensor over heads / mlp), the (B, T, r) intermediate is replicated over
    the model axes (a small all-reduce where W's input dim is sharded), and Adam's moments follow their
    adapter. Nothing else changes: the base weights keep their shardings.

Merge
    `merge(params, cfg)` folds each adapter into its weight, W' = W + (α/r)·A·B (in f32), and drops the
    adapters: the params of the plain model `Transformer(merged_config(cfg))`, which gives the same logits. A
    quantized base (QLoRA, model/quant.py) is dequantized first, so the merged model is full precision. A soft
    prompt has no weight to fold into: it stays, and `merged_config` keeps `prompt_tuning_tokens`.

Memory (f32 weights, AdamW; N params without adapters, a adapter params, n = a + heads the params that train)
    full fine-tuning   weights 4N + gradients 4N + Adam m, v 8N          = 16N bytes
    LoRA               weights 4(N + a) + gradients 4n + Adam m, v 8n     = 4N + 4a + 12n bytes
    Gradient accumulation adds an f32 running sum of the gradients (4n, or 4N in full fine-tuning). Per
    layer, rank r on wq (d → h·hd) adds r·d + r·h·hd params; on wo (h·hd → d) r·h·hd + r·d; on w_gate
    (d → f) r·d + r·f. Activations are about the same either way (the backward still runs through every
    layer to reach the adapters below). `count` and `memory_report` measure the actual shapes and optimizer
    state; `describe` puts them on one log line; `training_report` gives both for a training loop.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from llm_jax.model import quant
from llm_jax.model.config import LORA_TARGETS, ModelConfig
from llm_jax.model.prompt_tuning import SOFT_PROMPT
from llm_jax.model.transformer import Transformer

__all__ = ["LORA_TARGETS", "ADAPTER_SUFFIX", "is_trainable", "trainable_mask", "trainable_for", "mask_of",
           "split", "combine", "without_adapters", "count", "memory_report", "describe", "training_report", "merge",
           "without_lora", "merged_config"]

ADAPTER_SUFFIX = "_lora"  # the adapter of `wq` is the module `wq_lora`, with params `a` and `b`
Trainable = Any  # a rule `params -> bool mask`, a bool mask, or None (every param trains)


def path_names(path) -> tuple[str, ...]:
    """The dict keys along a pytree path (jax key entries or plain strings); boxes and attributes skipped."""
    names = []
    for entry in path:
        if isinstance(entry, str):
            names.append(entry)
        elif isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
    return tuple(names)


def is_trainable(path) -> bool:
    """True on a LoRA adapter's path (`.../attn/wq_lora/a`) and on the soft prompt's (`params/soft_prompt`)."""
    names = path_names(path)
    return SOFT_PROMPT in names or any(name.endswith(ADAPTER_SUFFIX) for name in names)


@functools.lru_cache(maxsize=None)
def _plain_paths(cfg: ModelConfig) -> frozenset:
    plain = Transformer(without_lora(cfg))
    boxed = jax.eval_shape(lambda k: plain.init(k, jnp.zeros((1, 2), jnp.int32), method=Transformer.logits),
                           jax.random.key(0))
    return frozenset(path_names(path) for path, _ in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)))


def trainable_mask(params, cfg: ModelConfig | None = None):
    """A bool per leaf: True at the adapters (the soft prompt included) and, given `cfg`, at every param a plain
    Transformer lacks."""
    plain = _plain_paths(cfg) if cfg is not None else None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: is_trainable(path) or (plain is not None and path_names(path) not in plain), params)


def trainable_for(cfg: ModelConfig):
    """The rule `params -> mask` of what trains for a model of `cfg`: None (everything) without LoRA or a soft
    prompt."""
    return functools.partial(trainable_mask, cfg=cfg) if cfg.lora_rank or cfg.prompt_tuning_tokens else None


def mask_of(trainable: Trainable, params):
    """A bool mask over `params` from a rule or a mask; None stays None (every param trains)."""
    return trainable(params) if callable(trainable) else trainable


def split(params, mask=None) -> tuple[dict, dict]:
    """(trainable, frozen): nested dicts with the leaves where `mask` is True / False, empty branches dropped.

    `mask` (default: the adapters) has the params' structure or is a prefix of it (one bool for a subtree)."""
    mask = trainable_mask(params) if mask is None else mask

    def walk(p, m):
        if isinstance(p, Mapping) and isinstance(m, Mapping):
            picked, rest = {}, {}
            for key, value in p.items():
                a, b = walk(value, m[key])
                if a is not None:
                    picked[key] = a
                if b is not None:
                    rest[key] = b
            return picked or None, rest or None
        return (p, None) if bool(m) else (None, p)
    trainable, frozen = walk(params, mask)
    return trainable or {}, frozen or {}


def combine(*parts) -> dict:
    """The union of nested dicts cut by `split`; a leaf in two parts is an error."""
    def union(a, b, path):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise ValueError(f"combine: {'/'.join(path)} is in more than one part")
        out = dict(a)
        for key, value in b.items():
            out[key] = union(a[key], value, path + (str(key),)) if key in a else value
        return out
    out: dict = {}
    for part in parts:
        out = union(out, part, ())
    return out


def without_adapters(params) -> dict:
    """Every leaf but the adapters and the soft prompt: what a plain model's checkpoint can fill (base weights,
    heads)."""
    return split(params)[1]


def _size(leaf) -> int:
    return math.prod(leaf.shape)


def _bytes(tree) -> int:
    return sum(_size(x) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _weights(tree) -> int:
    """The number of weights in `tree`, a quantized projection counted as the weights it encodes."""
    return sum(quant.logical_size(x) for x in jax.tree.leaves(tree, is_leaf=quant.is_quantized))


def _full_precision(tree):
    """Abstract f32 weights of the same count in place of each quantized projection (full fine-tuning's view)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((quant.logical_size(x),), jnp.float32)
                        if quant.is_quantized(x) else x, tree, is_leaf=quant.is_quantized)


def count(params, trainable: Trainable = trainable_mask) -> dict:
    """Params that train and in all, and the fraction that trains (params may be abstract; a quantized
    projection counts the weights it encodes)."""
    mask = mask_of(trainable, params)
    picked = params if mask is None else split(params, mask)[0]
    n_trainable = _weights(picked)
    total = _weights(params)
    return dict(trainable=n_trainable, total=total, trainable_fraction=n_trainable / max(total, 1))


def memory_report(params, optimizer, trainable: Trainable = trainable_mask, grad_accum: int = 1) -> dict:
    """Bytes of the weights, gradients and optimizer state as trained, and (`full_*`) for full fine-tuning of
    the same model without its adapters. Shapes only: `params` may be abstract; `optimizer` is any optax
    transformation (its state is measured by `jax.eval_shape` of its init)."""
    def measure(all_params, trained):
        grads = _bytes(trained)
        if grad_accum > 1:  # plus the f32 running sum over micro-batches
            grads += sum(_size(x) * 4 for x in jax.tree.leaves(trained))
        opt = _bytes(jax.eval_shape(optimizer.init, trained))
        weights = _bytes(all_params)
        return dict(params_bytes=weights, grads_bytes=grads, opt_state_bytes=opt, total_bytes=weights + grads + opt)
    mask = mask_of(trainable, params)
    lora = measure(params, params if mask is None else split(params, mask)[0])
    base = _full_precision(without_adapters(params))
    full = measure(base, base)
    return {**lora, **{f"full_{k}": v for k, v in full.items()}}


def describe(counts: dict, memory: dict) -> str:
    """One log line: what trains, and the memory against full fine-tuning."""
    def mib(n):
        return f"{n / 2**20:,.1f} MiB"
    return (f"training {counts['trainable']:,} of {counts['total']:,} params "
            f"({100 * counts['trainable_fraction']:.2f}%); weights {mib(memory['params_bytes'])}, gradients "
            f"{mib(memory['grads_bytes'])}, optimizer {mib(memory['opt_state_bytes'])}, total "
            f"{mib(memory['total_bytes'])} (full fine-tuning: {mib(memory['full_total_bytes'])})")


def training_report(params, optimizer, trainable: Trainable, grad_accum: int = 1) -> tuple[dict, str | None]:
    """What a training loop logs once when part of the model trains (`trainable`, a rule or mask): metrics
    (params that train, their fraction, `memory_*` bytes) and a line for the log; ({}, None) when `trainable`
    is None (every param trains). `params` may be abstract."""
    if trainable is None:
        return {}, None
    counts = count(params, trainable)
    memory = memory_report(params, optimizer, trainable, grad_accum)
    metrics = {"n_params_trainable": counts["trainable"], "trainable_fraction": counts["trainable_fraction"],
               **{f"memory_{name}": value for name, value in memory.items()}}
    return metrics, describe(counts, memory)


def without_lora(cfg: ModelConfig) -> ModelConfig:
    """The plain model's config: the same weights (quantized where they are), no adapters, no soft prompt."""
    return dataclasses.replace(cfg, lora_rank=0, prompt_tuning_tokens=0)


def merged_config(cfg: ModelConfig) -> ModelConfig:
    """The config of `merge`'s params: no adapters, a full-precision base; a soft prompt stays."""
    return dataclasses.replace(cfg, lora_rank=0, base_quant="none")


def _fold(w, a, b, scale: float):
    """W + scale·A·B for A (*lead, *in, r), B (*lead, r, *out) and W (*lead, *in, *out); lead = scanned layers."""
    lead = a.ndim + b.ndim - w.ndim - 2
    n_in = a.ndim - lead - 1
    lead_shape, r = w.shape[:lead], a.shape[-1]
    k, n = math.prod(w.shape[lead:lead + n_in]), math.prod(w.shape[lead + n_in:])
    ab = jnp.matmul(a.reshape(*lead_shape, k, r).astype(jnp.float32),
                    b.reshape(*lead_shape, r, n).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + scale * ab.reshape(w.shape)).astype(w.dtype)


def merge(params, cfg: ModelConfig) -> dict:
    """The params of `Transformer(merged_config(cfg))`: each W' = W + (α/r)·A·B, the adapters dropped; a
    quantized base is dequantized first (the merged model is full precision); a soft prompt is kept as it is."""
    if cfg.base_quant != "none":
        params = quant.dequantize_tree(params, cfg)

    def walk(tree):
        if not isinstance(tree, Mapping):
            return tree
        out = {}
        for key, value in tree.items():
            if isinstance(key, str) and key.endswith(ADAPTER_SUFFIX):
                continue
            adapter = tree.get(f"{key}{ADAPTER_SUFFIX}")
            out[key] = walk(value) if adapter is None else _fold(value, adapter["a"], adapter["b"], cfg.lora_scale)
        return out
    return walk(params)
