"""A decoder-only transformer: token embedding, pre-norm blocks (RMSNorm, rotary grouped-query attention,
SwiGLU MLP) scanned over depth, final norm and LM head.

Every weight carries logical axis names (see `llm_jax/sharding.py` for the mapping to the mesh); activations
are constrained by name at block boundaries. Parameters are kept in `param_dtype` (f32) and cast to the
compute `dtype` (bf16 on accelerators) at use; norms, softmax and logits run in f32.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from llm_jax import sharding
from llm_jax.kernels.attention import ATTENTION_RESIDUAL_NAMES, attention
from llm_jax.model.config import ModelConfig

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


def _residual_init(cfg: ModelConfig):
    """Projections into the residual stream start smaller, by 1/√(2·layers) (GPT-2's residual scaling)."""
    return nn.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_btd):
        scale_d = _param(self, "scale", (x_btd.shape[-1],), ("norm",), self.cfg, nn.initializers.ones)
        x32 = x_btd.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x32 * scale_d.astype(jnp.float32)).astype(self.cfg.compute_dtype)


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


def rotary(x_bthd, positions_bt, theta: float):
    """Rotates channel pairs (i, i + D/2) by angle position·θ^(-2i/D) (RoFormer, Su et al. 2021)."""
    half = x_bthd.shape[-1] // 2
    inv_freq_f = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_btf = positions_bt.astype(jnp.float32)[:, :, None] * inv_freq_f
    cos, sin = jnp.cos(angle_btf)[:, :, None, :], jnp.sin(angle_btf)[:, :, None, :]
    x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_bthd.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Any = ()

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        wq_dhk = _param(self, "wq", (d, h, hd), ("embed", "heads", "head_dim"), cfg)
        wk_dkh = _param(self, "wk", (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
        wv_dkh = _param(self, "wv", (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg)
        wo_hkd = _param(self, "wo", (h, hd, d), ("heads", "head_dim", "embed"), cfg, _residual_init(cfg))

        q_bthd = token_matmul(x_btd, wq_dhk.astype(dt))
        k_btkd = token_matmul(x_btd, wk_dkh.astype(dt))
        v_btkd = token_matmul(x_btd, wv_dkh.astype(dt))
        q_bthd = rotary(q_bthd, positions_bt, cfg.rope_theta)
        k_btkd = rotary(k_btkd, positions_bt, cfg.rope_theta)
        q_bthd = sharding.constrain(q_bthd, ("batch", "length", "act_heads", None), self.mesh, self.rules)
        k_btkd = sharding.constrain(k_btkd, ("batch", "length", "act_kv_heads", None), self.mesh, self.rules)
        v_btkd = sharding.constrain(v_btkd, ("batch", "length", "act_kv_heads", None), self.mesh, self.rules)
        out_bthd = attention(q_bthd, k_btkd, v_btkd, segment_ids_bt=segment_ids_bt, causal=True,
                             impl=cfg.attention_impl, mesh=self.mesh, rules=self.rules,
                             blocks=cfg.attention_blocks)
        return token_matmul(out_bthd, wo_hkd.astype(dt), n_contract=2)


class MLP(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Any = ()

    @nn.compact
    def __call__(self, x_btd):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        w_gate_df = _param(self, "w_gate", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg)
        w_up_df = _param(self, "w_up", (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg)
        w_down_fd = _param(self, "w_down", (cfg.d_ff, cfg.d_model), ("mlp", "embed"), cfg, _residual_init(cfg))
        gate_btf = token_matmul(x_btd, w_gate_df.astype(dt))
        up_btf = token_matmul(x_btd, w_up_df.astype(dt))
        h_btf = sharding.constrain(swiglu(gate_btf, up_btf), ("batch", "length", "act_mlp"),
                                   self.mesh, self.rules)
        return token_matmul(h_btf, w_down_fd.astype(dt))


class Block(nn.Module):
    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Any = ()

    @nn.compact
    def __call__(self, x_btd, positions_bt, segment_ids_bt):
        x_btd = x_btd + Attention(self.cfg, self.mesh, self.rules, name="attn")(
            RMSNorm(self.cfg, name="attn_norm")(x_btd), positions_bt, segment_ids_bt)
        x_btd = x_btd + MLP(self.cfg, self.mesh, self.rules, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_btd))
        x_btd = sharding.constrain(x_btd, ("batch", "length", "act_embed"), self.mesh, self.rules)
        return x_btd


class _ScannedBlock(Block):
    """A Block with the (carry, None) signature nn.scan wants."""

    def __call__(self, x_btd, positions_bt, segment_ids_bt):
        return super().__call__(x_btd, positions_bt, segment_ids_bt), None


class Transformer(nn.Module):
    """tokens (B, T) -> hidden states (B, T, D) via `__call__`, or logits (B, T, V) via `logits`."""

    cfg: ModelConfig
    mesh: Mesh | None = None
    rules: Any = ()

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

    def _make_layers(self):
        cfg = self.cfg
        block_cls = _ScannedBlock if cfg.scan_layers else Block
        if cfg.remat != "none":
            # prevent_cse=False is safe (and faster) under scan, which already blocks CSE across layers.
            block_cls = nn.remat(block_cls, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            return scanned(cfg, self.mesh, self.rules, name="blocks")
        return [block_cls(cfg, self.mesh, self.rules, name=f"block_{i}") for i in range(cfg.n_layers)]

    def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
        cfg = self.cfg
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        # Gather the FSDP shards of the table first (as FSDP does for every weight at use): a lookup into a
        # table split along embed would force XLA to replicate the whole activation.
        table_vd = sharding.constrain(self.embedding, ("vocab", None), self.mesh, self.rules)
        x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(cfg.compute_dtype)
        x_btd = sharding.constrain(x_btd, ("batch", "length", "act_embed"), self.mesh, self.rules)
        if cfg.scan_layers:
            x_btd, _ = self.layers(x_btd, positions_bt, segment_ids_bt)
        else:
            for block in self.layers:
                x_btd = block(x_btd, positions_bt, segment_ids_bt)
        return self.final_norm(x_btd)

    def logits(self, tokens_bt, positions_bt=None, segment_ids_bt=None):
        return self.head(self(tokens_bt, positions_bt, segment_ids_bt))

    def head(self, x_btd):
        """Hidden states -> f32 logits (B, T, V); shared by the LM loss and generation."""
        dt = self.cfg.compute_dtype
        w_dv = self.embedding.T if self.cfg.tie_embeddings else self.lm_head
        logits_btv = token_matmul(x_btd, w_dv.astype(dt), preferred_element_type=jnp.float32)
        return sharding.constrain(logits_btv, ("batch", "length", "act_vocab"), self.mesh, self.rules)
