"""Qwen3 (dense): Llama's trunk with an RMSNorm on each query and key head before RoPE, and head_dim set on its
own (not hidden_size / heads)."""
from llm_jax.model.families.base import Family, UnsupportedConfig, common_from_hf, common_to_hf, refuse


def from_hf(hf: dict, source: str) -> dict:
    if hf.get("use_sliding_window"):
        raise UnsupportedConfig(f"{source}: use_sliding_window=True is not supported for qwen3")
    refuse(hf, source, "attention_bias", (False,))
    return common_from_hf(hf, source, "silu")


def to_hf(cfg) -> dict:
    return dict(common_to_hf(cfg, FAMILY, "silu"), use_sliding_window=False, attention_bias=False,
                layer_types=["full_attention"] * cfg.n_layers)


FAMILY = Family("qwen3", hf_model_types=("qwen3",), hf_architecture="Qwen3ForCausalLM", from_hf=from_hf, to_hf=to_hf,
                qk_norm=True)
