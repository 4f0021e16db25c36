"""The RL loop: the rollout reads the sampler's own log-probs and the reward model's own scores; a run of every
algorithm logs every metric and resumes bit for bit after SIGTERM; on an 8-device mesh PPO equals one device.

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
from llm_jax.rl import loop as rl_loop, rewards, rollout, settings, update
from llm_jax.rl.prompts import Prompts
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
    return _preset("configs/ppo.py:tiny", runs, *extra)


def _preset(spec, runs, *extra):
    policy, rm, prompts = runs
    return load(spec, SMALL_MODEL + [
        f"train.init_from={policy}", f"rl.reward_run={rm}", f"rl.prompts={prompts['train']}",
        f"rl.eval_prompts={prompts['eval']}", "rl.n_eval_prompts=8", "rl.rollout_batch=8", "rl.minibatch=4",
        "rl.epochs=2", "rl.max_new_tokens=6", "train.steps=2", "train.eval_every=2", "train.checkpoint_every=5",
        "optim.lr=1e-3", "optim.warmup_steps=0", *extra])


def test_rollout_reads_the_samplers_log_probs_and_the_reward_models_scores(runs, tmp_path, monkeypatch):
    _on_one_device(monkeypatch)
    config = _config(runs, "mesh.data=1")
    p = rl_loop.RL(config, str(tmp_path), resuming=False)
    states = p.fresh_states()
    policy, value = states["policy"], states["value"]
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
    rm_model, rm_params, readout = p.rewards.rm_model, p.rewards.rm_params, p.rewards.readout
    scores = rollout.reward_scores(rm_model, rm_params, seqs, readout)
    scorer = RewardScorer(rm_model, rm_params, p.tokenizer, p.template, 48, 8, readout)
    sequences, starts = [], []
    for b in range(8):
        n_p, n_r = int(prompts.lengths[b]), int(gen.mask[b].sum())
        sequences.append(np.concatenate([np.asarray(seqs.tokens_bl[b, :n_p + n_r]), [p.tokenizer.eos_id]]))
        starts.append(n_p)
    np.testing.assert_allclose(scores, scorer.score_tokens(sequences, starts), rtol=1e-5, atol=1e-4)
    # the host-side scoring the loop uses reads the same scores
    host_scores, _ = p.rewards.reward_model_scores(prompts, np.asarray(gen.tokens), np.asarray(gen.mask))
    np.testing.assert_allclose(host_scores, scores, rtol=1e-5, atol=1e-4)
    # in parts: the likelihood readout's terms are the reward model's own log-probs of the response tokens
    head, terms = rollout.reward_terms(rm_model, rm_params, seqs, "likelihood")
    np.testing.assert_allclose(terms, rollout.response_log_probs(rm_model, rm_params, seqs), atol=1e-5)
    np.testing.assert_allclose(head + terms.sum(1), rollout.reward_scores(rm_model, rm_params, seqs, "likelihood"),
                               rtol=1e-5)
    head_last, terms_last = rollout.reward_terms(rm_model, rm_params, seqs, "last")
    assert not np.asarray(terms_last).any()
    np.testing.assert_allclose(head_last, head, rtol=1e-6)


def test_judge_steps_split_the_gold_score_over_the_prefixes(runs, tmp_path, monkeypatch):
    _on_one_device(monkeypatch)
    p = rl_loop.RL(_config(runs, "mesh.data=1"), str(tmp_path), resuming=False)
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
    prompts = Prompts(tokens[:, :1], np.ones(2, np.int32), [record, record])
    steps = rewards.judge_steps(GoldJudge(), prompts, p.tokenizer, tokens, mask, p.stop_ids)
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
    from llm_jax.objectives import lm
    _on_one_device(monkeypatch)
    p = rl_loop.RL(_config(runs, "mesh.data=1", "rl.ptx_coef=0.5", "rl.ptx_batch=4"), str(tmp_path),
                   resuming=False)
    policy = p.fresh_states()["policy"]
    prompts = p.prompts.take(np.arange(4))
    gen = generate(p.policy, policy.params, prompts.tokens, prompts.lengths, jax.random.key(0), p.sampling)
    seqs = rollout.assemble(jnp.asarray(prompts.tokens), jnp.asarray(prompts.lengths), gen.tokens, gen.mask)
    old_logp = rollout.response_log_probs(p.policy, policy.params, seqs)
    batch = dict(tokens=seqs.tokens_bl, segment_ids=seqs.segment_ids_bl, index=seqs.index_bn,
                 response=seqs.response_bn, mask=seqs.mask_bn, loss_mask=seqs.mask_bn, old_logp=old_logp,
                 advantages=jnp.linspace(-1.0, 1.0, seqs.mask_bn.size).reshape(seqs.mask_bn.shape))
    ptx = p.ptx_rows(p.ptx_data.train_iterator())
    assert ptx["ptx_inputs"].shape == (4, 48)
    with_ptx, stats = update.make_policy_loss_fn(p.policy, p.s)(policy.params, {**batch, **ptx}, None)
    without, _ = update.make_policy_loss_fn(p.policy, dataclasses.replace(p.s, ptx_coef=0.0))(policy.params, batch,
                                                                                               None)
    lm_sum, lm_stats = lm.make_loss_fn(p.policy)(policy.params, {k[4:]: v for k, v in ptx.items()}, None)
    weight = float(seqs.mask_bn.sum())
    np.testing.assert_allclose(with_ptx - without, 0.5 * lm_sum / lm_stats["weight"] * weight, rtol=1e-5)
    assert float(lm_sum / lm_stats["weight"]) > 1.0  # an untrained model's LM loss: the rows are real text


@pytest.mark.slow
def test_ppo_run_logs_resumes_bit_for_bit_and_shards_like_one_device(runs, tmp_path, monkeypatch):
    # with PPO-ptx (its pretraining stream resumes too) and dense shaping of the likelihood reward model
    one_device = ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1", "rl.ptx_coef=0.5", "rl.ptx_batch=4",
                  "rl.reward_shaping=dense"]
    _on_one_device(monkeypatch)
    straight = str(tmp_path / "straight")
    summary = training.run(_config(runs, *one_device), straight)
    logged = _metrics(straight)
    iteration = [m for m in logged if m["step"] == 1 and "score" in m][0]
    for key in ("score", "reward", "paid", "gold", "kl", "kl_coef", "kl_term", "entropy", "clip_fraction",
                "approx_kl", "policy_loss", "ptx_loss", "value_loss", "explained_variance", "response_length",
                "stopped", "logp_mismatch_mean", "logp_mismatch_max", "seconds_generate", "seconds_reward",
                "seconds_score", "seconds_train", "mfu_generate", "mfu_reward", "mfu_score", "mfu_train"):
        assert np.isfinite(iteration[key]), key
    # the sampler and the trainer run the same float32 code: their log-probs of the samples agree
    assert iteration["logp_mismatch_max"] < 1e-4
    assert {"eval_gold_greedy", "eval_gold", "eval_score", "eval_reward", "eval_kl"} <= set(summary["before"])
    assert summary["before"]["eval_kl"] == 0.0  # before any update the policy is the reference
    assert summary["after"]["step"] == 2

    _stops_and_resumes_bit_for_bit(_config(runs, *one_device), str(tmp_path / "resumed"), straight, monkeypatch)
    resumed = str(tmp_path / "resumed")

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


def _stops_and_resumes_bit_for_bit(config, resumed: str, straight: str, monkeypatch):
    """SIGTERM after iteration 1: saved and stopped; the same command resumes and ends where `straight` did."""
    monkeypatch.setattr(preemption.StopSignal, "agreed", lambda self: True)
    assert training.run(config, resumed)["stopped_early"]
    monkeypatch.undo()
    _on_one_device(monkeypatch)
    training.run(config, resumed)
    jax.tree.map(np.testing.assert_array_equal, _final_params(resumed), _final_params(straight))
    timings = ("seconds_", "mfu_")
    assert ([{k: v for k, v in m.items() if not k.startswith(timings)} for m in _metrics(resumed)]
            == [{k: v for k, v in m.items() if not k.startswith(timings)} for m in _metrics(straight)])


ALGORITHMS = {  # every preset (and GRPO's variants) at test size: groups of 4 in a rollout of 8; rloo's rollouts
    # by continuous batching, 3 rows decoding at a time
    "grpo": ("configs/grpo.py:tiny", "rl.samples_per_prompt=4"),
    "dr_grpo": ("configs/grpo.py:size=tiny,variant=dr_grpo", "rl.samples_per_prompt=4"),
    "dapo": ("configs/grpo.py:size=tiny,variant=dapo", "rl.samples_per_prompt=4", "rl.overlong_cache=2"),
    "gspo": ("configs/grpo.py:size=tiny,variant=gspo", "rl.samples_per_prompt=4"),
    "rloo": ("configs/rloo.py:tiny", "rl.samples_per_prompt=4", "rl.rollout=continuous", "rl.rollout_slots=3"),
    "reinforce_pp": ("configs/reinforce_pp.py:tiny",),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_every_algorithm_runs_without_a_value_model_and_resumes_bit_for_bit(name, runs, tmp_path, monkeypatch):
    spec, *extra = ALGORITHMS[name]
    config = _preset(spec, runs, "mesh.data=1", *extra)
    _on_one_device(monkeypatch)
    straight = str(tmp_path / "straight")
    summary = training.run(config, straight)
    assert not os.path.exists(os.path.join(straight, "value"))  # no estimator here needs one
    iteration = [m for m in _metrics(straight) if m["step"] == 1 and "kl" in m][0]
    for key in ("reward", "kl", "kl_term", "entropy", "policy_loss", "logp_mismatch_mean", "mfu_train"):
        assert np.isfinite(iteration[key]), key
    assert "value_loss" not in iteration
    if name == "dapo":
        assert iteration["sampling_rounds"] >= 1 and "dropped_groups" in iteration
    assert summary["after"]["step"] == 2
    _stops_and_resumes_bit_for_bit(config, str(tmp_path / "resumed"), straight, monkeypatch)


@pytest.mark.parametrize("override,message", [
    ("rl.minibatch=3", "rl.rollout_batch=8 is not a multiple of rl.minibatch=3"),
    ("rl.kl_estimator=k9", "kl_estimator='k9'"),
    ("rl.kl_loss_estimator=k9", "kl_estimator='k9'"),
    ("rl.value_from=sft", "rl.value_from='sft'"),
    ("rl.estimator=ppo2", "rl.estimator: advantage estimator 'ppo2' is not one of"),
    ("rl.value_from=none", "rl.estimator: advantage estimator 'gae' needs a value model"),
    ("rl.estimator=grpo", "rl.estimator: advantage estimator 'grpo' .* needs group >= 2"),
    ("rl.estimator=rloo rl.samples_per_prompt=1", "needs group >= 2 samples per prompt"),
    ("rl.ratio=sentence", "rl.loss: ratio='sentence'"),
    ("rl.aggregation=mean", "rl.loss: aggregation='mean'"),
    ("rl.dynamic_sampling=True", "rl.dynamic_sampling .* needs rl.samples_per_prompt >= 2"),
    ("rl.overlong=cut", "rl.overlong='cut'"),
    ("rl.overlong_cache=99", "rl.overlong_cache=99"),
    ("rl.rollout=paged", "rl.rollout='paged'"),
    ("rl.samples_per_prompt=3", "multiple of rl.samples_per_prompt=3"),
    ("rl.temperature=0", "temperature"),
    ("rl.reward=", "rl.reward is empty"),
    ("rl.reward=gold=high", "the weight of 'gold' is 'high'"),
    ("rl.reward=gold,gold=2", "names a term twice"),
    ("rl.reward_run=", "pays the reward model: set rl.reward_run"),
    ("rl.ptx_coef=-1", "rl.ptx_coef=-1"),
    ("rl.ptx_coef=0.1 rl.ptx_data=", "needs rl.ptx_data"),
    ("rl.reward_shaping=sparse", "rl.reward_shaping='sparse'"),
    ("rl.reward=gold,numeric_match rl.reward_shaping=dense", "splits one score over the tokens"),
])
def test_bad_rl_settings_are_named(runs, override, message):
    with pytest.raises(ValueError, match=message):
        settings.settings(_config(runs, *override.split(" ")))


def test_a_reward_judge_that_does_not_load_is_named():
    with pytest.raises(ValueError, match="rl.reward term 'oracle': judge 'oracle' is neither a built-in"):
        rewards.reward_judge("oracle")
    assert rewards.reward_judge("numeric_match").name == "numeric_match"


def _wrong_count(prompts, responses):
    return [0.0]


def _nan(prompts, responses):
    return [float("nan")] * len(responses)


@pytest.mark.parametrize("judge,message", [
    ("no_such_module:f", "does not import"),
    (f"{__name__}:_wrong_count", r"returned scores of shape \(1,\) for 2 responses"),
    (f"{__name__}:_nan", "must be finite"),
    ("gold", "cannot judge prompt 0"),
])
def test_a_reward_function_that_fails_is_named_before_the_first_iteration(judge, message, runs, tmp_path,
                                                                          monkeypatch):
    _on_one_device(monkeypatch)
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"prompt": f"{i}+{i}", "reference": str(2 * i)}) + "\n" for i in range(9)))
    with pytest.raises(ValueError, match=message):
        rl_loop.RL(_config(runs, "mesh.data=1", f"rl.reward={judge}", f"rl.prompts={numbers}",
                           f"rl.eval_prompts={numbers}"), str(tmp_path / "run"), resuming=False)


def test_dense_shaping_needs_a_reward_model_with_per_token_terms(runs, small_tokenizer, tmp_path, monkeypatch):
    _on_one_device(monkeypatch)
    last = save_run(tmp_path / "rm_last", "configs/reward.py:tiny", small_tokenizer, _random_head,
                     SMALL_MODEL + ["reward.readout=last"],
                     metrics=[{"step": 1, "eval_reward_mean": 0.0, "eval_reward_std": 1.0}])
    with pytest.raises(ValueError, match="readout 'last'"):
        rl_loop.RL(_config(runs, f"rl.reward_run={last}", "rl.reward_shaping=dense", "mesh.data=1"),
                   str(tmp_path), resuming=False)


def test_a_reward_run_that_is_not_a_reward_model_is_named(runs, tmp_path, monkeypatch):
    _on_one_device(monkeypatch)
    policy, _, _ = runs
    with pytest.raises(Exception, match="not a reward model"):
        rl_loop.RL(_config(runs, f"rl.reward_run={policy}", "mesh.data=1"), str(tmp_path), resuming=False)


@pytest.mark.parametrize("override,message", [
    ("rl.estimator=foo", "llm-jax train: rl.estimator: advantage estimator 'foo' is not one of"),
    ("rl.reward=nomod:fn", "llm-jax train: rl.reward term 'nomod:fn': judge 'nomod:fn': module 'nomod' does not "
                           "import"),
])
def test_bad_rl_settings_through_the_command_are_one_line_before_anything_is_written(override, message, tmp_path,
                                                                                      capsys):
    from llm_jax import cli
    workdir = tmp_path / "run"
    assert cli.main(["train", "--config", "configs/grpo.py:tiny", "--workdir", str(workdir),
                     f"--config.{override}"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message) and "Traceback" not in err[0]
    assert not workdir.exists() or not os.listdir(workdir)
