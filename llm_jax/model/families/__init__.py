"""Model families: what each architecture changes in the one transformer trunk, registered by name.

    llama    Llama 2, 3, 3.1, 3.2 (and llm_jax's own models): RMSNorm, SwiGLU, RoPE (with `llama3` scaling)
    mistral  llama + a sliding attention window on every layer
    qwen2    llama + biases on the q, k, v projections
    qwen3    llama + RMSNorm on each query and key head (head_dim set on its own)
    gemma3   (1 + w) norms, norms after attention and MLP too, embeddings × √d, GeGLU (tanh GELU), q/k norms,
             queries scaled by query_pre_attn_scalar^-½, local sliding-window layers with their own RoPE base
             between global ones, tied head

A family is one small file: its `Family` record (the trunk's switches, read by `model/transformer.py`) and its
Hugging Face config mapping (`from_hf`: config.json → `config.model` fields, refusing what the trunk cannot
run; `to_hf`: the reverse, for export). Tensor names are shared by every family (`llm_jax/hf/weights.py`).
Adding the next family (Gemma 2's soft-capping, Phi, OLMo) is a file here, a line in FAMILIES, and tests.
"""
from __future__ import annotations

from llm_jax.model.families import gemma3, llama, mistral, qwen2, qwen3
from llm_jax.model.families.base import Family, UnsupportedConfig

FAMILIES: dict[str, Family] = {f.name: f for f in (llama.FAMILY, mistral.FAMILY, qwen2.FAMILY, qwen3.FAMILY,
                                                     gemma3.FAMILY)}

__all__ = ["FAMILIES", "Family", "UnsupportedConfig", "get_family", "family_of_hf"]


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_hf(hf_config: dict, source: str = "config.json") -> Family:
    """The family whose HF `model_type` the config names; UnsupportedConfig naming it otherwise."""
    model_type = hf_config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise UnsupportedConfig(f"{source}: model_type={model_type!r} is not supported; supported: {known}")
