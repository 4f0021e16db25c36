"""Prompt tuning: a soft prompt that is the embeddings of tokens [t1..tP] gives the plain model's logits on
[t1..tP] + x, unpacked and per packed segment (windows, every attention path); it alone trains (with the adapters
under LoRA), composes with LoRA and a quantized base, decodes through the cache, shards, and carries from stage
to stage or is refused in one line."""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from run_fixtures import RL_MODEL_OVERRIDES, save_run
from llm_jax import runs, sharding, training
from llm_jax.config_lib import load
from llm_jax.configs_common import base_config
from llm_jax.continuous_batching import generate_continuous
from llm_jax.generate import SamplingConfig, generate
from llm_jax.kernels.attention import attention
from llm_jax.model import lora, prompt_tuning, quant
from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import KVCache, Transformer
from llm_jax.objectives.lm import cross_entropy
from llm_jax.train.checkpoint import CannotStartFrom, restore_params, start_params
from llm_jax.train.metrics import read_metrics
from llm_jax.train.optimizer import make_optimizer
from llm_jax.train.state import create_state, state_shardings
from llm_jax.train.step import make_train_step

CFG = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128, vocab_size=128,
                  prompt_tuning_tokens=3, attention_impl="xla")
IDS = np.array([5, 17, 42], np.int32)  # the tokens whose embeddings the soft prompt is set to
X = np.asarray(jax.random.randint(jax.random.key(1), (2, 10), 0, CFG.vocab_size), np.int32)


def _cfg(**kw):
    return dataclasses.replace(CFG, **kw)


def _plain(cfg):
    """The same model without a soft prompt (LoRA and quantization kept)."""
    return dataclasses.replace(cfg, prompt_tuning_tokens=0)


@functools.lru_cache(maxsize=None)
def _init(cfg, key=0):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.jit(lambda k: nn.unbox(Transformer(cfg).init(k, tokens, method=Transformer.logits)))(
        jax.random.key(key))


def _prompt_of(params, ids=IDS):
    """`params` with the soft prompt set to the embeddings of `ids`."""
    top = params["params"]
    return {"params": {**top, "soft_prompt": top["embedding"][jnp.asarray(ids)]}}


def _without_prompt(params):
    return {"params": {k: v for k, v in params["params"].items() if k != "soft_prompt"}}


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens, positions=None, segment_ids=None):
    return Transformer(cfg).apply(params, tokens, positions, segment_ids, method=Transformer.logits)


def _prepended(cfg, params, tokens_t, start: int = 0):
    """The plain model's logits on IDS + tokens, the tokens at positions P + start + [0, T): a document whose first
    `start` tokens are cut off (they are in the row as another segment, so row indices stay positions, but hidden
    from the tokens; only sliding windows see the gap)."""
    p, t = len(IDS), len(tokens_t)
    tokens = np.concatenate([IDS, np.zeros(start, np.int32), tokens_t])[None]
    segment_ids = np.concatenate([np.ones(p, np.int32), np.full(start, 2, np.int32), np.ones(t, np.int32)])[None]
    positions = np.arange(p + start + t)[None]
    return _logits(_plain(cfg), _without_prompt(params), jnp.asarray(tokens), jnp.asarray(positions),
                   jnp.asarray(segment_ids))[0, p + start:]


# --------------------------------------------------------------------------------------------- config, params

@pytest.mark.parametrize("value", [-1, -4])
def test_a_negative_length_is_one_clear_error(value):
    config = base_config().model
    config.prompt_tuning_tokens = value
    with pytest.raises(ValueError, match=rf"model config: prompt_tuning_tokens must be >= 0 \(0: none\), got {value}"):
        ModelConfig.from_config(config)


def test_the_soft_prompt_is_p_vocabulary_embeddings_beside_the_plain_models_params():
    params, plain = _init(CFG), _init(_plain(CFG))
    assert params["params"]["soft_prompt"].shape == (3, 64) and prompt_tuning.n_tokens(params) == 3
    # every other param is the plain model's, with the same init for the same key
    jax.tree.map(np.testing.assert_array_equal, _without_prompt(params), plain)
    assert jax.tree.structure(lora.without_adapters(params)) == jax.tree.structure(plain)
    table = np.asarray(params["params"]["embedding"])
    for row in np.asarray(params["params"]["soft_prompt"]):  # rows of the table (sampled-vocab init)
        assert (np.abs(table - row).max(axis=1) == 0).any()
    boxed = jax.eval_shape(lambda: Transformer(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    assert tuple(nn.get_partition_spec(boxed)["params"]["soft_prompt"]) == (None, "embed")
    # what trains: the soft prompt (an adapter to lora's rules); the plain model has none
    assert lora.trainable_for(CFG)(params)["params"]["soft_prompt"]
    assert not any(jax.tree.leaves(lora.trainable_for(CFG)(_without_prompt(params))))
    assert lora.without_lora(CFG).prompt_tuning_tokens == 0 and lora.trainable_for(lora.without_lora(CFG)) is None
    assert lora.count(params, lora.trainable_for(CFG))["trainable"] == 3 * 64


# --------------------------------------------------------------------------------------------- equivalence

FAMILIES = {
    "llama": {},
    "mistral_window": dict(family="mistral", sliding_window=4),
    "gemma3_mixed": dict(family="gemma3", sliding_window=4, global_every=2, query_scale_dim=16.0,
                         rope_local_theta=10_000.0, tie_embeddings=True),
}
# one row of three packed segments and a padding token: the second restarts at position 0 (its prompt keys are
# near in positions, far in the row), the third continues a document at position 5 (far in positions)
SEGMENTS = np.array([1, 1, 1, 2, 2, 2, 3, 3, 3, 0], np.int32)
POSITIONS = np.array([0, 1, 2, 0, 1, 2, 5, 6, 7, 0], np.int32)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_soft_prompt_of_token_embeddings_is_those_tokens_prepended(family, impl):
    cfg = _cfg(attention_impl=impl, **FAMILIES[family])
    params = _prompt_of(_init(cfg))
    got = _logits(cfg, params, jnp.asarray(X))
    assert got.shape == (2, 10, cfg.vocab_size)  # the T tokens' logits only
    for b in range(2):
        np.testing.assert_allclose(got[b], _prepended(cfg, params, X[b]), atol=2e-5)
    packed = _logits(cfg, params, jnp.asarray(X[:1]), jnp.asarray(POSITIONS[None]), jnp.asarray(SEGMENTS[None]))
    for segment in (1, 2, 3):  # each as if the soft prompt were prepended to it alone
        at = SEGMENTS == segment
        np.testing.assert_allclose(packed[0, at], _prepended(cfg, params, X[0, at], POSITIONS[at][0]), atol=2e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_unrolled_layers_and_the_pallas_kernel_give_the_same_logits(scan_layers):
    """Unpacked rows run the configured kernel (causal masking suffices); packed rows with a kernel configured
    run the xla attention instead, and the dispatch refuses a kernel the prompt's mask."""
    cfg = _cfg(attention_impl="pallas", scan_layers=scan_layers)
    params = _prompt_of(_init(cfg))
    np.testing.assert_allclose(_logits(cfg, params, jnp.asarray(X))[0], _prepended(cfg, params, X[0]), atol=2e-5)
    packed = _logits(cfg, params, jnp.asarray(X[:1]), jnp.asarray(POSITIONS[None]), jnp.asarray(SEGMENTS[None]))
    at = SEGMENTS == 2
    np.testing.assert_allclose(packed[0, at], _prepended(cfg, params, X[0, at], POSITIONS[at][0]), atol=2e-5)
    q = jnp.zeros((1, 16, 2, 16))
    with pytest.raises(ValueError, match="attention impl 'pallas' masks by segment equality.*needs one of"):
        attention(q, q, q, segment_ids_bt=jnp.ones((1, 16), jnp.int32), impl="pallas",
                  positions_bt=jnp.zeros((1, 16), jnp.int32))


def test_the_reward_readout_reads_the_last_real_token():
    from llm_jax.objectives.reward import RewardModel
    model = RewardModel(CFG)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    params = {"params": {**params["params"], "reward_head": jnp.ones((64,))}}
    segment_ids = jnp.asarray([[1] * 6 + [0] * 4, [1] * 10])
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    scores = model.apply(params, jnp.asarray(X), positions, segment_ids, method=RewardModel.score)
    hidden = model.apply(params, jnp.asarray(X), positions, segment_ids)
    np.testing.assert_allclose(scores, [hidden[0, 5].sum(), hidden[1, 9].sum()], rtol=1e-5)


# ------------------------------------------------------------------------------------- LoRA, quantization

def test_with_lora_and_a_quantized_base_it_composes_and_only_the_prompt_and_adapters_get_gradients():
    cfg = _cfg(lora_rank=4, lora_targets="wq,wv,w_up", base_quant="nf4", quant_block=32)
    params = _init(cfg)
    keys = iter(jax.random.split(jax.random.key(3), 64))
    params = jax.tree_util.tree_map_with_path(  # adapters that do something (B = 0 would be a no-op)
        lambda p, x: x + 0.05 * jax.random.normal(next(keys), x.shape) if lora.is_trainable(p) else x, params)
    got = _logits(cfg, params, jnp.asarray(X))
    # the merged, dequantized model keeps the soft prompt and gives the same logits
    merged = lora.merge(params, cfg)
    np.testing.assert_allclose(_logits(lora.merged_config(cfg), merged, jnp.asarray(X)), got, atol=5e-5)
    # and is the prepended model once the soft prompt is the embeddings of IDS
    with_ids = _prompt_of(params)
    np.testing.assert_allclose(_logits(cfg, with_ids, jnp.asarray(X))[0],
                               _prepended(lora.merged_config(cfg), lora.merge(with_ids, cfg), X[0]), atol=5e-5)
    mask = lora.trainable_for(cfg)(params)
    trained, frozen = lora.split(params, mask)
    names = {lora.path_names(p)[-2:] for p, _ in jax.tree_util.tree_leaves_with_path(trained)}
    assert names == {("params", "soft_prompt")} | {(f"{w}_lora", ab) for w in ("wq", "wv", "w_up") for ab in "ab"}
    assert not any(quant.is_quantized(x) for x in jax.tree.leaves(trained, is_leaf=quant.is_quantized))
    grads = jax.grad(lambda t: jnp.sum(_logits(cfg, lora.combine(t, frozen), jnp.asarray(X)) ** 2))(trained)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------- training

def _lm_loss(model):
    def loss_fn(params, batch, rng):
        del rng
        logits = model.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                             method=Transformer.logits)
        loss_sum, weight = cross_entropy(logits, batch["targets"], (batch["segment_ids"] > 0).astype(jnp.float32))
        return loss_sum, {"weight": weight}
    return loss_fn


def _batch(seed, batch=8, seq=16):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (batch, seq + 1)).astype(np.int32)
    cut = seq // 2 - 1  # two packed sequences a row, the second starting at position 0, the last token padding
    segment_ids = np.where(np.arange(seq) < cut, 1, 2).astype(np.int32) * (np.arange(seq) < seq - 1)
    positions = np.where(np.arange(seq) < cut, np.arange(seq), np.arange(seq) - cut).astype(np.int32)
    return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], positions=np.broadcast_to(positions, (batch, seq)),
                segment_ids=np.broadcast_to(segment_ids, (batch, seq)))


def _training(cfg, mesh, rules):
    model = Transformer(cfg, mesh, rules)
    c = base_config().optim
    c.update(lr=1e-2, warmup_steps=0)
    optimizer, schedule = make_optimizer(c, 10, trainable=lora.trainable_for(cfg))

    def init_params(key):
        return model.init(key, jnp.zeros((1, 16), jnp.int32), method=Transformer.logits)
    _, shardings = state_shardings(init_params, optimizer, mesh, rules)
    step = jax.jit(make_train_step(_lm_loss(model), optimizer, schedule),
                   in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
                   out_shardings=(shardings, sharding.replicated(mesh)))
    return init_params, optimizer, shardings, step


def _mesh(axes, devices):
    return sharding.make_mesh(axes, devices), sharding.check_rules(base_config().mesh_rules)


ONE = dict(data=1, fsdp=1, tensor=1, sequence=1)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_training_moves_only_the_soft_prompt_and_the_adapters(lora_rank):
    cfg = _cfg(lora_rank=lora_rank, lora_targets="wq,w_down")
    mesh, rules = _mesh(ONE, jax.devices()[:1])
    init_params, optimizer, shardings, step = _training(cfg, mesh, rules)
    state = create_state(init_params, optimizer, shardings, seed=0)
    before = jax.device_get(state.params)
    mu = state.opt_state[1][0].mu  # Adam's moments: the trained leaves only
    assert {lora.path_names(p)[-1] for p, _ in jax.tree_util.tree_leaves_with_path(mu)} == (
        {"soft_prompt", "a", "b"} if lora_rank else {"soft_prompt"})
    losses = []
    for _ in range(3):
        state, metrics = step(state, sharding.global_batch_from_local(_batch(0), mesh, rules))
        losses.append(float(metrics["loss"]))
    after = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, lora.without_adapters(after), lora.without_adapters(before))
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora.split(before)[0]),
                                                         jax.tree.leaves(lora.split(after)[0])))
    assert losses[-1] < losses[0]


def test_a_fresh_soft_prompt_is_drawn_from_the_embeddings_it_starts_from():
    mesh, rules = _mesh(ONE, jax.devices()[:1])
    init_params, optimizer, shardings, _ = _training(CFG, mesh, rules)
    pretrained = jax.device_get(jax.tree.map(lambda x: x + 1.0, _init(_plain(CFG), key=3)))

    def start(seed):  # the given params are donated: placed afresh for each state
        given = jax.device_put(pretrained, lora.without_adapters(shardings.params))
        return jax.device_get(create_state(init_params, optimizer, shardings, seed=seed, params=given).params)
    params = start(0)
    jax.tree.map(np.testing.assert_array_equal, _without_prompt(params), pretrained)
    table = np.asarray(pretrained["params"]["embedding"])
    for row in np.asarray(params["params"]["soft_prompt"]):  # rows of the given table, not of a random one
        assert (np.abs(table - row).max(axis=1) == 0).any()
    assert not np.array_equal(start(1)["params"]["soft_prompt"], params["params"]["soft_prompt"])  # from the seed


def test_sharded_training_matches_one_device():
    """data=2 × fsdp=2 × tensor=2 against one device, LoRA beside the soft prompt, packed rows."""
    cfg = _cfg(lora_rank=2, lora_targets="wq,wo,w_up")
    histories, finals = [], []
    for axes, devices in ((ONE, jax.devices()[:1]), (dict(data=2, fsdp=2, tensor=2, sequence=1), jax.devices())):
        mesh, rules = _mesh(axes, devices)
        init_params, optimizer, shardings, step = _training(cfg, mesh, rules)
        state = create_state(init_params, optimizer, shardings, seed=0)
        history = []
        for i in range(2):
            state, metrics = step(state, sharding.global_batch_from_local(_batch(i), mesh, rules))
            history.append((float(metrics["loss"]), float(metrics["grad_norm"])))
        histories.append(history)
        finals.append(state)
    np.testing.assert_allclose(histories[1], histories[0], rtol=1e-5)
    prompt = finals[1].params["params"]["soft_prompt"]
    assert prompt.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    np.testing.assert_allclose(np.asarray(prompt), np.asarray(finals[0].params["params"]["soft_prompt"]), atol=5e-5)


# --------------------------------------------------------------------------------------------- generation

def test_greedy_generation_is_the_argmax_of_full_forward_passes():
    cfg = _cfg(init_std=0.5)  # answers that vary from token to token
    model, params = Transformer(cfg), _init(cfg)
    prompts = np.asarray(jax.random.randint(jax.random.key(0), (4, 9), 4, cfg.vocab_size), np.int32)
    lengths = np.array([9, 3, 6, 1], np.int32)
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    out = generate(model, params, prompts, lengths, jax.random.key(0), sampling)
    logits_fn = jax.jit(lambda seq: model.apply(params, seq[None], method=Transformer.logits)[0])
    for row, n in enumerate(lengths):
        seq = np.zeros(n + 8, np.int32)
        seq[:n] = prompts[row, :n]
        for t in range(n, n + 8):
            seq[t] = int(jnp.argmax(logits_fn(jnp.asarray(seq))[t - 1]))
        assert out.tokens[row].tolist() == seq[n:].tolist(), row
    assert len({tuple(r) for r in np.asarray(out.tokens).tolist()}) > 1
    # the cache holds the soft prompt: P more entries, counted in its lengths
    full = generate(model, params, prompts, lengths, jax.random.key(0), sampling, use_cache=False)
    np.testing.assert_array_equal(out.tokens, full.tokens)
    cont = generate_continuous(model, params, prompts, lengths, jax.random.key(0), sampling, slots=3)
    np.testing.assert_array_equal(cont.tokens, out.tokens)
    cache = KVCache.zeros(cfg, 4, 16)._replace(lengths=jnp.asarray(lengths))
    _, cache = model.apply(params, jnp.asarray(prompts), segment_ids_bt=(np.arange(9) < lengths[:, None]).astype(
        np.int32), cache=cache, prefill=True)
    np.testing.assert_array_equal(cache.lengths, lengths + 3)
    with pytest.raises(ValueError, match="a KV cache of 9 entries cannot hold the soft prompt's 3 and the prompt's 9"):
        model.apply(params, jnp.asarray(prompts), cache=KVCache.zeros(cfg, 4, 9), prefill=True)


# --------------------------------------------------------------------------------------------- stages

STAGE = ["data.batch_size=8", "mesh.data=4", "mesh.fsdp=2", "train.steps=6", "train.log_every=1", "train.eval_every=100",
         "train.checkpoint_every=6", "train.eval_batches=1", "optim.warmup_steps=0", "optim.lr=3e-2"]
PROMPT = ["model.prompt_tuning_tokens=4"]


def _stage(spec, init_from, small_tokenizer, *extra):
    return load(spec, RL_MODEL_OVERRIDES + STAGE + [f"train.init_from={init_from}",
                                                    f"tokenizer.path={small_tokenizer}", *extra])


def _checkpoint(workdir, step):
    import orbax.checkpoint as ocp
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]


@pytest.fixture(scope="module")
def tuned_sft(pretrained, small_tokenizer, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pt") / "sft")
    training.run(_stage("configs/sft.py:tiny", pretrained, small_tokenizer, *PROMPT), workdir)
    return workdir


def test_an_sft_stage_trains_the_soft_prompt_alone(tuned_sft, pretrained):
    saved = _checkpoint(tuned_sft, 6)
    base = restore_params(pretrained, runs.abstract_params(Transformer(_plain(runs.load_run(tuned_sft).model_cfg))))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), _without_prompt(saved),
                 base)
    losses = [m["loss"] for m in read_metrics(tuned_sft) if "loss" in m]
    assert losses[-1] < losses[0]
    first = read_metrics(tuned_sft)[0]
    assert first["n_params_trainable"] == 4 * 64


def test_a_stage_from_a_prompt_tuned_run_continues_its_soft_prompt_or_is_refused(tuned_sft, small_tokenizer,
                                                                                 tmp_path):
    from llm_jax.objectives import reward
    sft = _checkpoint(tuned_sft, 6)["params"]["soft_prompt"]
    config = _stage("configs/reward.py:tiny", tuned_sft, small_tokenizer, *PROMPT)
    model = reward.RewardModel(ModelConfig.from_config(config.model))
    start = reward.params_from_run(tuned_sft, runs.abstract_params(model), model.cfg)
    np.testing.assert_array_equal(np.asarray(start["params"]["soft_prompt"]), sft)  # continues, same P
    for value in (0, 2):  # none, or another length: one line naming the run and the field
        config = _stage("configs/reward.py:tiny", tuned_sft, small_tokenizer, f"model.prompt_tuning_tokens={value}")
        with pytest.raises(CannotStartFrom, match=rf"{tuned_sft} trained a soft prompt "
                                                  rf"\(model.prompt_tuning_tokens=4\).*this model has {value}\)"):
            training.run(config, str(tmp_path / f"rm{value}"))
        assert not os.path.exists(tmp_path / f"rm{value}" / "checkpoints")
    from llm_jax.hf.export_hf import ExportError, export_hf
    with pytest.raises(ExportError, match=rf"run {tuned_sft} trained a soft prompt \(model.prompt_tuning_tokens=4\)"):
        export_hf(tuned_sft, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


def test_generation_from_a_prompt_tuned_run(tuned_sft):
    run = runs.load_run(tuned_sft)
    assert run.model_cfg.prompt_tuning_tokens == 4
    prompt = np.asarray(run.tokenizer.encode("reverse, a b c"), np.int32)[None]
    out = generate(run.model, run.params, prompt, np.array([prompt.shape[1]]), jax.random.key(0),
                   SamplingConfig(max_new_tokens=4, temperature=0))
    logits = run.model.apply(run.params, jnp.asarray(prompt), method=Transformer.logits)
    assert int(out.tokens[0, 0]) == int(jnp.argmax(logits[0, -1]))


def _random_head(params):
    p = params["params"]
    return {"params": {**p, "reward_head": jax.random.normal(jax.random.key(1), p["reward_head"].shape)}}


def _prompts_file(path, n=8):
    from llm_jax.data import default_task
    path.write_text("".join(json.dumps(r) + "\n" for r in default_task.iter_records("prompts_train", n)))
    return str(path)


def test_reward_dpo_and_grpo_stages_train_the_soft_prompt_they_continue(tuned_sft, small_tokenizer, tmp_path):
    sft = _checkpoint(tuned_sft, 6)["params"]
    rm = save_run(tmp_path / "rm", "configs/reward.py:tiny", small_tokenizer, _random_head,
                  metrics=[{"step": 1, "eval_reward_mean": -20.0, "eval_reward_std": 4.0}])
    prompts = _prompts_file(tmp_path / "prompts.jsonl")
    short = ["train.steps=2", "train.checkpoint_every=2"]
    stages = {
        "reward": ("configs/reward.py:tiny", short),
        "dpo": ("configs/dpo.py:tiny", short),
        "grpo": ("configs/grpo.py:tiny", short + [
            f"rl.reward_run={rm}", f"rl.prompts={prompts}", f"rl.eval_prompts={prompts}", "rl.n_eval_prompts=8",
            "rl.rollout_batch=8", "rl.minibatch=8", "rl.samples_per_prompt=4", "rl.max_new_tokens=4",
            "train.eval_every=2"]),
    }
    for name, (spec, extra) in stages.items():
        workdir = str(tmp_path / name)
        training.run(_stage(spec, tuned_sft, small_tokenizer, *PROMPT, *extra), workdir)
        saved = _checkpoint(workdir, 2)["params"]
        for key in ("embedding", "blocks", "final_norm"):  # the SFT run's frozen trunk, bit for bit
            jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), saved[key],
                         sft[key])
        assert not np.array_equal(np.asarray(saved["soft_prompt"]), np.asarray(sft["soft_prompt"])), name


def test_the_rl_reference_is_the_reference_runs_model_never_the_policys_soft_prompt(tuned_sft, small_tokenizer,
                                                                                   tmp_path, monkeypatch):
    from llm_jax.rl import loop as rl_loop
    make_mesh = sharding.make_mesh
    monkeypatch.setattr(sharding, "make_mesh", lambda mesh_config, devices=None: make_mesh(mesh_config,
                                                                                           jax.devices()[:1]))
    rm = save_run(tmp_path / "rm", "configs/reward.py:tiny", small_tokenizer, _random_head,
                  metrics=[{"step": 1, "eval_reward_mean": -20.0, "eval_reward_std": 4.0}])
    prompts = _prompts_file(tmp_path / "prompts.jsonl")
    plain_sft = save_run(tmp_path / "sft", "configs/sft.py:tiny", small_tokenizer, lambda p: p)

    def rl(init_from, *extra):
        config = load("configs/grpo.py:tiny", RL_MODEL_OVERRIDES + [
            f"train.init_from={init_from}", f"rl.reward_run={rm}", f"rl.prompts={prompts}",
            f"rl.eval_prompts={prompts}", "rl.n_eval_prompts=8", "rl.rollout_batch=8", "rl.minibatch=8",
            "rl.max_new_tokens=4", "train.steps=1", "mesh.data=1", *extra])
        return rl_loop.RL(config, str(tmp_path / "rl"), resuming=False)

    tokens = jnp.asarray(X[:, :8] % 512)
    # from a prompt-tuned SFT run: its soft prompt continues in the policy, and a frozen copy is the reference's
    p = rl(tuned_sft, *PROMPT)
    policy = p.fresh_states()["policy"].params
    sft = _checkpoint(tuned_sft, 6)["params"]["soft_prompt"]
    ref = p.reference_params(policy)
    assert p.ref_model.cfg.prompt_tuning_tokens == 4
    np.testing.assert_array_equal(np.asarray(ref["params"]["soft_prompt"]), sft)
    np.testing.assert_allclose(p.ref_model.apply(ref, tokens, method=Transformer.logits),
                               p.policy.apply(policy, tokens, method=Transformer.logits), atol=1e-5)
    # from a plain SFT run, alone or beside LoRA: the reference is the SFT model, with no soft prompt
    for extra in ([], ["model.lora_rank=2"]):
        p = rl(plain_sft, *PROMPT, *extra)
        policy = p.fresh_states()["policy"].params
        ref = p.reference_params(policy)
        assert p.ref_model.cfg.prompt_tuning_tokens == 0 and "soft_prompt" not in ref["params"]
        plain = runs.load_run(plain_sft)
        np.testing.assert_allclose(p.ref_model.apply(ref, tokens, method=Transformer.logits),
                                   plain.model.apply(plain.params, tokens, method=Transformer.logits), atol=1e-5)
    with pytest.raises(CannotStartFrom, match=r"model.prompt_tuning_tokens=4"):
        rl(tuned_sft).fresh_states()


def test_start_params_from_a_prompt_tuned_quantized_run_carries_codes_adapters_and_prompt(pretrained,
                                                                                         small_tokenizer, tmp_path):
    qlora = ["model.lora_rank=2", "model.lora_targets=wq,wv", "model.base_quant=int8", "model.quant_block=32",
             "train.steps=2", "train.checkpoint_every=2"]
    first = str(tmp_path / "first")
    training.run(_stage("configs/sft.py:tiny", pretrained, small_tokenizer, *PROMPT, *qlora), first)
    saved = _checkpoint(first, 2)
    config = _stage("configs/sft.py:tiny", first, small_tokenizer, *PROMPT, *qlora)
    model = Transformer(ModelConfig.from_config(config.model))
    start = start_params(first, runs.abstract_params(model), model.cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), start, saved)
