"""AdamW with a weight-decay mask, gradient clipping and the learning-rate schedules of `config.optim`.

An optimizer may train only part of the params (LoRA's adapters, `llm_jax/model/lora.py`, plus whatever
`optim.also_train` names, less whatever `optim.freeze` names): it then carries the rule that picks them
(`trainable_of`), its state is built for those leaves alone (`train/state.py`), and the train step takes gradients
w.r.t. those alone (`train/step.py`). Every other param is frozen.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple

import jax
import optax

from llm_jax.model import lora

SCHEDULES = ("cosine", "wsd", "constant")


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine to `min_lr_ratio·lr`, warmup-stable-decay (a linear cool-down over the last
    `decay_fraction` of training, Hägele et al. 2024), or constant."""
    c = optim_config
    if c.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={c.schedule!r} is not one of {SCHEDULES}")
    warmup = min(c.warmup_steps, total_steps)
    min_lr = c.lr * c.min_lr_ratio
    warm = optax.linear_schedule(0.0, c.lr, max(warmup, 1))
    rest = max(total_steps - warmup, 1)
    if c.schedule == "cosine":
        after = optax.cosine_decay_schedule(c.lr, rest, alpha=c.min_lr_ratio)
    elif c.schedule == "wsd":
        decay = max(int(round(rest * c.decay_fraction)), 1)
        after = optax.join_schedules([optax.constant_schedule(c.lr), optax.linear_schedule(c.lr, min_lr, decay)],
                                     [rest - decay])
    else:
        after = optax.constant_schedule(c.lr)
    return optax.join_schedules([warm, after], [warmup])


def decay_mask(params):
    """Weight decay on matrices only: norm scales (named `scale`) and anything 1-D are left alone."""
    def decays(path, leaf):
        return getattr(path[-1], "key", None) != "scale" and leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(decays, params)


def param_path(path) -> str:
    """A param's path as `optim.freeze` matches it: its dict keys joined by "/" ("params/blocks/mlp/w_up")."""
    return "/".join(lora.path_names(path))


def freeze_patterns(freeze: str, field: str = "optim.freeze") -> tuple[re.Pattern, ...]:
    """`optim.freeze` ("embedding, blocks/mlp"), or another such `field`, as compiled regexes; a clear error for a
    malformed one."""
    patterns = []
    for text in (part.strip() for part in freeze.split(",")):
        if text:
            try:
                patterns.append(re.compile(text))
            except re.error as e:
                raise ValueError(f"{field}: {text!r} is not a regular expression ({e})") from None
    return tuple(patterns)


def _trainable_mask(params, lora_rule, patterns, also):
    base = lora.mask_of(lora_rule, params) if lora_rule is not None else jax.tree.map(lambda _: True, params)

    def trains(path, adapter):
        name = param_path(path)
        return (bool(adapter) or any(p.search(name) for p in also)) and not any(p.search(name) for p in patterns)
    return jax.tree_util.tree_map_with_path(trains, base)


def trainable_rule(model_cfg, optim_config):
    """The rule `params -> bool mask` of what trains: LoRA's adapters and soft prompt with the params whose path
    matches `optim.also_train` (or everything without them), less the params whose path matches `optim.freeze`;
    None when every param trains."""
    lora_rule = lora.trainable_for(model_cfg)
    patterns = freeze_patterns(optim_config.get("freeze", ""))
    also = freeze_patterns(optim_config.get("also_train", ""), "optim.also_train") if lora_rule is not None else ()
    if not patterns and not also:
        return lora_rule
    return functools.partial(_trainable_mask, lora_rule=lora_rule, patterns=patterns, also=also)


class PartialOptimizer(NamedTuple):
    """An optax transformation over the trainable params only (init, update and the trees they see hold just
    those leaves, as cut by `lora.split`), with the rule `params -> bool mask` that picks them."""
    init: Callable
    update: Callable
    trainable: Any


def only(optimizer: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
    """`optimizer` restricted to the params `trainable` marks (a rule or a mask); None: every param."""
    return optimizer if trainable is None else PartialOptimizer(optimizer.init, optimizer.update, trainable)


def trainable_of(optimizer) -> Any:
    """The rule (or mask) of the params an optimizer trains; None: every param."""
    return getattr(optimizer, "trainable", None)


def make_optimizer(optim_config, total_steps: int,
                   trainable=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ clipping) and its schedule; with `trainable` (see `only`), over those params alone."""
    c = optim_config
    schedule = learning_rate_schedule(c, total_steps)
    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask))
    return only(optax.chain(*parts), trainable), schedule
