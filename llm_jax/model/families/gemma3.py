"""Gemma 3 (text): (1 + w) RMSNorms, norms before and after attention and the MLP, embeddings × √d, GeGLU with
tanh GELU, q/k norms, queries scaled by query_pre_attn_scalar^-½, and sliding-window local layers between
global ones (every `global_every`-th layer is global), the local ones with their own RoPE base; tied head.

HF's `layer_types` must follow that pattern (Gemma 3's own: five local, one global); another order is refused.
"""
from llm_jax.model.families.base import (Family, UnsupportedConfig, common_from_hf, common_to_hf, field, refuse,
                                         rope_parameters)


def from_hf(hf: dict, source: str) -> dict:
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        refuse(hf, source, name, (None,))
    refuse(hf, source, "use_bidirectional_attention", (False,))
    fields = common_from_hf(hf, source, "gelu_tanh")
    n_layers = fields["n_layers"]
    layer_types = hf.get("layer_types")
    pattern = hf.get("sliding_window_pattern")
    if layer_types:
        if len(layer_types) != n_layers:
            raise UnsupportedConfig(f"{source}: layer_types has {len(layer_types)} entries for {n_layers} layers")
        global_layers = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
        unknown = sorted({k for k in layer_types if k not in ("full_attention", "sliding_attention")})
        if unknown:
            raise UnsupportedConfig(f"{source}: layer_types holds {unknown}; supported: full_attention, "
                                    "sliding_attention")
        pattern = global_layers[0] + 1 if global_layers else n_layers + 1
        if global_layers != list(range(pattern - 1, n_layers, pattern)):
            raise UnsupportedConfig(f"{source}: layer_types={layer_types} is not every {pattern}-th layer global")
    local_rope = rope_parameters(hf, "sliding_attention")
    local_theta = float(local_rope.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
    if local_rope.get("rope_type", "default") != "default":
        raise UnsupportedConfig(f"{source}: the local layers' rope_type={local_rope['rope_type']!r} is not "
                                "supported (supported: default)")
    scalar = float(field(hf, "query_pre_attn_scalar", source))
    return dict(fields, sliding_window=int(field(hf, "sliding_window", source)), global_every=int(pattern or 6),
                rope_local_theta=local_theta, query_scale_dim=scalar)


def to_hf(cfg) -> dict:
    every = cfg.global_every
    layer_types = ["full_attention" if every and (i + 1) % every == 0 else "sliding_attention"
                   for i in range(cfg.n_layers)]
    out = common_to_hf(cfg, FAMILY, "gelu_pytorch_tanh")
    global_rope = out.pop("rope_parameters")
    out.pop("hidden_act")
    return dict(out, hidden_activation="gelu_pytorch_tanh", sliding_window=cfg.sliding_window,
                layer_types=layer_types, sliding_window_pattern=every,
                query_pre_attn_scalar=_number(cfg.query_scale_dim), rope_local_base_freq=cfg.rope_local_theta,
                rope_parameters={"full_attention": global_rope,
                                 "sliding_attention": dict(rope_type="default", rope_theta=cfg.rope_local_theta)},
                attn_logit_softcapping=None, final_logit_softcapping=None)


def _number(x: float):
    """An integral float as an int: transformers' config classes type query_pre_attn_scalar as int."""
    return int(x) if float(x).is_integer() else x


FAMILY = Family("gemma3", hf_model_types=("gemma3_text",), hf_architecture="Gemma3ForCausalLM", from_hf=from_hf,
                to_hf=to_hf, norm_plus_one=True, qk_norm=True, activation="gelu_tanh", embed_scale=True,
                sandwich_norms=True)
