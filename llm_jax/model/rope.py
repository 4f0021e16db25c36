"""Rotary position embeddings (RoFormer, Su et al. 2021) and the frequency scalings checkpoints use.

Channel pairs (i, i + D/2) rotate by angle position · f_i with f_i = θ^(-2i/D) (the rotate-half layout of
Llama, Mistral, Qwen and Gemma checkpoints). Scalings of f for contexts past the original one:
- `linear` (position interpolation, Chen et al. 2023): f / factor.
- `llama3` (Llama 3.1): wavelengths 2π/f longer than original/low_freq_factor are divided by factor, those
  shorter than original/high_freq_factor kept, and the band between interpolated smoothly.
Frequencies are computed in float32 with jnp, as the checkpoints' own code computes them (and as the models
trained here always have: their results stay bit for bit what they were).
"""
from __future__ import annotations

import jax.numpy as jnp

from llm_jax.model.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig, local: bool = False):
    """(D/2,) float32 f_i of a global layer, or of a local one (its own base, unscaled, where it has one)."""
    half = cfg.head_dim // 2
    exponents = -jnp.arange(half, dtype=jnp.float32) / half
    if local and cfg.rope_local_theta:
        return cfg.rope_local_theta ** exponents
    inv = cfg.rope_theta ** exponents
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_scaling_factor
    elif cfg.rope_scaling == "llama3":
        inv = _llama3_scaled(inv, cfg)
    return inv


def _llama3_scaled(inv, cfg: ModelConfig):
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    original = cfg.rope_original_max_len
    wavelength = 2 * jnp.pi / inv
    scaled = jnp.where(wavelength > original / low, inv / factor, inv)
    smooth = (original / wavelength - low) / (high - low)
    between = (wavelength >= original / high) & (wavelength <= original / low)
    return jnp.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rotary(x_bthd, positions_bt, inv_freq_f):
    """Rotates channel pairs (i, i + D/2) of each head by position · inv_freq[i]; f32 maths, x's dtype out."""
    angle_btf = positions_bt.astype(jnp.float32)[:, :, None] * inv_freq_f
    cos, sin = jnp.cos(angle_btf)[:, :, None, :], jnp.sin(angle_btf)[:, :, None, :]
    x1, x2 = jnp.split(x_bthd.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_bthd.dtype)
