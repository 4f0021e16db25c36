"""Llama 2, 3, 3.1, 3.2: the trunk as it is (RMSNorm, SwiGLU, rotary GQA), RoPE optionally `llama3`-scaled.
llm_jax's own models are this family too, so they export as Llama checkpoints."""
from llm_jax.model.families.base import Family, common_from_hf, common_to_hf, refuse


def from_hf(hf: dict, source: str) -> dict:
    refuse(hf, source, "sliding_window", (None,))
    return common_from_hf(hf, source, "silu")


def to_hf(cfg) -> dict:
    return common_to_hf(cfg, FAMILY, "silu")


FAMILY = Family("llama", hf_model_types=("llama",), hf_architecture="LlamaForCausalLM", from_hf=from_hf, to_hf=to_hf)
