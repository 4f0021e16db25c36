"""Mistral: Llama's trunk with a sliding attention window on every layer (`sliding_window`, null: none)."""
from llm_jax.model.families.base import Family, common_from_hf, common_to_hf


def from_hf(hf: dict, source: str) -> dict:
    return dict(common_from_hf(hf, source, "silu"), sliding_window=int(hf.get("sliding_window") or 0))


def to_hf(cfg) -> dict:
    return dict(common_to_hf(cfg, FAMILY, "silu"), sliding_window=cfg.sliding_window or None)


FAMILY = Family("mistral", hf_model_types=("mistral",), hf_architecture="MistralForCausalLM", from_hf=from_hf,
                to_hf=to_hf)
