"""LoRA: adapters that start as no-ops, merge exactly, train alone, count right and shard like their weights."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from llm_jax import sharding
from llm_jax.configs_common import base_config
from llm_jax.model import lora
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import KVCache, Transformer, dropout_rngs
from llm_jax.objectives.lm import cross_entropy
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.state import create_state, state_shardings
from llm_jax.train.step import make_eval_step, make_train_step

ALL = "wq,wk,wv,wo,w_gate,w_up,w_down"
CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=128)


def _cfg(**kw):
    return ModelConfig(**{**CFG.__dict__, "lora_rank": 4, "lora_alpha": 8.0, **kw})


@functools.lru_cache(maxsize=None)
def _init(cfg, key=0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(lambda k: nn.unbox(Transformer(cfg).init(k, tokens, method=Transformer.logits)))(
        jax.random.key(key))


def _randomize_adapters(params, key=5):
    """B starts at zero; give A and B values so the adapters do something."""
    trainable, frozen = lora.split(params)
    leaves, treedef = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    leaves = [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return lora.combine(jax.tree.unflatten(treedef, leaves), frozen)


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens, rng=None):
    return Transformer(cfg).apply(params, tokens, method=Transformer.logits, rngs=dropout_rngs(rng))


TOKENS = jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)


@pytest.mark.parametrize("override, message", [
    (dict(lora_rank=-1), "lora_rank must be >= 0 .* got -1"),
    (dict(lora_alpha=0.0), "lora_alpha must be positive, got 0.0"),
    (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(lora_targets="wq,wz"), r"lora_targets='wq,wz' must be .*; unknown: \['wz'\]"),
    (dict(lora_targets="wq,wq"), "lora_targets='wq,wq' must be a comma-separated subset"),
])
def test_bad_lora_fields_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**override).validate()
    config = base_config().model
    config.update(override)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_config(config)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_fresh_adapters_keep_the_plain_models_params_and_outputs(scan_layers):
    plain_cfg, cfg = CFG.__class__(**{**CFG.__dict__, "scan_layers": scan_layers}), _cfg(scan_layers=scan_layers,
                                                                                          lora_targets=ALL)
    plain, params = _init(plain_cfg), _init(cfg)
    adapters, base = lora.split(params)
    # the base part is exactly the plain model's tree, and the same key gives it the same values
    assert jax.tree.structure(base) == jax.tree.structure(plain)
    jax.tree.map(np.testing.assert_array_equal, base, plain)
    assert all(np.all(b == 0) for path, b in jax.tree_util.tree_leaves_with_path(adapters) if path[-1].key == "b")
    np.testing.assert_array_equal(_logits(cfg, params, TOKENS), _logits(plain_cfg, plain, TOKENS))


def test_adapter_shapes_and_logical_axes():
    cfg = _cfg(lora_targets=ALL, lora_rank=3)
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                                         method=Transformer.logits))
    specs = nn.get_partition_spec(boxed)["params"]["blocks"]
    shapes = jax.tree.map(jnp.shape, nn.unbox(boxed))["params"]["blocks"]
    d, h, k, hd, f = 64, 4, 2, 16, 128
    assert shapes["attn"]["wq_lora"] == {"a": (2, d, 3), "b": (2, 3, h, hd)}
    assert shapes["attn"]["wk_lora"] == {"a": (2, d, 3), "b": (2, 3, k, hd)}
    assert shapes["attn"]["wo_lora"] == {"a": (2, h, hd, 3), "b": (2, 3, d)}
    assert shapes["mlp"]["w_down_lora"] == {"a": (2, f, 3), "b": (2, 3, d)}
    # A shards like W's input, B like W's output; the rank axis is its own (replicated) logical axis
    assert tuple(specs["attn"]["wq_lora"]["a"]) == ("layers", "embed", "lora_rank")
    assert tuple(specs["attn"]["wq_lora"]["b"]) == ("layers", "lora_rank", "heads", "head_dim")
    assert tuple(specs["attn"]["wo_lora"]["a"]) == ("layers", "heads", "head_dim", "lora_rank")
    assert tuple(specs["mlp"]["w_up_lora"]["b"]) == ("layers", "lora_rank", "mlp")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_merged_weights_give_the_adapted_models_logits(scan_layers):
    cfg = _cfg(scan_layers=scan_layers, lora_targets=ALL)
    params = _randomize_adapters(_init(cfg))
    adapted = _logits(cfg, params, TOKENS)
    merged = lora.merge(params, cfg)
    plain_cfg = lora.without_lora(cfg)
    assert jax.tree.structure(merged) == jax.tree.structure(lora.without_adapters(params))
    np.testing.assert_allclose(_logits(plain_cfg, merged, TOKENS), adapted, rtol=1e-5, atol=1e-5)
    # and the adapters did change the function
    assert not np.allclose(adapted, _logits(plain_cfg, lora.without_adapters(params), TOKENS), atol=1e-3)


def test_dropout_only_with_a_dropout_rng_and_a_positive_rate():
    rng = jax.random.key(9)
    on = _cfg(lora_dropout=0.5)
    params = _randomize_adapters(_init(on))
    deterministic = _logits(on, params, TOKENS)
    assert dropout_rngs(None) == {}  # what the eval step's rng=None gives the model
    dropped = _logits(on, params, TOKENS, rng)
    assert not np.allclose(dropped, deterministic, atol=1e-4)
    np.testing.assert_array_equal(_logits(on, params, TOKENS, rng), dropped)  # same key, same masks
    off = _cfg(lora_dropout=0.0)
    np.testing.assert_array_equal(_logits(off, params, TOKENS, rng), deterministic)


def test_dropout_under_remat_and_scan_gives_the_same_gradients():
    rng = jax.random.key(2)
    plain_cfg, remat_cfg = _cfg(lora_dropout=0.3), _cfg(lora_dropout=0.3, remat="full")
    params = _randomize_adapters(_init(plain_cfg))
    trainable, frozen = lora.split(params)

    def loss(cfg, p):
        return jnp.mean(_logits(cfg, lora.combine(p, frozen), TOKENS, rng) ** 2)
    want, want_grads = jax.jit(jax.value_and_grad(lambda p: loss(plain_cfg, p)))(trainable)
    got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(remat_cfg, p)))(trainable)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got_grads, want_grads)


def test_kv_cache_path_with_adapters_matches_the_full_forward():
    cfg = _cfg(lora_targets=ALL)
    model = Transformer(cfg)
    prefill = jax.jit(lambda p, t, c: model.apply(p, t, cache=c, prefill=True))
    decode = jax.jit(lambda p, t, c: model.apply(p, t, cache=c))
    head = jax.jit(lambda p, h: model.apply(p, h, method=Transformer.head))
    params = _randomize_adapters(_init(cfg))
    full = _logits(cfg, params, TOKENS)
    n = 8
    hidden, cache = prefill(params, TOKENS[:, :n], KVCache.zeros(cfg, 2, 16)._replace(lengths=jnp.full((2,), n)))
    np.testing.assert_allclose(head(params, hidden), full[:, :n], atol=1e-5)
    for t in range(n, TOKENS.shape[1]):
        hidden, cache = decode(params, TOKENS[:, t:t + 1], cache)
        np.testing.assert_allclose(head(params, hidden)[:, 0], full[:, t], atol=1e-5)


def test_counts_and_memory_of_the_tiny_model():
    # configs/pretrain.py:tiny: 4 layers, d 128, 4 heads of 32, 2 kv heads, d_ff 384, vocab 2048, tied head
    cfg = ModelConfig(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384, vocab_size=2048,
                      lora_rank=8)
    params = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32),
                                                                   method=Transformer.logits)))
    L, d, h, k, hd, f, V, r = 4, 128, 4, 2, 32, 384, 2048, 8
    base = V * d + L * (d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f + 2 * d) + d
    adapters = L * ((r * d + r * h * hd) + 2 * (r * d + r * k * hd) + (r * h * hd + r * d))  # wq, wk, wv, wo
    assert (base, adapters) == (1_049_728, 28_672)
    counts = lora.count(params)
    assert counts == dict(trainable=adapters, total=base + adapters, trainable_fraction=adapters / (base + adapters))
    assert lora.count(params, lora.trainable_for(cfg)) == counts  # no head: the rule is the adapters alone

    optimizer, _ = make_optimizer(base_config().optim, 10)
    memory = lora.memory_report(params, optimizer)
    assert memory["params_bytes"] == 4 * (base + adapters)
    assert memory["grads_bytes"] == 4 * adapters
    assert 8 * adapters <= memory["opt_state_bytes"] < 8 * adapters + 64  # Adam's m and v, plus step counters
    assert memory["full_params_bytes"] == memory["full_grads_bytes"] == 4 * base
    assert 8 * base <= memory["full_opt_state_bytes"] < 8 * base + 64
    assert memory["total_bytes"] == memory["params_bytes"] + memory["grads_bytes"] + memory["opt_state_bytes"]
    assert lora.memory_report(params, optimizer, grad_accum=4)["grads_bytes"] == 8 * adapters
    assert "training 28,672 of 1,078,400 params (2.66%)" in lora.describe(counts, memory)
    metrics, line = lora.training_report(params, optimizer, lora.trainable_for(cfg))
    assert metrics["n_params_trainable"] == adapters and metrics["memory_grads_bytes"] == 4 * adapters
    assert line == lora.describe(counts, memory)
    assert lora.training_report(params, optimizer, None) == ({}, None)


def test_task_heads_train_beside_the_adapters():
    class Headed(Transformer):
        def setup(self):
            super().setup()
            self.value_head = self.param("value_head", nn.initializers.zeros, (self.cfg.d_model,))

        def value(self, tokens):
            return self(tokens) @ self.value_head

    cfg = _cfg()
    params = jax.eval_shape(lambda: nn.unbox(Headed(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                                              method=Headed.value)))
    mask = lora.trainable_for(cfg)(params)
    assert mask["params"]["value_head"] and mask["params"]["blocks"]["attn"]["wq_lora"]["a"]
    assert not mask["params"]["blocks"]["attn"]["wq"] and not mask["params"]["embedding"]
    assert lora.trainable_mask(params)["params"]["value_head"] is False  # the adapters-only mask
    assert lora.trainable_for(lora.without_lora(cfg)) is None


def _lm_loss(model):
    """Next-token loss whose model takes the step's rng for dropout (the objectives' pattern)."""
    def loss_fn(params, batch, rng):
        logits = model.apply(params, batch["inputs"], method=Transformer.logits, rngs=dropout_rngs(rng))
        loss_sum, weight = cross_entropy(logits, batch["targets"], jnp.ones(batch["targets"].shape))
        return loss_sum, {"weight": weight}
    return loss_fn


def _batch(seed, batch=8, seq=16, vocab=CFG.vocab_size):
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:])


def _training(cfg, mesh, rules, grad_accum=1, **optim):
    """What train/loop.py's build_training assembles, with the optimizer restricted to what trains."""
    model = Transformer(cfg, mesh, rules)
    c = base_config().optim
    c.update(lr=1e-2, warmup_steps=0, grad_accum=grad_accum, **optim)
    optimizer, schedule = make_optimizer(c, 10, trainable=lora.trainable_for(cfg))

    def init_params(key):
        return model.init(key, jnp.zeros((1, 16), jnp.int32), method=Transformer.logits)
    abstract, shardings = state_shardings(init_params, optimizer, mesh, rules)
    batch_sh = sharding.batch_sharding(mesh, rules)
    step = jax.jit(make_train_step(_lm_loss(model), optimizer, schedule, grad_accum),
                   in_shardings=(shardings, batch_sh), out_shardings=(shardings, sharding.replicated(mesh)))
    return init_params, optimizer, shardings, step, batch_sh


def _one_device():
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1])
    return mesh, sharding.check_rules(base_config().mesh_rules)


def test_training_moves_only_the_adapters_and_adam_holds_only_them():
    cfg = _cfg(lora_targets="wq,wo,w_up", lora_dropout=0.1)
    mesh, rules = _one_device()
    init_params, optimizer, shardings, step, batch_sh = _training(cfg, mesh, rules)
    state = create_state(init_params, optimizer, shardings, seed=0)
    before = jax.device_get(state.params)
    mu = state.opt_state[1][0].mu
    assert {tuple(k.key for k in p)[-2:] for p, _ in jax.tree_util.tree_leaves_with_path(mu)} == \
        {(f"{w}_lora", ab) for w in ("wq", "wo", "w_up") for ab in "ab"}
    norms = []
    for i in range(3):
        state, metrics = step(state, jax.device_put(_batch(i), batch_sh))
        norms.append(float(metrics["grad_norm"]))
    after = jax.device_get(state.params)
    adapters_before, base_before = lora.split(before)
    adapters_after, base_after = lora.split(after)
    jax.tree.map(np.testing.assert_array_equal, base_after, base_before)  # bit for bit
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters_after),
                                                         jax.tree.leaves(adapters_before)))
    assert all(np.isfinite(norms)) and norms[0] > 0


def test_starting_from_a_plain_models_params_keeps_them_and_starts_fresh_adapters():
    cfg = _cfg()
    mesh, rules = _one_device()
    init_params, optimizer, shardings, _, _ = _training(cfg, mesh, rules)
    plain = jax.device_get(jax.tree.map(lambda x: x + 1.0, _init(lora.without_lora(cfg), key=3)))  # "pretrained"
    given = jax.device_put(plain, lora.without_adapters(shardings.params))  # as restore_params places them
    state = create_state(init_params, optimizer, shardings, seed=0, params=given)
    adapters, base = lora.split(jax.device_get(state.params))
    jax.tree.map(np.testing.assert_array_equal, base, plain)
    assert all(np.all(b == 0) for path, b in jax.tree_util.tree_leaves_with_path(adapters) if path[-1].key == "b")
    assert np.std(adapters["params"]["blocks"]["attn"]["wq_lora"]["a"]) > 0


def test_gradient_accumulation_stays_exact_with_adapters():
    cfg = _cfg(lora_targets="wq,w_down")
    mesh, rules = _one_device()
    results = []
    for grad_accum in (1, 4):
        init_params, optimizer, shardings, step, batch_sh = _training(cfg, mesh, rules, grad_accum)
        state = create_state(init_params, optimizer, shardings, seed=0)
        state, metrics = step(state, jax.device_put(_batch(0), batch_sh))
        state, metrics = step(state, jax.device_put(_batch(1), batch_sh))  # B != 0 now: A's gradients too
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.params)))
    np.testing.assert_allclose(results[1][:2], results[0][:2], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), results[1][2], results[0][2])


def test_eval_step_is_deterministic():
    cfg = _cfg(lora_dropout=0.5)
    params = _randomize_adapters(_init(cfg))
    batch = _batch(0)
    eval_step = jax.jit(make_eval_step(_lm_loss(Transformer(cfg))))
    loss = eval_step(params, batch)["loss"]
    logits = _logits(cfg, params, batch["inputs"])
    np.testing.assert_allclose(loss, cross_entropy(logits, batch["targets"], jnp.ones((8, 16)))[0], rtol=1e-6)


@pytest.mark.parametrize("base_quant", ["none", "nf4"])
def test_sharded_lora_step_matches_one_device(base_quant):
    """data=2, fsdp=2, tensor=2 against one device, adapters on every projection and dropout on; on a full-precision
    and on an NF4 base (QLoRA: the codes sharded like the weights they replace)."""
    cfg = _cfg(lora_targets=ALL, lora_dropout=0.1, base_quant=base_quant)
    rules = sharding.check_rules(base_config().mesh_rules)
    histories, finals = [], []
    for mesh_axes, devices in ((dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1]),
                               (dict(data=2, fsdp=2, tensor=2, sequence=1), jax.devices())):
        mesh = sharding.make_mesh(mesh_axes, devices)
        init_params, optimizer, shardings, step, batch_sh = _training(cfg, mesh, rules)
        state = create_state(init_params, optimizer, shardings, seed=0)
        history = []
        for i in range(2):
            batch = sharding.global_batch_from_local(_batch(i), mesh, rules)
            state, metrics = step(state, batch)
            history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        histories.append(history)
        finals.append(state)
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)
    sharded = finals[1]
    wq_a = sharded.params["params"]["blocks"]["attn"]["wq_lora"]["a"]
    assert wq_a.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)   # (layers, embed, rank)
    wo_a = sharded.params["params"]["blocks"]["attn"]["wo_lora"]["a"]
    assert wo_a.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None, None)  # (layers, heads, hd, r)
    mu = sharded.opt_state[1][0].mu["params"]["blocks"]["attn"]["wq_lora"]["b"]
    assert mu.sharding.spec == sharded.params["params"]["blocks"]["attn"]["wq_lora"]["b"].sharding.spec
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=5e-4),
                 lora.split(sharded.params)[0], lora.split(finals[0].params)[0])
    if base_quant != "none":
        codes = sharded.params["params"]["blocks"]["mlp"]["w_up"]["codes"]
        assert codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # (layers, embed/2, mlp)
        # the same codes; a scale's mean may differ in its last bit (summed across shards in another order)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0),
                     jax.device_get(lora.split(sharded.params)[1])["params"]["blocks"],
                     jax.device_get(lora.split(finals[0].params)[1])["params"]["blocks"])


def test_optimizer_without_a_rule_is_plain_optax():
    optimizer, _ = make_optimizer(base_config().optim, 10)
    assert isinstance(optimizer, optax.GradientTransformation)


def test_also_train_adds_params_beside_the_adapters_and_freeze_still_wins():
    from llm_jax.train.optimizer import trainable_rule
    cfg = _cfg(lora_targets="wq")
    params = _init(cfg)
    optim = base_config().optim
    optim.also_train = "embedding, final_norm"
    mask = trainable_rule(cfg, optim)(params)["params"]
    assert mask["embedding"] and mask["final_norm"]["scale"] and mask["blocks"]["attn"]["wq_lora"]["a"]
    assert not mask["blocks"]["attn"]["wq"] and not mask["blocks"]["mlp"]["w_up"]
    optim.freeze = "final_norm"
    mask = trainable_rule(cfg, optim)(params)["params"]
    assert mask["embedding"] and not mask["final_norm"]["scale"]
    optim.also_train = "embedding("
    with pytest.raises(ValueError, match=r"optim.also_train: 'embedding\(' is not a regular expression"):
        trainable_rule(cfg, optim)
    optim.also_train, optim.freeze = "embedding", ""
    assert trainable_rule(lora.without_lora(cfg), optim) is None  # without adapters every param trains anyway
