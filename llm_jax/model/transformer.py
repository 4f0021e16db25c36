"""A decoder-only transformer: token embedding, pre-norm blocks (RMSNorm, rotary grouped-query attention,
gated MLP) scanned over depth, final norm and LM head.

`cfg.family` (model/families/) switches what architectures differ in: (1 + w) norms, q/k/v biases, q/k norms,
GeGLU, embedding scaling, norms after attention and the MLP, sliding-window layers. Where local (windowed) and
global layers alternate (Gemma 3), the scanned layer is given its kind as a scanned flag and picks the window
and RoPE table with `lax.cond`, so one compiled layer still serves every depth.

Every weight carries logical axis names (see `llm_jax/sharding.py` for the mapping to the mesh); activations
are constrained by name at block boundaries. Parameters are kept in `param_dtype` (f32) and cast to the
compute `dtype` (bf16 on accelerators) at use; norms, softmax and logits run in f32.

With `lora_rank > 0` the projections named in `lora_targets` carry LoRA adapters (see `llm_jax/model/lora.py`);
their dropout runs only when the apply call is given a "dropout" rng (`dropout_rngs(rng)`). With `base_quant`
the seven projections are stored quantized and dequantized inside their matmuls (see `llm_jax/model/quant.py`).
With `prompt_tuning_tokens` P > 0 a trained soft prompt of P embeddings runs before every sequence, and the
outputs are the T tokens' alone (see `llm_jax/model/prompt_tuning.py`): rows packed with `segment_ids` hold it
once, visible to every segment; their attention runs on the xla path where `attention_impl` names a kernel.

`attention_weights(model, params, tokens)` returns every layer's softmax weights (L, B, H, T, T) for inspection.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from llm_jax import sharding
from llm_jax.kernels.attention import (ATTENTION_RESIDUAL_NAMES, PROMPT_SEGMENT, SHARED_PREFIX_IMPLEMENTATIONS,
                                      attention, decode_attention, platform_of, reference_attention, resolve_impl)
from llm_jax.model import prompt_tuning, quant
from llm_jax.model.config import ModelConfig
from llm_jax.model.rope import inverse_frequencies, rotary

_REMAT = {
    "full": None,  # save nothing: recompute the block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # dots, plus the flash kernel's output and log-sum-exp, so its forward is not run again in the backward
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots,
        jax.checkpoint_policies.save_only_these_names(*ATTENTION_RESIDUAL_NAMES)),
}


def _param(module: nn.Module, name: str, shape, axes, cfg: ModelConfig, init=None):
    init = init or nn.initializers.normal(cfg.init_std)
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.weights_dtype)


class QuantizedWeight(NamedTuple):
    """A projection stored quantized (model/quant.py): its parts and how they encode the weight."""
    parts: dict
    layout: quant.Layout

    @property
    def shape(self) -> tuple:
        return self.layout.shape


def _weight(module: nn.Module, name: str, shape, axes, n_in: int = 1, init=None):
    """Projection `name`: a `param_dtype` array, or with `cfg.base_quant` its quantized parts, each part with
    W's logical axes (where the mesh divides the part's shrunken dims: `sharding.divisible_axes`). A fresh
    quantized model quantizes its random init."""
    cfg = module.cfg
    if cfg.base_quant == "none":
        return _param(module, name, shape, axes, cfg, init)
    lay = quant.layout(cfg, name, tuple(shape), n_in)
    init = init or nn.initializers.normal(cfg.init_std)

    def init_parts(key):
        parts = quant.quantize(init(key, shape, cfg.weights_dtype), lay)
        return {part: nn.LogicallyPartitioned(value, sharding.divisible_axes(value.shape, axes, module.mesh,
                                                                             module.rules))
                for part, value in parts.items()}
    return QuantizedWeight(module.param(name, init_parts), lay)


def project(module: nn.Module, name: str, x, w, axes, n_in: int = 1):
    """x·W over x's last `n_in` dims, plus the `LoRA` update where `name` is one of `cfg.lora_target_names`.
    A quantized W is dequantized inside the matmul (`quant.matmul`)."""
    cfg = module.cfg
    if isinstance(w, QuantizedWeight):
        y = quant.matmul(x, w.parts, w.layout)
    else:
        y = token_matmul(x, w.astype(cfg.compute_dtype), n_contract=n_in)
    if name in cfg.lora_target_names:
        y = y + LoRA(cfg, w.shape, axes, n_in, module.mesh, module.rules, name=f"{name}_lora")(x)
    return y


class LoRA(nn.Module):
    """The low-rank update (α/r)·dropout(x)·A·B of a projection W (*in → *out) (Hu et al. 2021; model/lora.py).

    A (*in, r) is Kaiming-uniform, B (r, *out) zeros, so a fresh adapter changes nothing. Two thin matmuls,
    (B·T, in)·(in, r) then (B·T, r)·(r, out); W + A·B is never formed. A and B live in a module of their own
    (`<W>_lora/{a,b}` beside W): the base weights keep a plain model's paths, and their init too (under
    nn.scan a module's init keys depend on how many params it declares). Dropout runs only when the apply
    call has a "dropout" rng.
    """
    cfg: ModelConfig
    w_shape: tuple
    axes: tuple
    n_in: int = 1
    mesh: Mesh | None = None
    rules: Any = ()

    @nn.compact
    def __call__(self, x):
        cfg, dt, n_in, r = self.cfg, self.cfg.compute_dtype, self.n_in, self.cfg.lora_rank
        in_shape, out_shape = tuple(self.w_shape[:n_in]), tuple(self.w_shape[n_in:])
        # Kaiming-uniform over A's fan-in (bound 1/√fan_in), as in the paper's reference implementation.
        a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)),
                                                  out_axis=-1)
        a = _param(self, "a", (*in_shape, r), (*self.axes[:n_in], "lora_rank"), cfg, a_init)
        b = _param(self, "b", (r, *out_shape), ("lora_rank", *self.axes[n_in:]), cfg, nn.initializers.zeros)
        if cfg.lora_dropout > 0 and self.has_rng("dropout"):
            x = nn.Dropout(cfg.lora_dropout, deterministic=False)(x)
        xa_btr = token_matmul(x, a.astype(dt), n_contract=n_in) * cfg.lora_scale
        xa_btr = sharding.constrain(xa_btr, ("batch", "length", "lora_rank"), self.mesh, self.rules)
        return token_matmul(xa_btr, b.astype(dt))


def dropout_rngs(rng) -> dict:
    """`model.apply(..., rngs=dropout_rngs(rng))`: dropout on with a key (training), off with None (evaluation)."""
    return {} if rng is None else {"dropout": rng}


def _residual_init(cfg: ModelConfig):
    """Projections into the residual stream start smaller, by 1/√(2·layers) (GPT-2's residual scaling)."""
    return nn.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)


class RMSNorm(nn.Module):
    """x / rms(x) · w over the last axis, in f32; the family's `norm_plus_one` makes it · (1 + w), w from 0."""
    cfg: ModelConfig
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x_btd):
        plus_one = self.cfg.family_spec.norm_plus_one
        init = nn.initializers.zeros if plus_one else nn.initializers.ones
        scale_d = _param(self, "scale", (x_btd.shape[-1],), (self.axis_name,), self.cfg, init)
        x32 = x_btd.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        scale32 = scale_d.astype(jnp.float32) + (1.0 if plus_one else 0.0)
        return (x32 * scale32).astype(self.cfg.compute_dtype)


def token_matmul(x, w, n_contract: int = 1, preferred_element_type=None):
    """Contracts x's last `n_contract` dims with w's first ones, as ONE 2-D matmul over all tokens.

    (B, T, *in) · (*in, *out) -> (B, T, *out). Same maths as the einsum, but the weight gradient is then a plain
    (in, B·T)·(B·T, out) product: written as an einsum over (b, t), XLA:CPU contracts two dims and first
    transposes the whole activation gradient (B·T·out elements, strided), which cost more than the matmuls
    themselves at the `bench` shape. The reshapes are free (row-major bitcasts).
    """
    lead, contracted = x.shape[:x.ndim - n_contract], x.shape[x.ndim - n_contract:]
    k = 1
    for size in contracted:
        k *= size
    out_shape = w.shape[n_contract:]
    y = jnp.dot(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out_shape)


@jax.custom_vjp
def swiglu(gate, up):
    """silu(gate) · up (Shazeer 2020), whose backward keeps only gate and up and recomputes the sigmoid.

    Plain autodiff saves sigmoid(gate), silu(gate) and their products as well: at the `bench` shape that is
    three more (B, T, d_ff) f32 buffers per layer written in the forward and read back in the backward.
    """
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, g):
    gate, up = residuals
    sig = jax.nn.sigmoid(gate)
    # d silu(x)/dx = σ(x) · (1 + x · (1 − σ(x)))
    return g * up * sig * (1 + gate * (1 - sig)), g * gate * sig


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class Attention(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Any = ()
    shared_prefix: bool = False  # segment PROMPT_SEGMENT is a prefix every packed segment sees

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, kv=None, lengths_b=None, local=None):
        """Self-attention over x; with a layer cache `kv` = (k, v), each (B, K, S, D), also returns it updated.

        `local`: whether this layer is a sliding-window one, a Python bool, or a traced one where the layers are
        scanned and their kinds alternate; None where every layer is alike (`cfg.sliding_window` for all).

        - kv None: training and scoring, attention over the T tokens given.
        - kv given, lengths None (prefill): the cache is empty; attention over the prompt itself, whose keys and
          values are written at cache positions [0, T).
        - kv and lengths (B,) given (decode): row b's T new tokens are written at [lengths[b], lengths[b] + T)
          and attend to the cache up to themselves.

        Where the apply call makes the "intermediates" collection mutable (`attention_weights`), the layer runs
        the reference attention whatever `attention_impl` names (a kernel never forms the weights) and sows its
        softmax weights (B, H, T, T) as `attention_weights`; decoding sows nothing.

        With a soft prompt before packed rows (`cfg.prompt_tuning_tokens` and segment ids: the prompt is the
        segment PROMPT_SEGMENT, model/prompt_tuning.py), or a text prompt shared by the answers packed after it
        (`shared_prefix`: the reward model's packed rows, data/preference_rows.py), the mask needs the positions
        and the prompt segment, which only the reference and xla attention serve: a pallas or cudnn
        `attention_impl` runs xla here.
        """
        cfg = self.cfg
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_axes, o_axes = ("embed", "heads", "head_dim"), ("heads", "head_dim", "embed")
        kv_axes = ("embed", "kv_heads", "head_dim")
        wq_dhk = _weight(self, "wq", (d, h, hd), q_axes)
        wk_dkh = _weight(self, "wk", (d, k, hd), kv_axes)
        wv_dkh = _weight(self, "wv", (d, k, hd), kv_axes)
        wo_hkd = _weight(self, "wo", (h, hd, d), o_axes, n_in=2, init=_residual_init(cfg))

        family = cfg.family_spec
        q_bthd = project(self, "wq", x_btd, wq_dhk, q_axes)
        k_btkd = project(self, "wk", x_btd, wk_dkh, kv_axes)
        v_btkd = project(self, "wv", x_btd, wv_dkh, kv_axes)
        if family.qkv_bias:
            q_bthd, k_btkd, v_btkd = (
                y + _param(self, name, y.shape[2:], axes[1:], cfg, nn.initializers.zeros).astype(y.dtype)
                for y, name, axes in ((q_bthd, "bq", q_axes), (k_btkd, "bk", kv_axes), (v_btkd, "bv", kv_axes)))
        if family.qk_norm:
            q_bthd = RMSNorm(cfg, "head_dim", name="q_norm")(q_bthd)
            k_btkd = RMSNorm(cfg, "head_dim", name="k_norm")(k_btkd)
        inv_freq_f = self._inverse_frequencies(local)
        q_bthd = rotary(q_bthd, positions_bt, inv_freq_f)
        k_btkd = rotary(k_btkd, positions_bt, inv_freq_f)
        if cfg.query_scale_dim:  # the kernels divide by √head_dim; the checkpoint wants √query_scale_dim
            q_bthd = (q_bthd.astype(jnp.float32) * (hd / cfg.query_scale_dim) ** 0.5).astype(q_bthd.dtype)
        q_bthd = sharding.constrain(q_bthd, ("batch", "length", "act_heads", None), self.mesh, self.rules)
        k_btkd = sharding.constrain(k_btkd, ("batch", "length", "act_kv_heads", None), self.mesh, self.rules)
        v_btkd = sharding.constrain(v_btkd, ("batch", "length", "act_kv_heads", None), self.mesh, self.rules)
        if kv is not None and lengths_b is not None:
            kv = tuple(_write_rows(cache, new, lengths_b) for cache, new in zip(kv, (k_btkd, v_btkd)))

            def attend(window):
                return lambda q, k, v: decode_attention(q, k, v, lengths_b + x_btd.shape[1], window=window,
                                                        impl=self._decode_impl(), mesh=self.mesh, rules=self.rules)
            out_bthd = self._by_layer_kind(attend, local, q_bthd, *kv)
        else:
            capture = self.is_mutable_collection("intermediates")
            shared_prefix = (bool(cfg.prompt_tuning_tokens) or self.shared_prefix) and segment_ids_bt is not None
            prefix_positions_bt = positions_bt if shared_prefix else None
            impl = self._shared_prefix_impl() if shared_prefix else cfg.attention_impl

            def attend(window):
                if capture:
                    return lambda q, k, v: reference_attention(q, k, v, segment_ids_bt=segment_ids_bt, causal=True,
                                                               window=window, positions_bt=prefix_positions_bt,
                                                               return_probs=True)
                return lambda q, k, v: attention(q, k, v, segment_ids_bt=segment_ids_bt, causal=True, window=window,
                                                 impl=impl, mesh=self.mesh, rules=self.rules,
                                                 blocks=cfg.attention_blocks, positions_bt=prefix_positions_bt)
            out_bthd = self._by_layer_kind(attend, local, q_bthd, k_btkd, v_btkd)
            if capture:
                out_bthd, probs_bhts = out_bthd
                self.sow("intermediates", "attention_weights", probs_bhts)
            if kv is not None:
                kv = tuple(_write_rows(cache, new, jnp.zeros(x_btd.shape[:1], jnp.int32))
                           for cache, new in zip(kv, (k_btkd, v_btkd)))
        out_btd = project(self, "wo", out_bthd, wo_hkd, o_axes, n_in=2)
        return out_btd if kv is None else (out_btd, kv)

    def _inverse_frequencies(self, local):
        """The layer kind's RoPE table; a traced kind selects between the two tables."""
        cfg = self.cfg
        if local is None:
            return inverse_frequencies(cfg, cfg.layer_is_local(0))
        if isinstance(local, bool):
            return inverse_frequencies(cfg, local)
        return jnp.where(local, inverse_frequencies(cfg, True), inverse_frequencies(cfg, False))

    def _by_layer_kind(self, attend, local, *args):
        """attend(window)(*args) with this layer's window: static where the kind is known, else a `lax.cond`
        between the local and the global program (both compiled, one run per layer)."""
        cfg = self.cfg
        if local is None:
            return attend(cfg.sliding_window)(*args)
        if isinstance(local, bool):
            return attend(cfg.sliding_window if local else 0)(*args)
        return jax.lax.cond(local, attend(cfg.sliding_window), attend(0), *args)

    def _shared_prefix_impl(self) -> str:
        """`attention_impl`, or xla where it names (or `auto` resolves to) a kernel that cannot mask a soft prompt
        shared by packed segments."""
        cfg = self.cfg
        impl = resolve_impl(cfg.attention_impl, platform_of(self.mesh), cfg.compute_dtype)
        return impl if impl in SHARED_PREFIX_IMPLEMENTATIONS else "xla"

    def _decode_impl(self) -> str:
        """The Pallas decode kernel where a kernel path serves training attention, else the reference."""
        impl = resolve_impl(self.cfg.attention_impl, platform_of(self.mesh), self.cfg.compute_dtype)
        return "pallas" if impl in ("pallas", "cudnn") else "reference"


def _write_rows(cache_bksd, new_btkd, starts_b):
    """Writes row b's T new keys (or values) into its cache at [starts[b], starts[b] + T)."""
    new_bktd = jnp.transpose(new_btkd, (0, 2, 1, 3)).astype(cache_bksd.dtype)
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0)))(cache_bksd, new_bktd, starts_b)


class MLP(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Any = ()

    @nn.compact
    def __call__(self, x_btd):
        cfg = self.cfg
        up_axes, down_axes = ("embed", "mlp"), ("mlp", "embed")
        w_gate_df = _weight(self, "w_gate", (cfg.d_model, cfg.d_ff), up_axes)
        w_up_df = _weight(self, "w_up", (cfg.d_model, cfg.d_ff), up_axes)
        w_down_fd = _weight(self, "w_down", (cfg.d_ff, cfg.d_model), down_axes, init=_residual_init(cfg))
        gate_btf = project(self, "w_gate", x_btd, w_gate_df, up_axes)
        up_btf = project(self, "w_up", x_btd, w_up_df, up_axes)
        gated_btf = (swiglu(gate_btf, up_btf) if cfg.family_spec.activation == "silu"
                     else jax.nn.gelu(gate_btf, approximate=True) * up_btf)  # GeGLU, tanh GELU (Gemma)
        h_btf = sharding.constrain(gated_btf, ("batch", "length", "act_mlp"), self.mesh, self.rules)
        return project(self, "w_down", h_btf, w_down_fd, down_axes)


class Block(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Any = ()
    shared_prefix: bool = False  # segment PROMPT_SEGMENT is a prefix every packed segment sees

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt, kv=None, lengths_b=None, local=None):
        """x (B, T, D) -> (x, kv): kv is the layer's updated cache, None without one (see Attention)."""
        sandwich = self.cfg.family_spec.sandwich_norms
        attn = Attention(self.cfg, self.mesh, self.rules, self.shared_prefix, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x_btd), positions_bt, segment_ids_bt, kv, lengths_b, local)
        attn_btd, kv = attn if kv is not None else (attn, None)
        if sandwich:
            attn_btd = RMSNorm(self.cfg, name="post_attn_norm")(attn_btd)
        x_btd = x_btd + attn_btd
        mlp_btd = MLP(self.cfg, self.mesh, self.rules, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_btd))
        if sandwich:
            mlp_btd = RMSNorm(self.cfg, name="post_mlp_norm")(mlp_btd)
        x_btd = x_btd + mlp_btd
        x_btd = sharding.constrain(x_btd, ("batch", "length", "act_embed"), self.mesh, self.rules)
        return x_btd, kv


class KVCache(NamedTuple):
    """Keys and values of every layer, (L, B, K, S, D) each, head-major for the decode kernel; `lengths` (B,)
    counts each row's valid entries (a soft prompt's P entries included)."""
    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype),
                   jnp.zeros((batch,), jnp.int32))


class Transformer(nn.Module):
    """tokens (B, T) -> hidden states (B, T, D) via `__call__`, or logits (B, T, V) via `logits`; with a soft
    prompt (`prompt_tuning_tokens` P) the model runs P + T positions and returns the T tokens' outputs."""

    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Any = ()
    shared_prefix: bool = False  # segment PROMPT_SEGMENT is a prefix every packed segment sees

    def setup(self):
        cfg = self.cfg
        self.embedding = self.param("embedding", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), cfg.weights_dtype)
        self.layers = self._make_layers()
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), cfg.weights_dtype)
        if cfg.prompt_tuning_tokens:  # declared last: every other param keeps the plain model's init key
            table_vd = self.embedding
            self.soft_prompt = self.param(prompt_tuning.SOFT_PROMPT, nn.with_logical_partitioning(
                lambda key, shape, dtype: prompt_tuning.from_vocab(table_vd, key, shape[0]).astype(dtype),
                (None, "embed")), (cfg.prompt_tuning_tokens, cfg.d_model), cfg.weights_dtype)

    def _make_layers(self):
        cfg = self.cfg
        block_cls = Block
        if cfg.remat != "none":
            # prevent_cse=False is safe (and faster) under scan, which already blocks CSE across layers.
            block_cls = nn.remat(block_cls, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # The layer's cache slice is scanned over (axis 0), like its parameters; the per-layer cache
            # comes back as the scan's output. Each layer draws its own params and (LoRA) dropout masks; what a
            # layer sows (`attention_weights`) is stacked over the layers like the params.
            scanned = nn.scan(block_cls, variable_axes={"params": 0, "intermediates": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, 0), length=cfg.n_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            return scanned(cfg, self.mesh, self.rules, self.shared_prefix, name="blocks")
        return [block_cls(cfg, self.mesh, self.rules, self.shared_prefix, name=f"block_{i}")
                for i in range(cfg.n_layers)]

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, cache: KVCache | None = None,
                 prefill: bool = False):
        """Hidden states (B, T, D); with a cache, (hidden states, updated cache).

        With `cache`: `prefill=True` runs the prompt through an empty cache (row b's prompt is its first
        cache.lengths[b] tokens; the padding after it is written but never attended to and is overwritten by
        decoding); otherwise the T tokens are new, at positions cache.lengths + [0, T). The returned cache's
        lengths count the tokens it now holds.

        With a soft prompt of P tokens, `positions_bt` count the tokens as without one (from 0); the model puts
        the prompt at positions 0..P-1 and shifts the tokens by P. Prefill writes the prompt's keys and values
        at cache positions [0, P), the tokens' after them, and the cache's lengths count the P entries.
        """
        cfg, n_prompt = self.cfg, self.cfg.prompt_tuning_tokens
        decoding = cache is not None and not prefill
        if prefill and cache.k.shape[3] < n_prompt + tokens_bt.shape[1]:
            raise ValueError(f"a KV cache of {cache.k.shape[3]} entries cannot hold the soft prompt's {n_prompt} and "
                             f"the prompt's {tokens_bt.shape[1]} (generate.cache_length counts both)")
        if positions_bt is None:
            start_b = cache.lengths - n_prompt if decoding else jnp.zeros(tokens_bt.shape[:1], jnp.int32)
            positions_bt = start_b[:, None] + jnp.arange(tokens_bt.shape[1])[None, :]
        # Gather the FSDP shards of the table first (as FSDP does for every weight at use): a lookup into a
        # table split along embed would force XLA to replicate the whole activation.
        table_vd = sharding.constrain(self.embedding, ("vocab", None), self.mesh, self.rules)
        x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(cfg.compute_dtype)
        if n_prompt:
            positions_bt = positions_bt + n_prompt
            if not decoding:
                x_btd, positions_bt, segment_ids_bt = self._prepend_prompt(x_btd, positions_bt, segment_ids_bt)
        if cfg.family_spec.embed_scale:  # √d rounded to the compute dtype first, as the checkpoints' code does
            x_btd = x_btd * jnp.asarray(cfg.d_model ** 0.5, cfg.compute_dtype)
        x_btd = sharding.constrain(x_btd, ("batch", "length", "act_embed"), self.mesh, self.rules)
        lengths_b = None if cache is None or prefill else cache.lengths
        kv = None if cache is None else (cache.k, cache.v)
        if cfg.scan_layers:
            local_l = (jnp.asarray([cfg.layer_is_local(i) for i in range(cfg.n_layers)]) if cfg.mixed_layers
                       else None)
            x_btd, kv = self.layers(x_btd, positions_bt, segment_ids_bt, kv, lengths_b, local_l)
        else:
            per_layer = []
            for i, block in enumerate(self.layers):
                local = cfg.layer_is_local(i) if cfg.mixed_layers else None
                x_btd, layer_kv = block(x_btd, positions_bt, segment_ids_bt,
                                        None if kv is None else (kv[0][i], kv[1][i]), lengths_b, local)
                per_layer.append(layer_kv)
            if kv is not None:
                kv = tuple(jnp.stack(parts) for parts in zip(*per_layer))
        if n_prompt and not decoding:
            x_btd = x_btd[:, n_prompt:]  # the T tokens' outputs
        hidden_btd = self.final_norm(x_btd)
        if cache is None:
            return hidden_btd
        lengths = cache.lengths + n_prompt if prefill else cache.lengths + tokens_bt.shape[1]
        return hidden_btd, KVCache(*kv, lengths)

    def _prepend_prompt(self, x_btd, positions_bt, segment_ids_bt):
        """The soft prompt (P, D) before every row: (x (B, P + T, D), positions, segment ids), the prompt at
        positions 0..P-1 in the segment PROMPT_SEGMENT (segment ids stay None where none are given)."""
        b, p = x_btd.shape[0], self.cfg.prompt_tuning_tokens
        prompt_bpd = jnp.broadcast_to(self.soft_prompt.astype(x_btd.dtype)[None], (b, p, x_btd.shape[-1]))
        x_btd = jnp.concatenate([prompt_bpd, x_btd], axis=1)
        prompt_positions_bp = jnp.broadcast_to(jnp.arange(p, dtype=positions_bt.dtype)[None], (b, p))
        positions_bt = jnp.concatenate([prompt_positions_bp, positions_bt], axis=1)
        if segment_ids_bt is not None:
            prompt_segment_bp = jnp.full((b, p), PROMPT_SEGMENT, segment_ids_bt.dtype)
            segment_ids_bt = jnp.concatenate([prompt_segment_bp, segment_ids_bt], axis=1)
        return x_btd, positions_bt, segment_ids_bt

    def logits(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
        return self.head(self(tokens_bt, positions_bt, segment_ids_bt))

    def head(self, x_btd):
        """Hidden states -> f32 logits (B, T, V); shared by the LM loss and generation."""
        dt = self.cfg.compute_dtype
        w_dv = self.embedding.T if self.cfg.tie_embeddings else self.lm_head
        logits_btv = token_matmul(x_btd, w_dv.astype(dt), preferred_element_type=jnp.float32)
        return sharding.constrain(logits_btv, ("batch", "length", "act_vocab"), self.mesh, self.rules)


def attention_weights(model: Transformer, params, tokens_bt, positions_bt=None, segment_ids_bt=None):
    """Every layer's attention weights on `tokens_bt`: float32 (L, B, H, T, T), row t a softmax over keys s ≤ t
    (with a soft prompt of P tokens, (L, B, H, P + T, P + T): the prompt's positions first).

    One forward of the model with its "intermediates" collection mutable, so each layer sows the softmax of the
    reference attention (`reference_attention`), masked as it masks: causal, the layer's sliding window, the
    packed segments of `segment_ids_bt`; query head h reads K/V head h // (H / K). A model whose
    `attention_impl` names a kernel (or `auto`, which resolves to one) falls back to the reference for this
    call: the weights are the reference's, and the forward's outputs differ from the kernel's only by float
    rounding. An apply call that leaves "intermediates" immutable (the default) runs none of this: its program is
    the same with or without this function.
    """
    _, state = model.apply(params, tokens_bt, positions_bt, segment_ids_bt, mutable=["intermediates"])
    found = state["intermediates"]
    if model.cfg.scan_layers:
        return found["blocks"]["attn"]["attention_weights"][0]  # scanned: already stacked over layers
    return jnp.stack([found[f"block_{i}"]["attn"]["attention_weights"][0] for i in range(model.cfg.n_layers)])
