"""`llm-jax import-hf --hf DIR --workdir RUN`: a local Hugging Face checkpoint as an ordinary run directory.

    config.json       the run config: base_config() with config.model mapped field by field from the checkpoint's
                      config.json by its family (model/families/), data.chat_template "hf" (the tokenizer's own)
    tokenizer/        the checkpoint's tokenizer files (tokenizer.json, tokenizer_config.json, chat template, ...)
    checkpoints/0/    the params (orbax), so every stage starts from the run with `train.init_from`, unchanged
    import.json       where it came from: the source path, every file's sha256, the tensor count and timings

Everything is checked before anything is written: the architecture and every config field the trunk cannot run
(named with its value), every tensor's presence, shape and dtype, the tokenizer against the embedding. Tensors
are then streamed from the memory-mapped safetensors straight onto the run's mesh (`config.mesh`, overridable as
for training): each device's block of a param is read alone (`weights.TensorMap.hf_block`) and placed, so the host
holds the params once plus one block, never the whole model twice (peak RSS 1.48× the checkpoint for a 1B Llama on
FSDP 4 × tensor 2: experiments/benchmarks/README.md). Params keep the checkpoint's dtype unless
`model.param_dtype` is overridden. With `--config.model.base_quant=nf4` (or int8) the projections are quantized as
they are read (model/quant.py): the run holds the quantized base, and a QLoRA stage started from it carries the
codes as they are.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from llm_jax import runs, sharding
from llm_jax.configs_common import base_config
from llm_jax.data.hf_tokenizer import HFTokenizer
from llm_jax.data.tokenizer import check_vocab
from llm_jax.files import file_sha256
from llm_jax.hf import weights
from llm_jax.hf.safetensors_io import CheckpointFilesError, SafetensorsReader
from llm_jax.model import quant
from llm_jax.model.config import ModelConfig
from llm_jax.model.families import family_of_hf
from llm_jax.model.transformer import Transformer
from llm_jax.train.checkpoint import checkpoint_dir

IMPORT_RECORD = "import.json"
# Tensors some checkpoints carry that are derived, not learned: skipped.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)
SAVE_CONCURRENT_GB = 1
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class HFImportError(ValueError):
    """A checkpoint that cannot be imported (named with the file, tensor or field and its value)."""


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointFilesError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint directory)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointFilesError(f"{path}: unreadable ({e})") from e


def run_config(hf_dir: str, hf: dict, overrides=()) -> ml_collections.ConfigDict:
    """The run config of an import: the family's mapping of config.json into base_config(), then `overrides`."""
    from llm_jax.config_lib import apply_overrides
    source = os.path.join(hf_dir, "config.json")
    family = family_of_hf(hf, source)
    config = base_config()
    config.model.update(family.from_hf(hf, source), family=family.name,
                        max_seq_len=int(hf.get("max_position_embeddings") or 0))
    dtype = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise CheckpointFilesError(f"{source}: dtype={dtype!r} is not supported (float32, bfloat16, float16)")
    config.model.param_dtype = dtype
    config.data.seq_len = int(hf.get("max_position_embeddings") or config.data.seq_len)
    config.data.chat_template = "hf"
    config.tokenizer.path = ""
    config.objective = "lm"
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, sequence=1))
    apply_overrides(config, list(overrides))
    return config


def _sources(cfg: ModelConfig, flat: dict) -> dict:
    """Our param path → (HF names, one per stacked layer or a single one, the map)."""
    out = {}
    by_global = {m.path: m for m in weights.global_maps(cfg)}
    by_layer = {m.path: m for m in weights.layer_maps(cfg)}
    for path in flat:
        if path in by_global:
            out[path] = ([by_global[path].hf], by_global[path], False)
        elif path[0] == "blocks" and path[1:] in by_layer:
            m = by_layer[path[1:]]
            out[path] = ([m.hf.format(i=i) for i in range(cfg.n_layers)], m, True)
        elif path[0].startswith("block_") and path[1:] in by_layer:
            m = by_layer[path[1:]]
            out[path] = ([m.hf.format(i=int(path[0][len("block_"):]))], m, False)
        else:
            raise HFImportError(f"param {'/'.join(path)} has no tensor in a {cfg.family} checkpoint")
    return out


def _check_tensors(reader: SafetensorsReader, cfg: ModelConfig, sources: dict, flat: dict) -> int:
    """Every expected tensor present with the right shape and a float dtype, no tensor left unread; returns the
    bytes of the tensors to read."""
    expected, n_bytes = set(), 0
    for path, (names, m, stacked) in sources.items():
        want = flat[path].shape[1:] if stacked else flat[path].shape
        hf_shape = _hf_shape(m, want)
        for name in names:
            expected.add(name)
            shape, dtype = reader.shape_dtype(name)
            if shape != tuple(hf_shape):
                raise HFImportError(f"{reader.directory}: tensor {name!r} has shape {list(shape)}, expected "
                                   f"{list(hf_shape)} from config.json")
            if dtype not in _DTYPES:
                raise HFImportError(f"{reader.directory}: tensor {name!r} has dtype {dtype}; expected one of "
                                   f"{sorted(_DTYPES)}")
            n_bytes += int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
    extra = sorted(n for n in reader.shard_of if n not in expected and not n.endswith(_DERIVED_SUFFIXES)
                   and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if extra:
        raise HFImportError(f"{reader.directory}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not part of a "
                           f"{cfg.family} model as config.json describes it")
    return n_bytes


def _hf_shape(m: weights.TensorMap, ours: tuple) -> tuple:
    """The HF shape of one of our shapes, without allocating it (the maps are reshapes and transposes)."""
    return jax.eval_shape(lambda x: m.to_hf(x), jax.ShapeDtypeStruct(ours, np.float32)).shape


def _load_param(reader, names, m: weights.TensorMap, stacked: bool, target) -> jax.Array:
    """One param placed shard by shard: each device's block is read alone from the safetensors (`hf_block`), so
    no full host copy of the param is made; a map without blocks reads the tensor whole, one layer at a time."""
    dtype = np.dtype(target.dtype)

    def block(name: str, index: tuple) -> np.ndarray:
        found = m.hf_block(index) if m.hf_block is not None else None
        if found is None:
            return m.to_ours(reader.read(name))[index].astype(dtype)
        hf_index, to_ours = found
        return np.ascontiguousarray(to_ours(reader.read_block(name, hf_index))).astype(dtype, copy=False)

    def shard(index) -> np.ndarray:
        index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, target.shape))
        if not stacked:
            return block(names[0], index)
        layers = range(index[0].start, index[0].stop)
        return np.stack([block(names[i], index[1:]) for i in layers]) if layers else np.empty(
            [s.stop - s.start for s in index], dtype)

    sharding = target.sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.make_array_from_callback(target.shape, sharding, shard)


def _quantizer(cfg: ModelConfig, mesh, rules):
    """(path, full-precision tensor) → the tensor as the model of `cfg` stores it: quantized (placed on the
    shardings of its parts) where `cfg.base_quant` quantizes that projection, else as it is."""
    if quant.settings(cfg) is None:
        return lambda path, value: value
    abstract = runs.abstract_params(Transformer(cfg, mesh, rules), mesh, rules, init_method=Transformer.logits)
    stored = traverse_util.flatten_dict(abstract["params"], is_leaf=lambda _, node: quant.is_quantized(node))

    def convert(path, value):
        if path[-1] not in quant.QUANTIZED:
            return value
        shardings = jax.tree.map(lambda a: a.sharding, stored[path])
        return jax.jit(lambda w: quant.quantize_tree({path[-1]: w}, cfg)[path[-1]], out_shardings=shardings)(value)
    return convert


def import_hf(hf_dir: str, workdir: str, overrides=()) -> dict:
    """Imports `hf_dir` into `workdir` (see the module docstring); returns the summary also in import.json.

    A workdir that already holds a finished import of the same files returns its summary; of other files, an
    error. Nothing is written before every check has passed."""
    t0 = time.perf_counter()
    hf_dir = os.path.abspath(hf_dir)
    hf = read_hf_config(hf_dir)
    config = run_config(hf_dir, hf, overrides)
    cfg = ModelConfig.from_config(config.model)
    tokenizer = HFTokenizer.load(hf_dir)
    check_vocab(tokenizer, cfg.vocab_size)
    reader = SafetensorsReader(hf_dir)
    files = sorted(set(reader.shard_of.values()))
    record_path = os.path.join(workdir, IMPORT_RECORD)
    if os.path.isfile(record_path):
        with open(record_path, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("source") != hf_dir:
            raise HFImportError(f"{workdir} already holds an import of {previous.get('source')}: use a new --workdir")
        return previous
    if os.path.isdir(checkpoint_dir(workdir)) and os.listdir(checkpoint_dir(workdir)):
        raise HFImportError(f"{workdir} already holds checkpoints: import into a new --workdir")

    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.check_rules(config.mesh_rules)
    # The checkpoint's tensors fill the full-precision model; with model.base_quant each projection is quantized
    # as soon as it is read (`_quantizer`), so at most one full-precision tensor is held beside the codes.
    full_cfg = dataclasses.replace(cfg, base_quant="none")
    abstract = runs.abstract_params(Transformer(full_cfg, mesh, rules), mesh, rules, init_method=Transformer.logits)
    flat = traverse_util.flatten_dict(abstract["params"])
    sources = _sources(cfg, flat)
    n_bytes = _check_tensors(reader, cfg, sources, flat)
    quantized = _quantizer(cfg, mesh, rules)
    t_checked = time.perf_counter()

    params = traverse_util.unflatten_dict({path: quantized(path, _load_param(reader, names, m, stacked, flat[path]))
                                           for path, (names, m, stacked) in sources.items()})
    t_loaded = time.perf_counter()

    # At most SAVE_CONCURRENT_GB in flight while writing: orbax copies what it writes, and by default all of it
    # at once (one more copy of the model at the import's peak). The tokenizer goes to <workdir>/tokenizer/.
    runs.write_run(workdir, config, {"params": params}, tokenizer, save_concurrent_gb=SAVE_CONCURRENT_GB)
    t_written = time.perf_counter()
    summary = dict(
        source=hf_dir, family=cfg.family, architecture=(hf.get("architectures") or [None])[0],
        files={name: file_sha256(os.path.join(hf_dir, name)) for name in files + ["config.json"]},
        tokenizer_sha256=tokenizer.sha256, tensors=len(reader.shard_of), bytes=n_bytes,
        params=int(sum(np.prod(a.shape) for a in flat.values())),
        mesh=dict(mesh.shape), param_dtype=cfg.param_dtype, base_quant=quant.describe(cfg),
        seconds=dict(check=round(t_checked - t0, 3), load=round(t_loaded - t_checked, 3),
                     save=round(t_written - t_loaded, 3)),
        gb_per_s=round(n_bytes / 1e9 / max(t_loaded - t_checked, 1e-9), 3))
    with open(record_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary
