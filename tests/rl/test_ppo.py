"""PPO's rollout and loop: the rollout reads the sampler's own log-probs and the reward model's own scores; a
run logs every metric, resumes bit for bit after SIGTERM, and on an 8-device mesh equals one device.

The runs are freshly initialised small models saved as checkpoints (no training): what is tested is the
plumbing, not learning (the bandit test, test_ppo_optimum.py, tests that the losses reach the optimum)."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from run_fixtures import save_run
from llm_jax import sharding
from llm_jax.config_lib import load
from llm_jax.data import default_task
from llm_jax.eval.judges import GoldJudge
from llm_jax.generate import SamplingConfig, generate
from llm_jax.objectives.reward import RewardScorer
from llm_jax.rl import ppo_loop, rollout
from llm_jax import training
from llm_jax.train import preemption
from llm_jax.train.checkpoint import checkpoint_dir

SMALL_MODEL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=128",
               "model.vocab_size=512", "tokenizer.vocab_size=512", "data.seq_len=48"]


def _random_head(params):
    p = params["params"]
    return {"params": {**p, "reward_head": jax.random.normal(jax.random.key(1), p["reward_head"].shape)}}


@pytest.fixture(scope="module")
def runs(small_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_runs")
    policy = save_run(root / "sft", "configs/sft.py:tiny", small_tokenizer, lambda p: p, SMALL_MODEL)
    rm = save_run(root / "rm", "configs/reward.py:tiny", small_tokenizer, _random_head, SMALL_MODEL,
                   metrics=[{"step": 1, "eval_reward_mean": -20.0, "eval_reward_std": 4.0}])
    prompts = {}
    for split, n in (("train", 24), ("eval", 8)):
        path = root / f"prompts_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in default_task.iter_records(f"prompts_{split}", n)))
        prompts[split] = str(path)
    return policy, rm, prompts


def _on_one_device(monkeypatch):
    make_mesh = sharding.make_mesh
    monkeypatch.setattr(sharding, "make_mesh", lambda mesh_config, devices=None: make_mesh(mesh_config,
                                                                                           jax.devices()[:1]))


def _config(runs, *extra):
    policy, rm, prompts = runs
    return load("configs/ppo.py:tiny", SMALL_MODEL + [
        f"train.init_from={policy}", f"ppo.reward_run={rm}", f"ppo.prompts={prompts['train']}",
        f"ppo.eval_prompts={prompts['eval']}", "ppo.n_eval_prompts=8", "ppo.rollout_batch=8", "ppo.minibatch=4",
        "ppo.epochs=2", "ppo.max_new_tokens=6", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=5",
        "optim.lr=1e-3", "optim.warmup_steps=0", *extra])


def test_rollout_reads_the_samplers_log_probs_and_the_reward_models_scores(runs, tmp_path, monkeypatch):
    _on_one_device(monkeypatch)
    config = _config(runs, "mesh.data=1")
    p = ppo_loop.PPO(config, str(tmp_path))
    policy, value = p.fresh_states()
    prompts = p.prompts.take(np.arange(8))
    gen = generate(p.policy, policy.params, prompts.tokens, prompts.lengths, jax.random.key(0),
                   SamplingConfig(max_new_tokens=6, temperature=1.0, stop_ids=p.stop_ids))
    seqs = rollout.assemble(jnp.asarray(prompts.tokens), jnp.asarray(prompts.lengths), gen.tokens, gen.mask)
    np.testing.assert_allclose(rollout.response_log_probs(p.policy, policy.params, seqs), gen.log_probs, atol=2e-5)
    # each row: its prompt, then its response, then padding
    for b in range(8):
        n_p, n_r = int(prompts.lengths[b]), int(gen.mask[b].sum())
        np.testing.assert_array_equal(seqs.tokens_bl[b, :n_p], prompts.tokens[b, :n_p])
        np.testing.assert_array_equal(seqs.tokens_bl[b, n_p:n_p + n_r], gen.tokens[b, :n_r])
        assert int(seqs.segment_ids_bl[b].sum()) == n_p + n_r
    assert not np.asarray(rollout.values(p.value_model, value.params, seqs))[np.asarray(gen.mask) == 0].any()
    # the reward model scores a rollout exactly as its scorer scores the same token sequences
    scores = rollout.reward_scores(p.rm_model, p.rm_params, seqs, p.rm_readout)
    scorer = RewardScorer(p.rm_model, p.rm_params, p.tokenizer, p.template, 48, 8, p.rm_readout)
    sequences, starts = [], []
    for b in range(8):
        n_p, n_r = int(prompts.lengths[b]), int(gen.mask[b].sum())
        sequences.append(np.concatenate([np.asarray(seqs.tokens_bl[b, :n_p + n_r]), [p.tokenizer.eos_id]]))
        starts.append(n_p)
    np.testing.assert_allclose(scores, scorer.score_tokens(sequences, starts), rtol=1e-5, atol=1e-4)
    # in parts: the likelihood readout's terms are the reward model's own log-probs of the response tokens
    head, terms = rollout.reward_terms(p.rm_model, p.rm_params, seqs, "likelihood")
    np.testing.assert_allclose(terms, rollout.response_log_probs(p.rm_model, p.rm_params, seqs), atol=1e-5)
    np.testing.assert_allclose(head + terms.sum(1), rollout.reward_scores(p.rm_model, p.rm_params, seqs, "likelihood"),
                               rtol=1e-5)
    head_last, terms_last = rollout.reward_terms(p.rm_model, p.rm_params, seqs, "last")
    assert not np.asarray(terms_last).any()
    np.testing.assert_allclose(head_last, head, rtol=1e-6)


def test_judge_steps_split_the_gold_score_over_the_prefixes(runs, tmp_path, monkeypatch):
    _on_one_device(monkeypatch)
    p = ppo_loop.PPO(_config(runs, "mesh.data=1"), str(tmp_path))
    words = default_task.TASK_WORDS[:3]
    prompt = f"reverse, {' '.join(words)}"  # gold: words[2] words[1] words[0]
    answers = [[words[2], words[0], words[1]],             # one right word of three
               [words[2], words[1], words[0], words[0]]]   # all right, then an extra word: 3/4
    rows = [p.tokenizer.encode(" ".join(a)) + [p.stop_ids[0]] for a in answers]
    width = max(map(len, rows))
    tokens = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.float32)
    for b, row in enumerate(rows):
        tokens[b, :len(row)], mask[b, :len(row)] = row, 1.0
    record = {"prompt": prompt, "task": "reverse"}
    prompts = ppo_loop.Prompts(tokens[:, :1], np.ones(2, np.int32), [record, record])
    steps = ppo_loop.judge_steps(GoldJudge(), prompts, p.tokenizer, tokens, mask, p.stop_ids)
    np.testing.assert_allclose(steps.sum(1), [default_task.gold_score(prompt, " ".join(a)) for a in answers], atol=1e-6)
    np.testing.assert_allclose(steps[0][steps[0] != 0], [1 / 3], atol=1e-6)
    np.testing.assert_allclose(steps[1][steps[1] != 0], [1 / 3, 1 / 3, 1 / 3, -1 / 4], atol=1e-6)
    assert not steps[mask == 0].any()


def _final_params(workdir):
    manager = ocp.CheckpointManager(checkpoint_dir(workdir))
    try:
        return manager.restore(manager.latest_step(), args=ocp.args.Composite(
            params=ocp.args.StandardRestore()))["params"]
    finally:
        manager.close()


def _metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_ptx_adds_the_pretraining_loss_to_the_policy_loss(runs, tmp_path, monkeypatch):
    from llm_jax.objectives import lm, ppo
    _on_one_device(monkeypatch)
    p = ppo_loop.PPO(_config(runs, "mesh.data=1", "ppo.ptx_coef=0.5", "ppo.ptx_batch=4"), str(tmp_path))
    policy, _ = p.fresh_states()
    prompts = p.prompts.take(np.arange(4))
    gen = generate(p.policy, policy.params, prompts.tokens, prompts.lengths, jax.random.key(0), p.sampling)
    seqs = rollout.assemble(jnp.asarray(prompts.tokens), jnp.asarray(prompts.lengths), gen.tokens, gen.mask)
    old_logp = rollout.response_log_probs(p.policy, policy.params, seqs)
    batch = dict(tokens=seqs.tokens_bl, segment_ids=seqs.segment_ids_bl, index=seqs.index_bn,
                 response=seqs.response_bn, mask=seqs.mask_bn, old_logp=old_logp,
                 advantages=jnp.linspace(-1.0, 1.0, seqs.mask_bn.size).reshape(seqs.mask_bn.shape))
    ptx = p.ptx_rows(p.ptx_data.train_iterator())
    assert ptx["ptx_inputs"].shape == (4, 48)
    with_ptx, stats = ppo.make_policy_loss_fn(p.policy, p.s)(policy.params, {**batch, **ptx}, None)
    without, _ = ppo.make_policy_loss_fn(p.policy, dataclasses.replace(p.s, ptx_coef=0.0))(policy.params, batch, None)
    lm_sum, lm_stats = lm.make_loss_fn(p.policy)(policy.params, {k[4:]: v for k, v in ptx.items()}, None)
    weight = float(seqs.mask_bn.sum())
    np.testing.assert_allclose(with_ptx - without, 0.5 * lm_sum / lm_stats["weight"] * weight, rtol=1e-5)
    assert float(lm_sum / lm_stats["weight"]) > 1.0  # an untrained model's LM loss: the rows are real text


@pytest.mark.slow
def test_ppo_run_logs_resumes_bit_for_bit_and_shards_like_one_device(runs, tmp_path, monkeypatch):
    # with PPO-ptx (its pretraining stream resumes too) and dense shaping of the likelihood reward model
    one_device = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "ppo.ptx_coef=0.5", "ppo.ptx_batch=4",
                  "ppo.reward_shaping=dense"]
    _on_one_device(monkeypatch)
    straight = str(tmp_path / "straight")
    summary = training.run(_config(runs, *one_device), straight)
    logged = _metrics(straight)
    iteration = [m for m in logged if m["step"] == 1 and "score" in m][0]
    for key in ("score", "score_norm", "gold", "kl", "kl_coef", "entropy", "clip_fraction", "approx_kl",
                "policy_loss", "ptx_loss", "value_loss", "explained_variance", "response_length", "stopped",
                "seconds_generate", "seconds_score", "seconds_train", "mfu_generate", "mfu_score", "mfu_train"):
        assert np.isfinite(iteration[key]), key
    assert {"eval_gold_greedy", "eval_gold", "eval_score", "eval_kl"} <= set(summary["before"])
    assert summary["before"]["eval_kl"] == 0.0  # before any update the policy is the reference
    assert summary["after"]["step"] == 2

    # SIGTERM after iteration 1: saved and stopped; the same command resumes and ends where `straight` did
    resumed = str(tmp_path / "resumed")
    monkeypatch.setattr(preemption.StopSignal, "agreed", lambda self: True)
    assert training.run(_config(runs, *one_device), resumed)["stopped_early"]
    monkeypatch.undo()
    _on_one_device(monkeypatch)
    training.run(_config(runs, *one_device), resumed)
    jax.tree.map(np.testing.assert_array_equal, _final_params(resumed), _final_params(straight))
    assert [m for m in _metrics(resumed) if "seconds_train" not in m] == [
        m for m in logged if "seconds_train" not in m]  # evals equal; timings differ

    # The value model's last checkpoint damaged on disk: both models go back to iteration 1 (the policy's
    # iteration 2 set aside with it) and end where `straight` did
    value_params = os.path.join(resumed, "value", "checkpoints", "2", "params")
    largest = max((os.path.join(d, n) for d, _, names in os.walk(value_params) for n in names), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        f.write(b"\xff" * 64)
    training.run(_config(runs, *one_device), resumed)
    assert os.listdir(os.path.join(resumed, "checkpoints_damaged")) == ["2"]
    assert os.listdir(os.path.join(resumed, "value", "checkpoints_damaged")) == ["2"]
    jax.tree.map(np.testing.assert_array_equal, _final_params(resumed), _final_params(straight))

    monkeypatch.undo()
    sharded = str(tmp_path / "sharded")
    training.run(_config(runs, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *one_device[3:]), sharded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 _final_params(sharded), _final_params(straight))


@pytest.mark.parametrize("override,message", [
    ("ppo.minibatch=3", "ppo.rollout_batch=8 is not a multiple of ppo.minibatch=3"),
    ("ppo.kl_estimator=k9", "kl_estimator='k9'"),
    ("ppo.value_from=sft", "ppo.value_from='sft'"),
    ("ppo.baseline=group", "needs ppo.samples_per_prompt >= 2"),
    ("ppo.samples_per_prompt=3", "multiple of ppo.samples_per_prompt=3"),
    ("ppo.temperature=0", "temperature"),
    ("ppo.reward=", "ppo.reward is empty"),
    ("ppo.ptx_coef=-1", "ppo.ptx_coef=-1"),
    ("ppo.ptx_coef=0.1 ppo.ptx_data=", "needs ppo.ptx_data"),
    ("ppo.reward_shaping=sparse", "ppo.reward_shaping='sparse'"),
])
def test_bad_ppo_settings_are_named(runs, override, message):
    from llm_jax.objectives import ppo
    with pytest.raises(ValueError, match=message):
        ppo.settings(_config(runs, *override.split(" ")))


def test_a_reward_judge_that_does_not_load_is_named():
    with pytest.raises(ValueError, match="ppo.reward='oracle': judge 'oracle' is neither a built-in"):
        ppo_loop.reward_judge("oracle")
    assert ppo_loop.reward_judge("numeric_match").name == "numeric_match"


def test_dense_shaping_needs_a_reward_model_with_per_token_terms(runs, small_tokenizer, tmp_path, monkeypatch):
    _on_one_device(monkeypatch)
    last = save_run(tmp_path / "rm_last", "configs/reward.py:tiny", small_tokenizer, _random_head,
                     SMALL_MODEL + ["reward.readout=last"],
                     metrics=[{"step": 1, "eval_reward_mean": 0.0, "eval_reward_std": 1.0}])
    with pytest.raises(ValueError, match="readout 'last'"):
        ppo_loop.PPO(_config(runs, f"ppo.reward_run={last}", "ppo.reward_shaping=dense", "mesh.data=1"),
                     str(tmp_path))


def test_a_reward_run_that_is_not_a_reward_model_is_named(runs, tmp_path, monkeypatch):
    _on_one_device(monkeypatch)
    policy, _, _ = runs
    with pytest.raises(Exception, match="not a reward model"):
        ppo_loop.PPO(_config(runs, f"ppo.reward_run={policy}", "mesh.data=1"), str(tmp_path))
