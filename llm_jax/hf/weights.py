"""Where each of our params lives in a Hugging Face checkpoint, and how its layout differs.

Our projections keep heads as their own axis and put the input first (wq: (d, H, D_h), wo: (H, D_h, d), MLP
weights (in, out)); HF's `nn.Linear` weights are (out, in) with heads flattened. Every family names its tensors
alike (`model.layers.{i}.self_attn.q_proj.weight`, ...); the family's switches say which exist. Gemma's
`post_attention_layernorm` is the norm after attention, where Llama's is the one before the MLP.
Both directions are exact reshapes and transposes, so import → export → import is bit for bit.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from llm_jax.model.config import ModelConfig


Index = tuple[slice, ...]  # a block of one of our arrays, each slice with explicit start and stop


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf: str                   # HF tensor name; "{i}" stands for the layer index in per-layer maps
    path: tuple[str, ...]     # our param path: from the block for per-layer maps, from the params root otherwise
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    # our block -> (the HF block holding it, what turns that block into ours), so one device's shard is read
    # alone; None where a block of ours is not one block of HF's (then the whole tensor is read)
    hf_block: Callable[[Index], tuple[Index, Callable]] | None = None


def _same(x):
    return x


def _same_block(index: Index):
    return index, _same


def _transposed_block(index: Index):
    return (index[1], index[0]), lambda w: w.T


def _heads(s: slice, hd: int) -> slice:
    return slice(s.start * hd, s.stop * hd)


def _whole(s: slice, size: int) -> bool:
    return s.start == 0 and s.stop == size


def _linear(cfg: ModelConfig, name: str, hf: str, path: tuple[str, ...]) -> TensorMap:
    """An (out, in) HF weight as our (in, *out) or (*in, out) array."""
    d, hd = cfg.d_model, cfg.head_dim
    if name in ("wq", "wk", "wv"):
        n = cfg.n_heads if name == "wq" else cfg.n_kv_heads

        def qkv_block(index: Index):  # ours (d, n, hd) <- HF rows of those heads, columns of those d
            sd, sn, sh = index
            if not _whole(sh, hd):
                return None
            return (_heads(sn, hd), sd), lambda w: w.T.reshape(sd.stop - sd.start, sn.stop - sn.start, hd)
        return TensorMap(hf, path, lambda w: w.T.reshape(d, n, hd), lambda w: w.reshape(d, n * hd).T, qkv_block)
    if name == "wo":
        h = cfg.n_heads

        def o_block(index: Index):  # ours (h, hd, d) <- HF rows of those d, columns of those heads
            sn, sh, sd = index
            if not _whole(sh, hd):
                return None
            return (sd, _heads(sn, hd)), lambda w: w.T.reshape(sn.stop - sn.start, hd, sd.stop - sd.start)
        return TensorMap(hf, path, lambda w: w.T.reshape(h, hd, d), lambda w: w.reshape(h * hd, d).T, o_block)
    return TensorMap(hf, path, lambda w: w.T, lambda w: w.T, _transposed_block)


def _bias(cfg: ModelConfig, name: str, hf: str, path: tuple[str, ...]) -> TensorMap:
    n, hd = (cfg.n_heads if name == "bq" else cfg.n_kv_heads), cfg.head_dim

    def bias_block(index: Index):
        sn, sh = index
        if not _whole(sh, hd):
            return None
        return (_heads(sn, hd),), lambda b: b.reshape(sn.stop - sn.start, hd)
    return TensorMap(hf, path, lambda b: b.reshape(n, hd), lambda b: b.reshape(n * hd), bias_block)


def global_maps(cfg: ModelConfig) -> list[TensorMap]:
    maps = [TensorMap("model.embed_tokens.weight", ("embedding",), _same, _same, _same_block),
            TensorMap("model.norm.weight", ("final_norm", "scale"), _same, _same, _same_block)]
    if not cfg.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", ("lm_head",), lambda w: w.T, lambda w: w.T, _transposed_block))
    return maps


def layer_maps(cfg: ModelConfig) -> list[TensorMap]:
    """The tensors of layer {i}, with paths inside one block."""
    family = cfg.family_spec
    p = "model.layers.{i}."
    maps = [_linear(cfg, name, f"{p}self_attn.{proj}.weight", ("attn", name))
            for name, proj in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))]
    maps += [_linear(cfg, name, f"{p}mlp.{proj}.weight", ("mlp", name))
             for name, proj in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))]
    if family.qkv_bias:
        maps += [_bias(cfg, name, f"{p}self_attn.{proj}.bias", ("attn", name))
                 for name, proj in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj"))]
    if family.qk_norm:
        maps += [TensorMap(f"{p}self_attn.{n}.weight", ("attn", n, "scale"), _same, _same, _same_block)
                 for n in ("q_norm", "k_norm")]
    norms = {"input_layernorm": "attn_norm"}
    if family.sandwich_norms:
        norms.update(post_attention_layernorm="post_attn_norm", pre_feedforward_layernorm="mlp_norm",
                     post_feedforward_layernorm="post_mlp_norm")
    else:
        norms["post_attention_layernorm"] = "mlp_norm"
    maps += [TensorMap(f"{p}{hf}.weight", (ours, "scale"), _same, _same, _same_block) for hf, ours in norms.items()]
    return maps


def hf_names(cfg: ModelConfig) -> list[str]:
    """Every tensor name a checkpoint of this config holds."""
    names = [m.hf for m in global_maps(cfg)]
    names += [m.hf.format(i=i) for i in range(cfg.n_layers) for m in layer_maps(cfg)]
    return names
