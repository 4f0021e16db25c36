"""The `Family` record and the Hugging Face config fields every family maps the same way."""
from __future__ import annotations

import dataclasses
from typing import Callable

ACTIVATIONS = ("silu", "gelu_tanh")  # the gate of a gated MLP: SwiGLU or GeGLU
# HF `hidden_act` names of each activation (gelu_pytorch_tanh and gelu_new are the same tanh approximation)
HF_ACTIVATIONS = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new")}


class UnsupportedConfig(ValueError):
    """A Hugging Face config field whose value the trunk cannot run (named with its value)."""


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_model_types: tuple[str, ...]     # config.json `model_type`s it reads
    hf_architecture: str                # `architectures[0]` it writes
    from_hf: Callable[[dict, str], dict]  # (config.json, its path) -> config.model fields
    to_hf: Callable[[object], dict]       # ModelConfig -> config.json
    norm_plus_one: bool = False   # norms scale by (1 + w), w starting at 0 (Gemma)
    qkv_bias: bool = False        # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False         # an RMSNorm over head_dim on each query and key head, before RoPE
    activation: str = "silu"      # one of ACTIVATIONS
    embed_scale: bool = False     # embeddings multiplied by √d_model (Gemma)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too, before the residual add (Gemma)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"family {self.name}: activation {self.activation!r} is not one of {ACTIVATIONS}")


def field(hf: dict, name: str, source: str, default=None):
    """hf[name], or `default`; a missing field without a default is an UnsupportedConfig naming it."""
    if name in hf and hf[name] is not None:
        return hf[name]
    if default is None:
        raise UnsupportedConfig(f"{source}: the field {name!r} is missing")
    return default


def refuse(hf: dict, source: str, name: str, allowed) -> None:
    """UnsupportedConfig when hf[name] is present and not in `allowed` (a tuple of accepted values)."""
    if name in hf and hf[name] not in allowed:
        raise UnsupportedConfig(f"{source}: {name}={hf[name]!r} is not supported (supported: {list(allowed)})")


def rope_parameters(hf: dict, layer_type: str | None = None) -> dict:
    """The RoPE settings of config.json: transformers 5's `rope_parameters` (per layer type where it has them),
    or the older top-level `rope_theta` and `rope_scaling`; an empty dict when it names none."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and layer_type and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and params and not all(isinstance(v, dict) for v in params.values()):
        return dict(params)
    legacy = dict(hf.get("rope_scaling") or {})
    if "rope_theta" in hf:
        legacy.setdefault("rope_theta", hf["rope_theta"])
    return legacy


def rope_fields(params: dict, source: str, default_theta: float) -> dict:
    """config.model's rope fields from one rope settings dict (`default`, `linear` or `llama3`)."""
    kind = params.get("rope_type", params.get("type", "default"))
    out = dict(rope_theta=float(params.get("rope_theta", default_theta)), rope_scaling="none")
    if kind == "default":
        return out
    if kind == "linear":
        return dict(out, rope_scaling="linear", rope_scaling_factor=float(params["factor"]))
    if kind == "llama3":
        return dict(out, rope_scaling="llama3", rope_scaling_factor=float(params["factor"]),
                    rope_low_freq_factor=float(params["low_freq_factor"]),
                    rope_high_freq_factor=float(params["high_freq_factor"]),
                    rope_original_max_len=int(params["original_max_position_embeddings"]))
    raise UnsupportedConfig(f"{source}: rope_type={kind!r} is not supported (supported: default, linear, llama3)")


def rope_to_hf(cfg) -> dict:
    """The rope settings dict of the global layers, as config.json's `rope_parameters` holds it."""
    params = dict(rope_type="default", rope_theta=cfg.rope_theta)
    if cfg.rope_scaling == "linear":
        params.update(rope_type="linear", factor=cfg.rope_scaling_factor)
    elif cfg.rope_scaling == "llama3":
        params.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                      low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                      original_max_position_embeddings=cfg.rope_original_max_len)
    return params


def common_from_hf(hf: dict, source: str, activation: str) -> dict:
    """The fields every family maps alike: shape, vocabulary, norm epsilon, tying, RoPE of the global layers."""
    hidden_act = hf.get("hidden_act", hf.get("hidden_activation"))
    if hidden_act not in HF_ACTIVATIONS[activation]:
        raise UnsupportedConfig(f"{source}: hidden_act={hidden_act!r} is not supported by this family "
                                f"(supported: {list(HF_ACTIVATIONS[activation])})")
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if hf.get(name):
            raise UnsupportedConfig(f"{source}: {name}={hf[name]!r}: mixture-of-experts models are not supported")
    refuse(hf, source, "attention_bias", (False,))
    refuse(hf, source, "mlp_bias", (False,))
    refuse(hf, source, "pretraining_tp", (1,))
    n_heads = int(field(hf, "num_attention_heads", source))
    d_model = int(field(hf, "hidden_size", source))
    return dict(
        n_layers=int(field(hf, "num_hidden_layers", source)), d_model=d_model, n_heads=n_heads,
        n_kv_heads=int(field(hf, "num_key_value_heads", source, n_heads)),
        head_dim=int(field(hf, "head_dim", source, d_model // n_heads)),
        d_ff=int(field(hf, "intermediate_size", source)), vocab_size=int(field(hf, "vocab_size", source)),
        norm_eps=float(field(hf, "rms_norm_eps", source, 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        **rope_fields(rope_parameters(hf, "full_attention"), source, 10_000.0))


def common_to_hf(cfg, family: Family, hidden_act: str) -> dict:
    return dict(
        architectures=[family.hf_architecture], model_type=family.hf_model_types[0],
        num_hidden_layers=cfg.n_layers, hidden_size=cfg.d_model, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        hidden_act=hidden_act, rope_theta=cfg.rope_theta, rope_parameters=rope_to_hf(cfg),
        torch_dtype=cfg.param_dtype, dtype=cfg.param_dtype)
