r"""Where the time of one `bench` train step goes: each part jitted and timed alone, in the same process.

    python experiments/benchmarks/profile_parts.py --config configs/pretrain.py:bench [--config.x=y ...]

Prints one JSON line per part: the median milliseconds, the model FLOPs the part is credited with (the
`scaling/flops.py` convention) and the rate that gives. Parts: the square reference matmul; the model's own
matmul shapes (forward and the two backward products); the full train step; loss+gradients without the
optimizer; the forward alone; the LM head and loss (forward+backward); attention (forward+backward); one
block (forward+backward); the embedding lookup's backward; the optimizer update.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import cli, config_lib, sharding
from llm_jax.kernels.attention import attention
from llm_jax.model.transformer import Block, token_matmul
from llm_jax.objectives import lm
from llm_jax.scaling import flops
from llm_jax.train import hardware
from llm_jax.objectives import get_objective
from llm_jax.train.loop import build_training, validate

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from train_throughput import synthetic_batch  # noqa: E402


def timed(fn, *args, repeats: int = 7) -> float:
    """Median wall milliseconds of an already-jitted call (one compile + one warm-up call first)."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def report(name: str, ms: float, model_flops: float | None = None, **extra) -> None:
    line = dict(part=name, ms=round(ms, 2))
    if model_flops:
        line.update(gflop=round(model_flops / 1e9, 3), gflops_per_s=round(model_flops / ms / 1e6, 1))
    line.update(extra)
    print(json.dumps(line), flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    rest, overrides = cli.split_overrides(argv)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--only", default="", help="comma list of part-name prefixes to run")
    args = parser.parse_args(rest)
    only = [p for p in args.only.split(",") if p]
    want = lambda name: not only or any(name.startswith(p) for p in only)  # noqa: E731

    hardware.tune_host_allocator()  # as the throughput benchmark does, before the backend starts
    config = config_lib.load(args.config, overrides)
    cfg = validate(config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.check_rules(config.mesh_rules)
    b, t = config.data.batch_size, config.data.seq_len
    n_tok, d, v, f, dt = b * t, cfg.d_model, cfg.vocab_size, cfg.d_ff, jnp.dtype(cfg.dtype)
    rng = np.random.default_rng(0)
    rand = lambda *shape: jnp.asarray(rng.standard_normal(shape), dt)  # noqa: E731

    if want("matmul"):
        for m, k, n, label in ((2048, 2048, 2048, "square 2048^3"),
                               (n_tok, d, d, "x@Wq"), (n_tok, d, f, "x@Wgate"), (n_tok, f, d, "h@Wdown"),
                               (n_tok, d, v, "x@Whead"), (n_tok, v, d, "dlogits@Whead^T"),
                               (d, n_tok, v, "x^T@dlogits (dWhead)"), (d, n_tok, f, "x^T@dh (dWgate)")):
            a_mk, b_kn = rand(m, k), rand(k, n)
            report(f"matmul {label}", timed(jax.jit(jnp.matmul), a_mk, b_kn), 2 * m * k * n, shape=[m, k, n])

    training = build_training(config, cfg, mesh, rules, get_objective(config.objective))
    state = training.create_state()
    batch = sharding.global_batch_from_local(synthetic_batch(b, t, v, config.seed), mesh, rules)
    step_flops = flops.training_flops_per_token(cfg, t) * n_tok
    if want("train_step"):
        step = jax.jit(training.train_step.__wrapped__ if hasattr(training.train_step, "__wrapped__")
                       else training.train_step)
        report("train_step (no donation)", timed(step, state, batch), step_flops)

    loss_fn = lm.make_loss_fn(training.model)
    params = state.params
    key = jax.random.PRNGKey(0)
    if want("loss_and_grads"):
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        report("loss_and_grads", timed(grad_fn, params, batch, key), step_flops)
    if want("forward"):
        fwd = jax.jit(loss_fn)
        report("forward (logits+loss)", timed(fwd, params, batch, key), step_flops / 3)
        hidden = jax.jit(lambda p, bt: training.model.apply(p, bt["inputs"], bt["positions"], bt["segment_ids"]))
        report("forward trunk (no head)", timed(hidden, params, batch),
               (step_flops - 6 * d * v * n_tok) / 3)
    if want("optimizer"):
        grads = jax.tree.map(jnp.ones_like, params)
        update = jax.jit(lambda g, s, p: training.optimizer.update(g, s, p))
        report("optimizer update", timed(update, grads, state.opt_state, params))

    if want("head"):
        x_btd = rand(b, t, d)
        w_dv = params["params"]["lm_head"]

        def head_loss(x, w):  # what Transformer.head and lm.make_loss_fn compute
            logits = token_matmul(x, w, preferred_element_type=jnp.float32)
            loss_sum, weight = lm.cross_entropy(logits, batch["targets"], batch["loss_mask"])
            correct = jnp.sum(lm.argmax_hits(logits, batch["targets"]) * batch["loss_mask"])
            return loss_sum, correct
        g = jax.jit(jax.value_and_grad(head_loss, argnums=(0, 1), has_aux=True))
        report("head+loss fwd+bwd", timed(g, x_btd, w_dv), 6 * d * v * n_tok)
        ce_only = jax.jit(jax.value_and_grad(lambda lg: lm.cross_entropy(lg, batch["targets"],
                                                                          batch["loss_mask"])[0]))
        report("cross entropy alone fwd+bwd (on given logits)", timed(ce_only, rand(b, t, v)))

    if want("attention"):
        h, k, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, kk, vv = rand(b, t, h, hd), rand(b, t, k, hd), rand(b, t, k, hd)

        def attn_sum(q, kk, vv):
            out = attention(q, kk, vv, segment_ids_bt=batch["segment_ids"], causal=True, impl=cfg.attention_impl)
            return jnp.sum(out * out)
        g = jax.jit(jax.grad(attn_sum, argnums=(0, 1, 2)))
        report("attention fwd+bwd (one layer)", timed(g, q, kk, vv),
               flops.attention_flops_per_token(cfg, t) * n_tok / cfg.n_layers)
        fwd = jax.jit(attn_sum)
        report("attention fwd (one layer)", timed(fwd, q, kk, vv),
               flops.attention_flops_per_token(cfg, t) * n_tok / cfg.n_layers / 3)

    if want("block"):
        block = Block(cfg, mesh, rules)
        x = rand(b, t, d)
        bp = block.init(key, x, batch["positions"], batch["segment_ids"])
        g = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x, batch["positions"], batch["segment_ids"])),
                             argnums=(0, 1)))
        per_layer = (6 * (4 * d * cfg.n_heads * cfg.head_dim + 3 * d * f) * n_tok
                     + flops.attention_flops_per_token(cfg, t) * n_tok / cfg.n_layers)
        report("block fwd+bwd (one layer)", timed(g, bp, x), per_layer)

    if want("embedding"):
        table = params["params"]["embedding"]
        g = jax.jit(jax.grad(lambda tb: jnp.sum(jnp.take(tb, batch["inputs"], axis=0) ** 2)))
        report("embedding lookup fwd+bwd", timed(g, table))


if __name__ == "__main__":
    main()
