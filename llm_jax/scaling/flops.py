"""FLOP and parameter accounting, written once and used for MFU, benchmarks and scaling-law fits.

Training FLOPs per token = 3 × forward (the backward pass costs twice the forward):
    forward matmuls: 2 · N_matmul, N_matmul = every weight used in a matmul (attention and MLP projections
                     of all layers, plus the LM head; the embedding lookup is a gather, not a matmul)
    forward causal attention: per layer, q·kᵀ and p·v each cost 2·H·D_h per attended key; a causal row of
                     length T attends on average (T+1)/2 keys, so 4·H·D_h·(T+1)/2 = 2·H·D_h·(T+1)
    training:        6 · N_matmul + 6 · L · H · D_h · (T+1)
    sliding window:  a local layer's query t attends min(t + 1, W) keys; its term uses that average instead
Norms, rotary, softmax and the loss are left out, as is usual for MFU (PaLM appendix B; Chinchilla app. F).

Parameter counts: `kaplan` is Kaplan et al. 2020's non-embedding N (everything but the token embedding and
the LM head); `total` is Chinchilla's N (every parameter, tied embeddings counted once). Families add per layer
q/k/v biases (Qwen2), q/k norms (Qwen3, Gemma 3) and two more norms (Gemma 3): counted in `per_layer`, not matmuls.
"""
from __future__ import annotations

from llm_jax.model.config import ModelConfig


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    d, h, k, hd, f, v, n = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size, cfg.n_layers
    attention = d * h * hd * 2 + d * k * hd * 2  # wq, wo, wk, wv
    mlp = 3 * d * f
    family = cfg.family_spec
    norms = (4 if family.sandwich_norms else 2) * d + (2 * hd if family.qk_norm else 0)
    biases = (h + 2 * k) * hd if family.qkv_bias else 0
    per_layer = attention + mlp + norms + biases
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


def attended_keys(seq_len: int, window: int = 0) -> float:
    """Keys a query attends on average over a causal row of `seq_len` (within the last `window` positions)."""
    if not window or window >= seq_len:
        return (seq_len + 1) / 2
    # rows 0..W-1 see t + 1 keys, the rest W
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs of causal attention per token (forward + backward, all layers; windowed layers see fewer)."""
    keys = sum(attended_keys(seq_len, cfg.sliding_window if cfg.layer_is_local(i) else 0)
               for i in range(cfg.n_layers))
    return round(12 * cfg.n_heads * cfg.head_dim * keys)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return 6 * param_counts(cfg)["matmul"] + attention_flops_per_token(cfg, seq_len)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    return training_flops_per_token(cfg, seq_len) // 3
