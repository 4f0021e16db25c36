r"""Pretraining (next-token language modelling) on the embedded default corpus or your own text.

    llm-jax train --config configs/pretrain.py:tiny --workdir runs/pre
    llm-jax train --config configs/pretrain.py:size=bench,steps=20 --workdir runs/bench
    llm-jax train --config configs/pretrain.py:1b --workdir gs://bucket/runs/1b --config.mesh.fsdp=-1

Sizes: `tiny` (a complete run on a laptop CPU in under 3 minutes), `bench` (the CPU throughput benchmark's
fixed shape), `depth<N>` (the one-dial family used by scaling sweeps: N layers of width aspect·N in heads of
head_dim, default 64 and 64; `size=depth4,aspect=32,head_dim=32`), and the
accelerator sizes `125m`, `1b`, `7b`. Continued pretraining starts from such a run: configs/continued_pretrain.py
(a mixture of the new domain and replay of the original corpus, evaluated on each).
"""
from llm_jax.config_lib import parse_arg
from llm_jax.configs_common import base_config, model_from_depth

# name: (model fields, data/optim/train overrides)
_SIZES = {
    "tiny": dict(
        model=dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384, tie_embeddings=True),
        data=dict(seq_len=128, batch_size=16), optim=dict(lr=3e-3, warmup_steps=30),
        train=dict(steps=300, log_every=10, eval_every=100, checkpoint_every=100),
        tokenizer=dict(vocab_size=2048)),
    "bench": dict(
        model=dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=4, d_ff=1024, vocab_size=8192,
                   tie_embeddings=False, dtype="float32"),
        data=dict(seq_len=256, batch_size=8), train=dict(steps=20), tokenizer=dict(vocab_size=8192)),
    "125m": dict(
        model=dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, d_ff=2048, vocab_size=32768,
                   tie_embeddings=True, dtype="bfloat16", remat="dots_attention"),
        data=dict(seq_len=2048, batch_size=256), optim=dict(lr=6e-4, warmup_steps=2000),
        train=dict(steps=50_000, eval_every=1000, checkpoint_every=1000, eval_batches=20), tokenizer=dict(vocab_size=32768)),
    "1b": dict(
        model=dict(n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, d_ff=8192, vocab_size=32768,
                   tie_embeddings=True, dtype="bfloat16", remat="dots_attention"),
        data=dict(seq_len=4096, batch_size=256), optim=dict(lr=3e-4, warmup_steps=2000),
        train=dict(steps=100_000, eval_every=1000, checkpoint_every=1000, eval_batches=20), tokenizer=dict(vocab_size=32768),
        mesh=dict(data=1, fsdp=-1)),
    "7b": dict(
        model=dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=32768,
                   tie_embeddings=False, dtype="bfloat16", remat="full"),
        data=dict(seq_len=4096, batch_size=512), optim=dict(lr=3e-4, warmup_steps=2000),
        train=dict(steps=250_000, eval_every=2000, checkpoint_every=1000, eval_batches=20), tokenizer=dict(vocab_size=32768),
        mesh=dict(data=1, fsdp=-1, tensor=4)),
}


def get_config(arg=None):
    arg = parse_arg(arg, size="tiny", steps=-1, seed=0, aspect=64, head_dim=64)
    config = base_config()
    config.seed = arg.seed
    if arg.size.startswith("depth"):
        config.model.update(model_from_depth(int(arg.size[len("depth"):]), arg.aspect, arg.head_dim))
    elif arg.size in _SIZES:
        for section, fields in _SIZES[arg.size].items():
            config[section].update(fields)
    else:
        raise ValueError(f"unknown pretrain size {arg.size!r}; known: {sorted(_SIZES)} or depth<N>")
    config.model.vocab_size = config.tokenizer.vocab_size
    if arg.steps > 0:
        config.train.steps = arg.steps
    return config
