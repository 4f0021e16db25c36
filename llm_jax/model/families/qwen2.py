"""Qwen2 and Qwen2.5: Llama's trunk with biases on the q, k and v projections."""
from llm_jax.model.families.base import Family, UnsupportedConfig, common_from_hf, common_to_hf


def from_hf(hf: dict, source: str) -> dict:
    if hf.get("use_sliding_window"):
        raise UnsupportedConfig(f"{source}: use_sliding_window=True is not supported for qwen2 (its window covers "
                                "only the layers from max_window_layers on)")
    return common_from_hf(hf, source, "silu")


def to_hf(cfg) -> dict:
    return dict(common_to_hf(cfg, FAMILY, "silu"), use_sliding_window=False,
                layer_types=["full_attention"] * cfg.n_layers)


FAMILY = Family("qwen2", hf_model_types=("qwen2",), hf_architecture="Qwen2ForCausalLM", from_hf=from_hf, to_hf=to_hf,
                qkv_bias=True)
