"""Prompt tuning: a trained soft prompt before every sequence of a frozen model (Lester et al. 2021).

Config (`config.model`, checked by `ModelConfig.validate`)
    prompt_tuning_tokens   P; 0 turns it off: no soft prompt, and every param trains as before

The model (`transformer.Transformer`)
    The param `soft_prompt` (P, d_model), logical axes (None, "embed"), is P rows of an embedding table: the
    model puts them before the embeddings of the T tokens (scaled as token embeddings are, where the family
    scales them) and runs P + T positions, the prompt at positions 0..P-1 and the tokens shifted by P. The
    hidden states and logits it returns are the T tokens' alone, so every loss, the reward model's readout,
    generation and RL see the shapes they see without a soft prompt.
    Packed rows (several sequences per row, `segment_ids`, 0 for padding) hold the prompt once, at the row's
    start, in the segment `kernels.attention.PROMPT_SEGMENT`: every non-padding query sees its keys, the
    prompt's own queries see only the prompt (causally), and sliding windows are measured in positions. A
    segment then attends exactly as it would with the prompt prepended to it alone: the prompt's keys and
    values do not depend on what follows them, and RoPE sees the same distances. The pallas and cudnn kernels
    mask by segment equality, so a packed call runs the xla attention (same maths) instead; unpacked rows (no
    segment ids) need no mask beyond the causal one and keep the configured kernel.

Init
    From the embeddings of P vocabulary tokens drawn uniformly: the paper's "sampled vocab" init (it found the
    init to matter for its smaller models, a random uniform init the worst of its three, the gaps closing at
    its largest size). The prompt starts where token embeddings live, at their scale and in their directions,
    so the frozen layers read it as they read text; a normal init at `init_std` would ignore the scale the
    trained table has. A run that starts from another run (`train.init_from`) draws from that run's trained
    table (`from_given_vocab`, called by `train.state.create_state` with a key from the config seed), not from
    the fresh random one.

What trains
    The soft prompt counts as an adapter (`lora.is_trainable`): `lora.trainable_for` trains it (with the LoRA
    adapters and task heads, where there are any) and freezes the rest; `lora.without_adapters` leaves it out,
    and `lora.without_lora` gives the plain model's config, with no soft prompt.

Runs started from a prompt-tuned run (train/checkpoint.py `start_params`)
    The soft prompt cannot be folded into any weight, so it continues: the new run needs the same
    `prompt_tuning_tokens` and takes it as it was trained (with LoRA or a quantized base as their own rules
    say). Any other value, 0 included, is refused in one line naming the run and the field; so is exporting a
    prompt-tuned run to Hugging Face (`hf/export_hf.py`). An RL reference or a DPO reference is the reference
    run's model as trained: its soft prompt when it has one (a frozen copy), never the policy's own.

Generation (`generate.py`, `continuous_batching.py`)
    Prefill writes the prompt's P keys and values at cache positions 0..P-1 before the tokens'; the cache's
    lengths count them, and its length grows by P.

Cost
    P·d_model trained params; P more positions per row in every forward (not in the FLOP count of
    `scaling/flops.py`, which counts the T tokens).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SOFT_PROMPT = "soft_prompt"  # the param's name, at the top of the model's params


def from_vocab(table_vd, key, n: int):
    """(n, D): the rows of the embedding table of n token ids drawn uniformly from the vocabulary."""
    ids_n = jax.random.randint(key, (n,), 0, table_vd.shape[0])
    return jnp.take(table_vd, ids_n, axis=0)


def from_given_vocab(params, given, key):
    """`params` with a soft prompt drawn (`from_vocab`) from `given`'s embedding table where `params` has a soft
    prompt and `given` (the params a run starts from) has a table but no soft prompt; else `params` as it is."""
    top, given_top = params.get("params", {}), given.get("params", {})
    if SOFT_PROMPT not in top or SOFT_PROMPT in given_top or "embedding" not in given_top:
        return params
    prompt = top[SOFT_PROMPT]
    drawn = from_vocab(given_top["embedding"], key, prompt.shape[0]).astype(prompt.dtype)
    return {**params, "params": {**top, SOFT_PROMPT: drawn}}


def n_tokens(params) -> int:
    """P of a param tree (0 without a soft prompt)."""
    prompt = params.get("params", {}).get(SOFT_PROMPT)
    return 0 if prompt is None else int(prompt.shape[0])
