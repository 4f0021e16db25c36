"""Config values that cannot be right, refused by `train.loop.validate` before any data is read or compiled.

    check_config(config, model_cfg)   # raises ConfigError: one line naming the field and its value

Without these a negative learning rate trains (to a loss of 120) and exits 0, an Adam beta of 1 divides by
zero in the bias correction (above 1 the moments grow without bound), a missing eval source fails only after the
corpus is tokenized, and a tensor axis that does not divide the KV heads is a raw `IndivisibleError` from inside
jit. The objectives keep their own checks where they build their steps; these run first, so a bad value costs a
second, not a tokenized corpus.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from llm_jax import sharding
from llm_jax.config_lib import ConfigError
from llm_jax.data import mixture
from llm_jax.data.post_training import is_task_spec
from llm_jax.model import lora, quant
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer
from llm_jax.train.optimizer import SCHEDULES, freeze_patterns, trainable_rule


def check_config(config, model_cfg: ModelConfig) -> None:
    """Every value check that needs neither data nor compilation; see the module docstring."""
    check_optim(config.optim)
    check_data(config)
    check_objective_sections(config)
    check_param_sharding(config, model_cfg)
    check_quantized_base(config, model_cfg)


def check_quantized_base(config, model_cfg: ModelConfig) -> None:
    """A quantized base is frozen: what trains (`train.optimizer.trainable_rule`: adapters, a soft prompt,
    `optim.also_train`, less `optim.freeze`) must leave out every quantized projection, whose codes cannot take
    a gradient step. The first one that would train is named (layer by layer, in `quant.QUANTIZED` order)."""
    if model_cfg.base_quant == "none":
        return
    rule = trainable_rule(model_cfg, config.optim)
    params = nn.unbox(_abstract_params(model_cfg))
    mask = jax.tree.map(lambda _: True, params) if rule is None else lora.mask_of(rule, params)
    trained = [names for names in (lora.path_names(path) for path, trains
                                   in jax.tree_util.tree_leaves_with_path(mask) if trains)
               if names[-1] in quant.PARTS]
    if not trained:
        return
    names = min(trained, key=lambda n: (n[:-3], quant.QUANTIZED.index(n[-2]), quant.PARTS.index(n[-1])))
    fix = (f"leave it out of optim.also_train={config.optim.also_train!r}"
           if model_cfg.lora_rank or model_cfg.prompt_tuning_tokens else
           "set model.lora_rank > 0 (QLoRA) or model.prompt_tuning_tokens > 0, or freeze the projections with "
           "optim.freeze")
    raise ConfigError(f"model.base_quant={model_cfg.base_quant!r}: {'/'.join(names)} would train, but a quantized "
                      f"weight cannot be trained; {fix}")


def _abstract_params(model_cfg: ModelConfig):
    """The boxed (logically partitioned) params of `model_cfg`'s model as shapes only: no compilation, ~0.1 s.
    The reference attention traces on any backend at any length; the params do not depend on the kernel."""
    model = Transformer(dataclasses.replace(model_cfg, attention_impl="reference"))
    return jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32), method=Transformer.logits),
                          jax.random.key(0))


def _refuse(field: str, value, why: str):
    raise ConfigError(f"{field}={value!r} {why}")


def _is_number(value) -> bool:
    """A finite int or float (a bool is not a number here; NaN and inf are never a setting)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _in_range(section, name: str, low: float, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = False, where: str = "") -> None:
    """Refuses `section.name` unless it is a finite number in the interval; brackets follow the flags."""
    value = section[name]
    ok = _is_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if ok:
        return
    if high == math.inf:
        bound = "any finite number" if low == -math.inf else f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        bound = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    _refuse(f"{where}.{name}", value, f"must be {bound}")


def _int_at_least(section, name: str, low: int, where: str) -> None:
    value = section[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        _refuse(f"{where}.{name}", value, f"must be an integer >= {low}")


def check_optim(optim) -> None:
    """AdamW and its schedule (train/optimizer.py). optim.grad_accum is checked by validate itself."""
    _in_range(optim, "lr", 0.0, where="optim")  # 0: params unchanged, a run that only evaluates
    for name in ("b1", "b2"):  # 1 or more: the moment averages never forget and grow without bound
        _in_range(optim, name, 0.0, 1.0, high_open=True, where="optim")
    _in_range(optim, "eps", 0.0, low_open=True, where="optim")  # 0: a zero gradient divides 0 by 0
    _in_range(optim, "weight_decay", 0.0, where="optim")
    _in_range(optim, "grad_clip", 0.0, where="optim")  # 0: no clipping; a negative value silently meant the same
    _int_at_least(optim, "warmup_steps", 0, "optim")
    _in_range(optim, "min_lr_ratio", 0.0, 1.0, where="optim")  # above 1 the "decay" would raise the lr
    _in_range(optim, "decay_fraction", 0.0, 1.0, where="optim")
    if optim.schedule not in SCHEDULES:
        _refuse("optim.schedule", optim.schedule, f"is not one of {SCHEDULES}")
    try:
        freeze_patterns(optim.get("freeze", ""))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _has_eval_source(data) -> bool:
    """Whether the data holds rows out for evaluation: its own eval spec, a fraction of the training documents,
    or an embedded task (`data.train="default_task"`, `"arithmetic_task"`), whose eval split the post-training
    data uses (data/post_training.py)."""
    return bool(data.eval) or is_task_spec(data.train) or data.eval_fraction > 0


def check_data(config) -> None:
    """The held-out rows every eval reads (train.loop evaluates at every `train.eval_every` and at the end)."""
    data = config.data
    _in_range(data, "eval_fraction", 0.0, 1.0, high_open=True, where="data")
    components = mixture.components(data)
    if components:
        if not any(c.eval or c.eval_fraction > 0 for c in components):
            c = components[0]
            _refuse(f"data.mixture.{c.name}.eval_fraction", c.eval_fraction, "leaves no eval rows, and so does "
                    "every other component: give one an eval spec or an eval_fraction > 0")
    elif not _has_eval_source(data):
        _refuse("data.eval_fraction", data.eval_fraction, "leaves no eval rows: set data.eval or an eval_fraction > 0")
    tok = config.tokenizer  # a tokenizer this run trains (no path, none inherited) must fit the embedding
    if not tok.path and not config.train.init_from and tok.vocab_size > config.model.vocab_size:
        _refuse("tokenizer.vocab_size", tok.vocab_size, f"exceeds model.vocab_size={config.model.vocab_size}")


def check_objective_sections(config) -> None:
    """Numbers of the objective sections that no run could want (their objectives check names and the rest)."""
    if "dpo" in config:
        _in_range(config.dpo, "beta", 0.0, low_open=True, where="dpo")
        _in_range(config.dpo, "label_smoothing", 0.0, 0.5, high_open=True, where="dpo")
        _in_range(config.dpo, "nll_coef", 0.0, where="dpo")
    if "reward" in config:
        _in_range(config.reward, "margin", -math.inf, where="reward")  # any finite margin
    if "rl" in config:  # rl/settings.py checks the rest of the section before RL reads anything
        p = config.rl
        # ρ is clipped to [1 − ε, 1 + ε]: ε >= 1 leaves no lower clip, ε <= 0 no policy step
        _in_range(p, "clip_eps", 0.0, 1.0, low_open=True, high_open=True, where="rl")
        _in_range(p, "clip_eps_high", 0.0, where="rl")  # 0: clip_eps
        _in_range(p, "value_lr", 0.0, where="rl")  # 0: optim.lr
        _in_range(p, "top_p", 0.0, 1.0, low_open=True, where="rl")
        _int_at_least(p, "top_k", 0, "rl")
        for name in ("kl_loss_coef", "entropy_coef", "tis_cap"):
            _in_range(p, name, 0.0, where="rl")


# The model field that sets a logical axis's length, to name it in an error (when the length is that field's).
_AXIS_FIELDS = {"vocab": "vocab_size", "embed": "d_model", "norm": "d_model", "heads": "n_heads",
                "kv_heads": "n_kv_heads", "head_dim": "head_dim", "mlp": "d_ff", "layers": "n_layers",
                "lora_rank": "lora_rank"}


def _mesh_sizes(mesh_config) -> dict[str, int]:
    """The mesh's axis sizes on this host's devices. A mesh that does not fit them is `make_mesh`'s to refuse
    (next, with the devices it is given): its fixed sizes are checked here, a free (-1) axis taken as 1."""
    try:
        return sharding.mesh_shape(mesh_config, jax.device_count())
    except sharding.ShardingError:
        return {name: max(int(mesh_config[name]), 1) for name in sharding.MESH_AXES}


def check_param_sharding(config, model_cfg: ModelConfig) -> None:
    """Every param dimension divides over the mesh axes that `mesh_rules` shards it across.

    The params are the model's own, traced abstractly (shapes only: no compilation, ~0.1 s) with their logical
    axes, and mapped through the rules exactly as `sharding.logical_to_spec` maps them for the run, so any axis a
    rule sends anywhere is covered: heads, KV heads and MLP width over `tensor`, embed over `fsdp`, and whatever
    a custom table adds.
    """
    sizes = _mesh_sizes(config.mesh)
    rules = sharding.check_rules(config.mesh_rules)
    # A quantized base is checked as its full-precision weights: its parts shard like them where the mesh divides
    # their shrunken dims, and stay whole elsewhere (sharding.divisible_axes).
    boxed = _abstract_params(dataclasses.replace(model_cfg, base_quant="none"))
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    problems = []
    for path, leaf in leaves:
        if not isinstance(leaf, nn.Partitioned):
            continue  # not logically partitioned: replicated
        shape = leaf.value.shape
        spec = sharding.logical_to_spec(leaf.names, rules)
        for dim, logical, entry in zip(shape, leaf.names, spec):
            axes = entry if isinstance(entry, tuple) else (entry,) if entry else ()
            shards = math.prod(sizes[a] for a in axes)
            if shards > 1 and dim % shards:
                field = _AXIS_FIELDS.get(logical)
                what = (f"model.{field}={dim}" if field and getattr(model_cfg, field) == dim
                        else f"dimension {dim} of {'/'.join(str(getattr(k, 'key', k)) for k in path)}")
                mesh = ", ".join(f"mesh.{a}={sizes[a]}" for a in axes)
                problem = f"{what} does not divide over {mesh} (mesh_rules: {logical!r} -> {entry!r})"
                if problem not in problems:
                    problems.append(problem)
    if problems:
        raise ConfigError("; ".join(problems))
