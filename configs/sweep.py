r"""Scaling sweeps of pretraining runs on the embedded corpus (llm_jax/scaling/sweep.py), and what they feed:

    llm-jax sweep --config configs/sweep.py:isoflop --workdir runs/sweep [--dry-run]
    llm-jax scaling-fit runs/sweep/results.csv --approach 2        # IsoFLOP parabolas
    llm-jax scaling-fit runs/sweep/results.csv --n-col N_total      # Approach 3, Chinchilla's N

Presets:
    isoflop   the CPU sweep of experiments/scaling_laws/: compute budgets 1, 2, 4, 8 · 10¹² FLOPs × the depth dial
              1–6 (depth L: L layers of width 32·L, heads of 32; 13 k to 2.7 M non-embedding parameters), each run
              D = C / (exact FLOPs per token) tokens (24 runs; runs outside 50–16,000 steps would be left out)
    grid      the same sizes (depth 1–5) × 0.25, 0.5, 1, 2 M training tokens (for Kaplan's L(N, D))
    smoke     two toy sizes × two token budgets of a few steps each (the tests' sweep)

Any field can be overridden: `--config.budgets='(5e11,1e12)' --config.sizes='(2,3,4)'`.
"""
import ml_collections

from llm_jax.config_lib import parse_arg

_PRESETS = {
    "isoflop": dict(mode="isoflop", sizes=(1, 2, 3, 4, 5, 6), budgets=(1e12, 2e12, 4e12, 8e12), max_steps=16000),
    "grid": dict(mode="tokens", sizes=(1, 2, 3, 4, 5), budgets=(2.5e5, 5e5, 1e6, 2e6)),
    "smoke": dict(mode="tokens", sizes=(1, 2), budgets=(1536, 3072), min_steps=4, evals=2, checkpoints=1,
                  size_arg="size=depth{size},aspect=16,head_dim=16",
                  overrides=("tokenizer.vocab_size=512", "model.vocab_size=512", "data.seq_len=32",
                             "data.batch_size=8", "train.log_every=2", "train.eval_batches=2",
                             "train.progress_bar=False")),
}


def get_config(arg=None):
    arg = parse_arg(arg, preset="isoflop")
    if arg.preset not in _PRESETS:
        raise ValueError(f"unknown sweep preset {arg.preset!r}; known: {sorted(_PRESETS)}")
    c = ml_collections.ConfigDict(dict(
        base="configs/pretrain.py",   # the training config every run is
        size_arg="size=depth{size},aspect=32,head_dim=32",  # its argument for one value of the size dial
        size_label="depth{size}",     # the size's part of a run's name
        sizes=(1, 2, 3, 4, 5),
        mode="isoflop",               # isoflop: budgets are training FLOPs | tokens: budgets are training tokens
        budgets=(1e12, 2e12, 4e12, 8e12),
        flops_per_token="exact",      # isoflop: D = C / exact FLOPs per token | 6N: D = C / (6·N_total)
        min_steps=50, max_steps=0,    # runs outside [min_steps, max_steps] are left out (max 0: no limit)
        warmup_fraction=0.1,          # of each run's steps (0: the base config's optim.warmup_steps)
        evals=4,                      # held-out evaluations per run, the last at its final step
        checkpoints=2,                # checkpoints per run (where a stopped run resumes)
        overrides=("data.batch_size=8", "optim.lr=2e-3", "train.log_every=50", "train.progress_bar=False"),
        tokenizer="",                 # a sentencepiece model every run uses; empty: train one into the workdir
        cache_dir="",                 # the tokenized corpus every run reads; empty: <workdir>/data
        seed=0,
        processes=1,                  # runs trained at once, each in its own process (1: one after another, here)
    ))
    c.update(_PRESETS[arg.preset])
    return c
