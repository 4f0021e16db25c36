"""FLOP and parameter accounting, written once and used for MFU, benchmarks and scaling-law fits.

Training FLOPs per token = 3 × forward (the backward pass costs twice the forward):
    forward matmuls: 2 · N_matmul, N_matmul = every weight used in a matmul (attention and MLP projections
                     of all layers, plus the LM head; the embedding lookup is a gather, not a matmul)
    forward causal attention: per layer, q·kᵀ and p·v each cost 2·H·D_h per attended key; a causal row of
                     length T attends on average (T+1)/2 keys, so 4·H·D_h·(T+1)/2 = 2·H·D_h·(T+1)
    training:        6 · N_matmul + 6 · L · H · D_h · (T+1)
Norms, rotary, softmax and the loss are left out, as is usual for MFU (PaLM appendix B; Chinchilla app. F).

Parameter counts: `kaplan` is Kaplan et al. 2020's non-embedding N (everything but the token embedding and
the LM head); `total` is Chinchilla's N (every parameter, tied embeddings counted once).
"""
from __future__ import annotations

from llm_jax.model.config import ModelConfig


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    d, h, k, hd, f, v, n = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    attention = d * h * hd * 2 + d * k * hd * 2  # wq, wo, wk, wv
    mlp = 3 * d * f
    norms = 2 * d
    per_layer = attention + mlp + norms
    embedding = v * d
    lm_head = 0 if cfg.tie_embeddings else d * v
    kaplan = n * per_layer + d  # + the final norm
    return dict(
        per_layer=per_layer,
        kaplan=kaplan,
        embedding=embedding,
        lm_head=lm_head,
        total=kaplan + embedding + lm_head,
        matmul=n * (attention + mlp) + d * v,  # the head is a matmul whether or not it is tied
    )


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs of causal attention per token (forward + backward, all layers)."""
    return 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (seq_len + 1)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return 6 * param_counts(cfg)["matmul"] + attention_flops_per_token(cfg, seq_len)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return training_flops_per_token(cfg, seq_len) // 3
