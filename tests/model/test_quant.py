"""A quantized frozen base (model/quant.py): the numbers against hand-computed values, the quantized matmul
against the dequantized weight's product, what trains, the stages' lineage (quantized once, carried bit for bit,
refused when it would quantize twice), resume, sharding, export and the bad configs."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from run_fixtures import RL_MODEL_OVERRIDES
from llm_jax import runs, sharding, training
from llm_jax.config_lib import ConfigError, load
from llm_jax.configs_common import base_config
from llm_jax.model import lora, quant
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer
from llm_jax.train.checkpoint import CannotStartFrom, restore_params
from llm_jax.train.metrics import read_metrics

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def _cfg(**kw):
    c = base_config().model
    c.update(dict(n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, d_ff=128, vocab_size=128, lora_rank=4,
                  lora_targets="wq,wk,wv,wo,w_gate,w_up,w_down", base_quant="nf4"))
    c.update(kw)
    return ModelConfig.from_config(c)


def _layout(scheme, shape, n_in=1, block=4, double=False, scale_block=256):
    cfg = dataclasses.replace(_cfg(), base_quant=scheme, quant_block=block, quant_double=double,
                              quant_scale_block=scale_block)
    return quant.layout(cfg, "w_up", shape, n_in)


# ------------------------------------------------------------------------------------------------ numerics

def test_nf4_codes_are_the_nearest_level_of_the_code_book_per_block_absmax():
    # one output column, two blocks of 4 inputs: absmax 2 and 0.5
    w = np.array([[2.0], [-2.0], [0.9], [0.3], [0.5], [-0.25], [0.05], [-0.1]], np.float32)
    lay = _layout("nf4", (8, 1))
    parts = quant.quantize(jnp.asarray(w), lay)
    np.testing.assert_array_equal(parts["scales"], [[2.0], [0.5]])
    # w/s: 1, -1, .45, .15 | 1, -.5, .1, -.2 → nearest levels 15, 0, 12 (.4407), 9 (.1609) | 15, 2 (-.525),
    # 8 (.0796), 5 (-.1848)
    codes = [15, 0, 12, 9, 15, 2, 8, 5]
    packed = [codes[i] | (codes[i + 1] << 4) for i in range(0, 8, 2)]  # low nibble: the even input index
    assert parts["codes"].dtype == jnp.uint8 and parts["codes"].shape == (4, 1)
    np.testing.assert_array_equal(np.asarray(parts["codes"])[:, 0], packed)
    want = np.array([NF4[c] for c in codes]) * np.array([2.0] * 4 + [0.5] * 4)
    np.testing.assert_allclose(np.asarray(quant.dequantize(parts, lay))[:, 0], want, rtol=1e-6)


def test_int8_codes_round_w_times_127_5_over_the_block_absmax():
    w = np.array([[1.0, 0.2], [-0.5, -0.4], [0.25, 0.1], [0.1, 0.05]], np.float32)  # one block per column
    lay = _layout("int8", (4, 2))
    parts = quant.quantize(jnp.asarray(w), lay)
    s = np.abs(w).max(axis=0)
    np.testing.assert_allclose(parts["scales"], (s / 127.5)[None], rtol=1e-6)
    codes = np.clip(np.round(w * 127.5 / s), -128, 127)
    _assert_codes(parts["codes"], codes, np.abs(w) == s)
    assert parts["codes"].dtype == jnp.int8
    np.testing.assert_allclose(quant.dequantize(parts, lay), np.asarray(parts["codes"]) * s / 127.5, rtol=1e-6)


def _assert_codes(got, want, at_absmax):
    """Codes equal to the hand values; a block's absmax itself lands on ±127.5, where float rounding decides
    between ±127 and -128."""
    got = np.asarray(got)
    np.testing.assert_array_equal(got[~at_absmax], want[~at_absmax])
    assert set(np.abs(got[at_absmax].astype(int))) <= {127, 128}


def test_blocks_run_along_the_input_and_may_span_input_dims():
    lay = _layout("nf4", (4, 8, 16), n_in=2, block=32)  # like wo (heads, head_dim, d): 2 heads × 16 per block
    assert lay.tiles == (4, 8, 1) and lay.scales_shape == (1, 1, 16) and lay.codes_shape == (4, 4, 16)
    with pytest.raises(ValueError, match=r"quant_block=24 does not divide the input of w_up \(shape \(4, 8, 16\)"):
        _layout("nf4", (4, 8, 16), n_in=2, block=24)


def test_double_quantization_stores_centred_scales_as_int8_with_one_f32_scale_per_block():
    w = jax.random.normal(jax.random.key(0), (64, 8))
    lay = _layout("nf4", (64, 8), block=4, double=True, scale_block=32)  # 16 × 8 scales, blocks of 32
    assert lay.scale_tiles == (4, 8) and lay.scales_scale_shape == (4, 1)
    parts = quant.quantize(w, lay)
    s = np.abs(np.asarray(w).reshape(16, 4, 8)).max(axis=1)  # the first-level scales
    mean = s.mean()
    np.testing.assert_allclose(parts["scales_mean"], mean, rtol=1e-6)
    centred = (s - mean).reshape(4, 4, 8)
    s2 = np.abs(centred).max(axis=(1, 2)) / 127.5
    np.testing.assert_allclose(np.asarray(parts["scales_scale"])[:, 0], s2, rtol=1e-6)
    want = np.clip(np.round(centred / s2[:, None, None]), -128, 127)
    _assert_codes(np.asarray(parts["scales"]).reshape(4, 4, 8), want,
                  np.abs(centred) == np.abs(centred).max(axis=(1, 2), keepdims=True))
    decoded = np.asarray(quant.scales_of(parts, lay))
    assert np.abs(decoded - s).max() <= s2.max() / 2 + 1e-6
    # 4-bit codes + 8-bit scales per 4 weights + f32 per 32 scales
    assert parts["scales"].dtype == jnp.int8 and parts["codes"].dtype == jnp.uint8


def test_second_level_blocks_take_what_the_scale_axes_allow():
    assert quant._scale_tiles((64, 32, 128), 256) == (1, 2, 128)
    assert quant._scale_tiles((2, 4, 32), 256) == (2, 4, 32)
    assert quant._scale_tiles((172, 96), 256) == (1, 32)  # gcd(96, 256): 32 scales per second-level scale


def test_the_quantized_matmul_is_the_dequantized_weights_product_and_its_gradient():
    lay = _layout("nf4", (32, 4, 8), block=16, double=True)
    parts = quant.quantize(jax.random.normal(jax.random.key(1), (32, 4, 8)), lay)
    x = jax.random.normal(jax.random.key(2), (2, 3, 32))
    w = quant.dequantize(parts, lay)
    dense = lambda x: jnp.einsum("btd,dhk->bthk", x, w)  # noqa: E731
    np.testing.assert_allclose(quant.matmul(x, parts, lay), dense(x), rtol=1e-5, atol=1e-6)
    g = jax.random.normal(jax.random.key(3), (2, 3, 4, 8))
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(quant.matmul(x, parts, lay) * g))(x),
                               jax.grad(lambda x: jnp.sum(dense(x) * g))(x), rtol=1e-5, atol=1e-5)


def test_the_backward_keeps_codes_not_a_dequantized_weight():
    """Under a scanned stack, autodiff of x·deq(W) would keep every layer's dequantized W for the backward; the
    custom gradient keeps the codes (jax.linearize's residuals are what the backward holds)."""
    lay = _layout("nf4", (256, 256), block=64)
    parts = quant.quantize(jax.random.normal(jax.random.key(0), (256, 256)), lay)
    x = jnp.ones((1, 4, 256))
    _, f_jvp = jax.linearize(lambda x: quant.matmul(x, parts, lay), x)
    residuals = [r for r in jax.tree.leaves(f_jvp) if hasattr(r, "shape")]
    assert not any(r.shape == (256, 256) and jnp.issubdtype(r.dtype, jnp.floating) for r in residuals)


# ------------------------------------------------------------------------------------------------ the model

def _tokens(n=12):
    return (np.arange(n, dtype=np.int32)[None] * 7) % 128


def test_a_quantized_model_is_its_dequantized_weights_model_and_only_adapters_train():
    cfg = _cfg()
    model = Transformer(cfg)
    params = nn.unbox(model.init(jax.random.key(0), _tokens(), method=Transformer.logits))
    keys = iter(jax.random.split(jax.random.key(1), 64))
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(next(keys), x.shape) if lora.is_trainable(p) else x, params)
    merged = lora.merge(params, cfg)  # dequantized and merged: the full-precision model
    plain = Transformer(lora.merged_config(cfg))
    np.testing.assert_allclose(model.apply(params, _tokens(), method=Transformer.logits),
                               plain.apply(merged, _tokens(), method=Transformer.logits), atol=2e-5)
    wq = params["params"]["blocks"]["attn"]["wq"]
    assert set(wq) == {"codes", "scales", "scales_scale", "scales_mean"}
    assert wq["codes"].shape == (2, 32, 2, 32) and wq["codes"].dtype == jnp.uint8
    rule = lora.trainable_for(cfg)
    trained, frozen = lora.split(params, rule(params))
    assert all(lora.is_trainable(p) for p, _ in jax.tree_util.tree_leaves_with_path(trained))
    grads = jax.grad(lambda t: model.apply(lora.combine(t, frozen), _tokens(), method=Transformer.logits).sum())(
        trained)
    assert jax.tree.structure(grads) == jax.tree.structure(trained)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    counts = lora.count(params, rule)
    assert counts["total"] == lora.count(merged, None)["total"] + counts["trainable"]  # codes count as weights


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_sharded_quantized_model_equals_one_device(scheme):
    cfg = _cfg(base_quant=scheme, n_kv_heads=2)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, sequence=1)))
    from llm_jax.configs_common import DEFAULT_RULES
    rules = sharding.check_rules(DEFAULT_RULES)
    single = Transformer(cfg)
    params = nn.unbox(single.init(jax.random.key(0), _tokens(), method=Transformer.logits))
    sharded_model = Transformer(cfg, mesh, rules)
    abstract = runs.abstract_params(sharded_model, mesh, rules, init_method=Transformer.logits)
    placed = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)
    wq_codes = abstract["params"]["blocks"]["attn"]["wq"]["codes"]
    assert wq_codes.sharding.spec[1] == "fsdp"  # sharded like the weight it replaces
    tokens = np.tile(_tokens(16), (4, 1))
    np.testing.assert_allclose(jax.jit(lambda p, t: sharded_model.apply(p, t, method=Transformer.logits))(placed, tokens),
                               single.apply(params, tokens, method=Transformer.logits), atol=2e-5)


# ------------------------------------------------------------------------------------------------ stages

QUANT = ["model.lora_rank=4", "model.lora_targets=wq,wk,wv,wo,w_gate,w_up,w_down", "model.base_quant=nf4",
         "model.quant_block=32"]
STAGE = ["data.batch_size=8", "mesh.data=4", "mesh.fsdp=2", "train.steps=4", "train.log_every=1", "train.eval_every=100",
         "train.checkpoint_every=2", "train.eval_batches=1", "optim.warmup_steps=0", "optim.lr=3e-3"]


def _sft(pretrained, small_tokenizer, *extra):
    return load("configs/sft.py:tiny", RL_MODEL_OVERRIDES + STAGE + [
        f"train.init_from={pretrained}", f"tokenizer.path={small_tokenizer}", *extra])


def _checkpoint(workdir, step):
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]


def _same_codes(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if np.issubdtype(a.dtype, np.integer):
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _base(params):
    return lora.without_adapters(params)


@pytest.fixture(scope="module")
def qlora_sft(pretrained, small_tokenizer, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("quant") / "sft")
    training.run(_sft(pretrained, small_tokenizer, *QUANT), workdir)
    return workdir


def test_a_qlora_stage_quantizes_its_start_once_and_trains_only_the_adapters(qlora_sft, pretrained):
    cfg = runs.load_run(qlora_sft).model_cfg
    full = restore_params(pretrained, runs.abstract_params(Transformer(lora.merged_config(cfg)),
                                                           init_method=Transformer.logits))
    expected = quant.quantize_tree(full, cfg)
    saved = [_base(_checkpoint(qlora_sft, step)) for step in (2, 4)]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), *saved)  # frozen
    # quantized from the start (on the run's mesh, where a mean may differ in its last bit from one device's)
    jax.tree.map(_same_codes, saved[0], _base(expected))
    adapters = lora.split(_checkpoint(qlora_sft, 4))[0]
    assert any(float(np.abs(b).max()) > 0 for b in jax.tree.leaves(adapters))  # B moved off zero
    losses = [m["loss"] for m in read_metrics(qlora_sft) if "loss" in m]
    assert losses[-1] < losses[0]
    first = read_metrics(qlora_sft)[0]
    assert first["n_params_trainable"] < first["n_params"]


def test_a_qlora_stage_resumes_bit_for_bit(qlora_sft, pretrained, small_tokenizer, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(qlora_sft, cut)
    shutil.rmtree(cut / "checkpoints" / "4")  # stopped before its last save: resumes from step 2
    with open(cut / "metrics.jsonl") as f:
        kept = [line for line in f if json.loads(line).get("step", 0) <= 2]
    (cut / "metrics.jsonl").write_text("".join(kept))
    training.run(_sft(pretrained, small_tokenizer, *QUANT), str(cut))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 _checkpoint(cut, 4), _checkpoint(qlora_sft, 4))


def test_the_next_qlora_stage_carries_the_codes_and_continues_the_adapters(qlora_sft, small_tokenizer, tmp_path):
    config = load("configs/reward.py:tiny", RL_MODEL_OVERRIDES + STAGE + QUANT + [
        f"train.init_from={qlora_sft}", f"tokenizer.path={small_tokenizer}", "train.steps=2"])
    workdir = str(tmp_path / "rm")
    training.run(config, workdir)
    start, sft = _checkpoint(workdir, 2), _checkpoint(qlora_sft, 4)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 quant_parts(start), quant_parts(sft))
    # another quantization of the same run would quantize quantized weights
    config = load("configs/reward.py:tiny", RL_MODEL_OVERRIDES + STAGE + QUANT + [
        f"train.init_from={qlora_sft}", f"tokenizer.path={small_tokenizer}", "model.base_quant=int8"])
    with pytest.raises(CannotStartFrom, match=r"holds a base already quantized \(nf4, blocks of 32.*\); "
                                              r"model.base_quant=int8 .* would quantize it again"):
        training.run(config, str(tmp_path / "rm_int8"))
    assert not os.path.exists(tmp_path / "rm_int8" / "checkpoints")


def quant_parts(params):
    """The quantized projections' parts alone."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = lora.path_names(path)
        if names[-1] in quant.PARTS:
            out["/".join(names)] = leaf
    return out


def test_a_full_precision_stage_from_a_qlora_run_and_export_get_the_merged_dequantized_model(qlora_sft, tmp_path):
    run = runs.load_run(qlora_sft)
    plain = Transformer(lora.merged_config(run.model_cfg))
    restored = restore_params(qlora_sft, runs.abstract_params(plain, init_method=Transformer.logits))
    tokens = _tokens(16) % run.model_cfg.vocab_size
    want = run.model.apply(run.params, tokens, method=Transformer.logits)
    np.testing.assert_allclose(plain.apply(restored, tokens, method=Transformer.logits), want, atol=5e-5)
    from llm_jax.hf.export_hf import export_hf
    from llm_jax.hf.safetensors_io import SafetensorsReader
    summary = export_hf(qlora_sft, str(tmp_path / "hf"))
    assert summary["merged_lora"] and summary["dtype"] == "float32"
    reader = SafetensorsReader(str(tmp_path / "hf"))
    q_proj = reader.read("model.layers.0.self_attn.q_proj.weight")
    np.testing.assert_allclose(q_proj.T.reshape(restored["params"]["blocks"]["attn"]["wq"][0].shape),
                               restored["params"]["blocks"]["attn"]["wq"][0], atol=1e-6)


def test_generation_from_a_quantized_run_is_its_forward_passes_argmax(qlora_sft):
    from llm_jax.generate import SamplingConfig, generate
    run = runs.load_run(qlora_sft)
    prompts = np.array([[1, 5, 9, 2]], np.int32)
    out = generate(run.model, run.params, prompts, np.array([4]), jax.random.key(0),
                   SamplingConfig(max_new_tokens=3, temperature=0.0))
    tokens = list(prompts[0])
    for new in np.asarray(out.tokens)[0][:3]:
        logits = run.model.apply(run.params, np.array([tokens], np.int32), method=Transformer.logits)
        assert new == int(np.argmax(logits[0, -1]))
        tokens.append(int(new))


@pytest.mark.parametrize("overrides, message", [
    (["model.base_quant=fp4"], r"model config: base_quant='fp4' is not one of none, int8, nf4"),
    (["model.base_quant=nf4", "model.lora_rank=4", "model.quant_block=48"],
     r"model config: quant_block=48 does not divide the input of wq \(shape \(64, 2, 32\)"),
    (["model.base_quant=nf4"], r"model.base_quant='nf4': params/blocks/attn/wq/codes would train, but a quantized "
                               r"weight cannot be trained"),
    (["model.base_quant=nf4", "model.lora_rank=4", "optim.also_train=embedding,mlp"],
     r"params/blocks/mlp/w_gate/codes would train, but a quantized weight cannot be trained; leave it out of "
     r"optim.also_train='embedding,mlp'"),
])
def test_bad_quantization_settings_are_one_line_before_anything_is_written(overrides, message, tmp_path,
                                                                           small_tokenizer):
    from llm_jax.train.loop import validate
    config = load("configs/sft.py:tiny", RL_MODEL_OVERRIDES + [f"tokenizer.path={small_tokenizer}", *overrides])
    with pytest.raises((ValueError, ConfigError), match=message):
        validate(config)


def test_freezing_every_projection_lets_a_quantized_base_train_the_rest(small_tokenizer):
    from llm_jax.train.loop import validate
    config = load("configs/sft.py:tiny", RL_MODEL_OVERRIDES + [
        f"tokenizer.path={small_tokenizer}", "model.base_quant=int8", r"optim.freeze=attn/w.,mlp/w_"])
    validate(config)


@pytest.mark.parametrize("start", ["full_precision", "qlora"])
def test_an_rl_policy_on_a_quantized_base_starts_at_its_reference(start, qlora_sft, pretrained, small_tokenizer,
                                                                    tmp_path):
    """GRPO with QLoRA: from a full-precision run the base is quantized and the reference is that base without
    adapters; from a QLoRA run the codes and adapters carry on and the reference is base + those adapters. Either
    way the first rollout's KL to the reference is zero."""
    init_from = pretrained if start == "full_precision" else qlora_sft
    config = load("configs/grpo.py:tiny", RL_MODEL_OVERRIDES + QUANT + [
        f"train.init_from={init_from}", f"tokenizer.path={small_tokenizer}", "rl.reward=gold", "rl.reward_run=",
        "rl.n_eval_prompts=8", "rl.rollout_batch=16", "rl.samples_per_prompt=4", "rl.minibatch=8",
        "rl.max_new_tokens=6", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=5",
        "mesh.data=4", "mesh.fsdp=2", "data.seq_len=96"])
    workdir = str(tmp_path / "grpo")
    training.run(config, workdir)
    first = [m for m in read_metrics(workdir) if m.get("step") == 1 and "kl" in m][0]
    assert abs(first["kl"]) < 1e-5
    assert first["memory_params_bytes"] > 0 and first["memory_temp_bytes"] > 0  # the policy update's, per device
    policy = _checkpoint(os.path.join(workdir, "policy") if os.path.isdir(os.path.join(workdir, "policy"))
                         else workdir, 2)
    started = _checkpoint(qlora_sft, 4) if start == "qlora" else None
    if started is not None:
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     quant_parts(policy), quant_parts(started))


def test_import_hf_quantizes_each_projection_as_it_is_read(tmp_path):
    """`import-hf --config.model.base_quant=nf4`: the run holds the codes of the checkpoint's own weights (as the
    full-precision import quantized afterwards), and the quantized import is the dequantized weights' model."""
    from llm_jax.hf.import_hf import import_hf
    fixture = os.path.join(os.path.dirname(__file__), "..", "hf", "fixtures", "llama")
    summaries = {scheme: import_hf(fixture, str(tmp_path / scheme), [f"model.base_quant={scheme}",
                                                                     "model.quant_block=32"])
                 for scheme in ("none", "nf4")}
    assert summaries["nf4"]["base_quant"].startswith("nf4, blocks of 32")
    full, quantized = runs.load_run(str(tmp_path / "none")), runs.load_run(str(tmp_path / "nf4"))
    expected = quant.quantize_tree(full.params, quantized.model_cfg)
    jax.tree.map(_same_codes, quant_parts(quantized.params), quant_parts(expected))
    tokens = _tokens(16) % full.model_cfg.vocab_size
    dequantized = Transformer(lora.merged_config(quantized.model_cfg))
    np.testing.assert_allclose(quantized.model.apply(quantized.params, tokens, method=Transformer.logits),
                               dequantized.apply(quant.dequantize_tree(quantized.params, quantized.model_cfg), tokens,
                                                 method=Transformer.logits), atol=1e-4)
