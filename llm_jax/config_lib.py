"""Loading experiment configs: `path/to/config.py:arg` plus `--config.a.b=value` overrides.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`. The argument is either a
bare preset name (`tiny`) or big_vision-style `key=value` pairs (`size=tiny,steps=50`), parsed by
`parse_arg`. Overrides are typed by the field they replace, so `--config.optim.lr=1e-3` stays a float.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config that cannot be loaded, overridden or validated."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses `"tiny"` or `"size=tiny,steps=50"` into a ConfigDict over `defaults`.

    A bare word sets the first default's key (by convention `size`). Values take the type of the default.
    """
    result = ml_collections.ConfigDict(defaults)
    if not arg:
        return result
    first_key = next(iter(defaults)) if defaults else None
    for part in arg.split(","):
        if "=" not in part:
            if first_key is None:
                raise ConfigError(f"config argument {part!r} has no key and the config defines no defaults")
            key, value = first_key, part
        else:
            key, value = part.split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        result[key] = _cast(value, defaults[key], key)
    return result


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `file.py[:arg]` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"llm_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(arg)")
    config = module.get_config(arg or None)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}:get_config returned {type(config).__name__}, expected a ConfigDict")
    return config


def load(config_spec: str, overrides: list[str]) -> ml_collections.ConfigDict:
    """`file.py[:arg]` with `a.b=value` overrides applied: what `llm-jax train` runs, and every stage of a pipeline
    or a sweep."""
    return apply_overrides(load_config(config_spec), overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies `a.b.c=value` strings (the `--config.` prefix already stripped) in order. A `*` segment stands for
    every child that has the rest of the path (`stages.*.extra=...`: each stage's `extra`); none is an error."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form field=value")
        dotted, value = item.split("=", 1)
        if "*" in dotted.split("."):
            _apply_wildcard(config, dotted, value)
            continue
        *parents, leaf = dotted.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node:
                raise ConfigError(f"override {dotted!r}: config has no field {'.'.join(parents[: i + 1])!r}")
            node = node[name]
        if leaf not in node:
            raise ConfigError(f"override {dotted!r}: config has no field {dotted!r}")
        with node.ignore_type():
            node[leaf] = _cast(value, node[leaf], dotted)
    return config


def _apply_wildcard(config, dotted: str, value: str) -> None:
    """`dotted` with its first `*` replaced by each child of that node that has the rest of the path."""
    head, tail = dotted.split(".*", 1) if ".*" in dotted else ("", dotted[1:])
    tail = tail.lstrip(".")
    node = config
    for name in filter(None, head.split(".")):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise ConfigError(f"override {dotted!r}: config has no field {head!r}")
        node = node[name]
    matched = []
    for key, child in node.items():
        try:
            _resolve(child, tail)
        except ConfigError:
            continue
        matched.append(f"{head}.{key}.{tail}" if head else f"{key}.{tail}")
    if not matched:
        raise ConfigError(f"override {dotted!r}: no field of {head or 'the config'!r} has {tail!r}")
    apply_overrides(config, [f"{path}={value}" for path in matched])


def _resolve(node, dotted: str):
    """The value at `dotted` under `node` (a `*` in it matches any child that has the rest); ConfigError if none."""
    first, _, rest = dotted.partition(".")
    if not isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(dotted)
    children = list(node.values()) if first == "*" else [node[first]] if first in node else []
    for child in children:
        try:
            return _resolve(child, rest) if rest else child
        except ConfigError:
            continue
    raise ConfigError(dotted)


def _cast(text: str, current: Any, name: str) -> Any:
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"field {name!r} is a bool; got {text!r}")
    if isinstance(current, int):
        try:
            return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
        except ValueError as e:
            raise ConfigError(f"field {name!r} is an int; got {text!r}") from e
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError as e:
            raise ConfigError(f"field {name!r} is a float; got {text!r}") from e
    if isinstance(current, str) or current is None:
        return text
    try:  # tuples, lists, dicts: a Python literal
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"field {name!r} holds {type(current).__name__}; {text!r} is not a Python literal") from e
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
        return ml_collections.ConfigDict(value)
    return value
