"""`llm-jax export-hf --run RUN --out DIR`: any run as a checkpoint that transformers and vLLM load.

    config.json              the family's config (model/families/), with the tokenizer's bos/eos/pad ids
    model.safetensors        or model-0000i-of-0000n.safetensors + model.safetensors.index.json past
                             `max_shard_bytes` (1 GiB by default; a tensor is never split)
    generation_config.json   bos, eos (every end-of-turn id) and pad
    tokenizer files          an imported run's own (tokenizer.json, tokenizer_config.json, chat template, ...);
                             a run trained here gets a tokenizer.json that reproduces its sentencepiece ids
                             (data/spm_export.py) and its chat template as jinja

LoRA adapters are merged into their weights first (`lora.merge`), so the export is a plain model. A run with a
soft prompt (`model.prompt_tuning_tokens`, model/prompt_tuning.py) is refused: no Hugging Face checkpoint holds
one, and the model without it is not the model that was trained. Params are
gathered to the host one at a time and written shard by shard (a shard's tensors are held until it is written,
hence the modest default shard size); the tensors keep the run's param dtype unless
`dtype` says otherwise. A non-empty output directory is refused unless `overwrite`.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
from flax import traverse_util

from llm_jax import runs
from llm_jax.hf import weights
from llm_jax.hf.safetensors_io import write_sharded
from llm_jax.model import lora
from llm_jax.train.run_record import read_run_config

DEFAULT_MAX_SHARD_BYTES = 1024 ** 3  # one shard of tensors is held on the host before it is written


class ExportError(ValueError):
    """An export that cannot be written (named with the directory or field)."""


def _host(array) -> np.ndarray:
    return np.asarray(jax.device_get(array))


def _tensors(params: dict, cfg, dtype):
    """(HF name, array) for every tensor, one param gathered to the host at a time."""
    flat = traverse_util.flatten_dict(params["params"])
    for m in weights.global_maps(cfg):
        yield m.hf, m.to_hf(_host(flat[m.path])).astype(dtype)
    for m in weights.layer_maps(cfg):
        if cfg.scan_layers:
            stacked = _host(flat[("blocks",) + m.path])
            for i in range(cfg.n_layers):
                yield m.hf.format(i=i), m.to_hf(stacked[i]).astype(dtype)
            del stacked
        else:
            for i in range(cfg.n_layers):
                yield m.hf.format(i=i), m.to_hf(_host(flat[(f"block_{i}",) + m.path])).astype(dtype)


def hf_config(cfg, run_config, tokenizer) -> dict:
    out = cfg.family_spec.to_hf(cfg)
    out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
               max_position_embeddings=int(cfg.max_seq_len or run_config.data.seq_len), use_cache=True)
    return out


def generation_config(tokenizer, stop_ids) -> dict:
    eos = list(dict.fromkeys([tokenizer.eos_id, *tokenizer.eos_ids, *stop_ids]))
    return dict(bos_token_id=tokenizer.bos_id, eos_token_id=eos if len(eos) > 1 else eos[0],
                pad_token_id=tokenizer.pad_id)


def export_hf(run_dir: str, out_dir: str, *, overwrite: bool = False, dtype: str | None = None,
              step: int | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Writes the run as a Hugging Face checkpoint in `out_dir` (module docstring); returns a summary."""
    from llm_jax.data import chat
    from llm_jax.data.spm_export import write_tokenizer_files

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"--out {out_dir} is not empty: pass --overwrite to replace its contents")
    soft_prompt = read_run_config(run_dir).model.get("prompt_tuning_tokens", 0)
    if soft_prompt:
        raise ExportError(f"run {run_dir} trained a soft prompt (model.prompt_tuning_tokens={soft_prompt}), which a "
                          "Hugging Face checkpoint cannot hold: it cannot be exported")
    run = runs.load_run(run_dir, step=step)
    cfg, params = run.model_cfg, run.params
    if cfg.lora_rank or cfg.base_quant != "none":  # adapters merged into a full-precision (dequantized) base
        params, cfg = lora.merge(params, cfg), lora.merged_config(cfg)
    out_dtype = np.dtype(dtype or cfg.param_dtype)
    template = run.config.data.get("chat_template", chat.DEFAULT_TEMPLATE)
    stop_ids = chat.stop_ids(run.tokenizer, template)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    files = write_sharded(_tensors(params, cfg, out_dtype), out_dir, max_shard_bytes)
    config = hf_config(cfg, run.config, run.tokenizer)
    config.update(dtype=str(out_dtype.name), torch_dtype=str(out_dtype.name))
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config(run.tokenizer, stop_ids), f, indent=2)
    files += ["config.json", "generation_config.json"]
    files += write_tokenizer_files(run.tokenizer, template, out_dir)
    return dict(run=run_dir, out=out_dir, family=cfg.family, files=sorted(files), dtype=out_dtype.name,
                merged_lora=bool(run.model_cfg.lora_rank),
                bytes=sum(os.path.getsize(os.path.join(out_dir, f)) for f in files))
