"""Ranked and edited preferences: records, their pairs, the Bradley–Terry loss over every ordered pair, and packed
rows (a prompt and several answers per row) that give the scores, loss and gradients of one pair per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import sharding
from llm_jax.config_lib import load
from llm_jax.data.preference_rows import row_groups, render_preferences
from llm_jax.data.records import iter_preference_examples, iter_ranked_examples
from llm_jax.data.sources import DataError
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.kernels.attention import PROMPT_SEGMENT
from llm_jax.model.config import ModelConfig
from llm_jax.objectives import get_objective
from llm_jax.objectives.reward import RewardModel, make_loss_fn
from llm_jax.train.loop import build_training
from test_post_training_steps import write_records

SMALL_MODEL = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=128",
               "model.vocab_size=512", "tokenizer.vocab_size=512", "data.batch_size=4"]
WORDS = "the cat a dog sat on mat red big small one two three".split()


@pytest.fixture
def tokenizer(small_tokenizer):
    return Tokenizer.load(small_tokenizer)


# ------------------------------------------------------------------------------------------------------ records

def test_rankings_pairs_and_edits(tmp_path):
    path = write_records(tmp_path / "r.jsonl", [
        {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranking": [2, [0, 3], 1]},
        {"prompt": "q", "chosen": "good", "rejected": "bad", "edited": "best"},
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
    ])
    ranked = list(iter_ranked_examples(path))
    assert ranked[0].levels == (1, 2, 0, 1)  # c first, then a and d tied, then b
    assert ranked[0].pairs() == [(2, 0), (2, 3), (2, 1), (0, 1), (3, 1)]  # the tie a = d gives no pair
    assert (ranked[1].responses, ranked[1].levels) == (("best", "good", "bad"), (0, 1, 2))
    pairs = [(p.chosen, p.rejected) for p in iter_preference_examples(path)]
    assert pairs == [("c", "a"), ("c", "d"), ("c", "b"), ("a", "b"), ("d", "b"),
                     ("best", "good"), ("best", "bad"), ("good", "bad"), ("good", "bad")]
    without = [(p.chosen, p.rejected) for p in iter_preference_examples(path, use_edited=False)]
    assert without[5:] == [("good", "bad"), ("good", "bad")]
    assert all(p.where == f"{path}:2" for p in list(iter_preference_examples(path))[5:8])


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 2]},
     r"r\.jsonl:1: 'ranking' does not list answer\(s\) \[1\] of the 3"),
    ({"prompt": "q", "responses": ["a"], "ranking": [0]}, r"r\.jsonl:1: 'responses' holds 1 answer\(s\); a ranking "
                                                         r"compares at least 2"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [[0, 1]]}, r"r\.jsonl:1: 'ranking' puts every answer at "
                                                                    r"one place"),
    ({"prompt": "q", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]},
     r"r\.jsonl:1: responses\[0\] and responses\[2\] are the same text \('a'\)"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1, 1]}, r"r\.jsonl:1: 'ranking' lists answer 1 twice"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}, r"r\.jsonl:1: 'ranking' entry 2 is not an index"),
    ({"prompt": "q", "responses": ["a", "b"]}, r"r\.jsonl:1: 'responses' needs a 'ranking'"),
    ({"prompt": "q", "edited": "a", "rejected": "b"}, r"r\.jsonl:1: 'edited' without 'chosen'"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "edited": "a"},
     r"r\.jsonl:1: 'edited' and 'chosen' are the same text"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "responses": ["a", "b"], "ranking": [0, 1]},
     r"r\.jsonl:1: both 'responses' and 'chosen' given"),
])
def test_bad_rankings_are_named_with_file_and_line(tmp_path, record, message):
    path = write_records(tmp_path / "r.jsonl", [record])
    with pytest.raises(DataError, match=message):
        list(iter_ranked_examples(path))


# -------------------------------------------------------------------------------------------------------- rows

def _config(train, layout="pairs", per_row=4, seq_len=48, extra=()):
    return load("configs/reward.py:tiny", SMALL_MODEL + [f"data.train={train}", f"data.seq_len={seq_len}",
                                                         f"reward.layout={layout}",
                                                         f"reward.responses_per_row={per_row}", *extra])


def _rankings(n, seed=0):
    """n records: rankings of 2-5 answers with ties, and pairs with an edited answer."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, 3))
        k = int(rng.integers(2, 6))
        answers = list(dict.fromkeys(" ".join(rng.choice(WORDS, int(rng.integers(1, 5)))) for _ in range(3 * k)))[:k]
        if i % 3 == 2:
            out.append({"prompt": prompt, "chosen": answers[0], "rejected": answers[1], "edited": answers[-1]}
                       if len(answers) > 2 else {"prompt": prompt, "chosen": answers[0], "rejected": answers[1]})
            continue
        levels = rng.integers(0, 3, len(answers))
        levels[0], levels[1] = 0, 1 + levels[1] % 2  # at least two places
        ranking = [[int(j) for j in np.flatnonzero(levels == level)] for level in sorted(set(levels))]
        out.append({"prompt": prompt, "responses": answers, "ranking": ranking})
    return out


def test_packed_row_layout_by_hand(tmp_path, tokenizer):
    path = write_records(tmp_path / "r.jsonl", [{"prompt": "the cat", "responses": ["a dog", "sat", "red mat"],
                                          "ranking": [1, 0, 2]}] * 4)
    rows, _, stats = render_preferences(_config(path, "packed", extra=(f"data.eval={path}",)), tokenizer, "",
                                        "packed", 4)
    row = {k: v[0] for k, v in rows.items()}
    prompt = [tokenizer.bos_id, tokenizer.special_id("<|user|>"), *tokenizer.encode("the cat"),
              tokenizer.special_id("<|end|>"), tokenizer.special_id("<|assistant|>")]
    p = len(prompt)
    assert row["inputs"][:p - 1].tolist() == prompt[:-1]
    assert (row["segment_ids"][:p - 1] == PROMPT_SEGMENT).all() and row["loss_mask"][:p - 1].sum() == 0
    end = tokenizer.special_id("<|end|>")
    seen = {}
    for slot in range(3):
        at = np.flatnonzero(row["segment_ids"] == slot + 1)
        assert row["inputs"][at[0]] == prompt[-1]  # every answer starts from the assistant marker
        assert row["positions"][at].tolist() == list(range(p - 1, p - 1 + len(at)))
        assert row["response_last"][slot] == at[-1] and row["inputs"][at[-1]] == end
        assert row["targets"][at[-1]] == tokenizer.eos_id and row["loss_mask"][at[-1]] == 0
        seen[tokenizer.decode(row["targets"][at][row["loss_mask"][at] > 0][:-1].tolist())] = slot
    assert set(seen) == {"a dog", "sat", "red mat"}
    pairs = {(int(b), int(w)) for b, w, v in zip(row["pair_better"], row["pair_worse"], row["pair_valid"]) if v}
    assert pairs == {(seen["sat"], seen["a dog"]), (seen["sat"], seen["red mat"]), (seen["a dog"], seen["red mat"])}
    assert row["pair_valid"].tolist() == [1, 1, 1, 0, 0, 0]  # Q = 4·3/2 slots
    assert stats["n_train_rows"] == 4 and stats["n_train_pairs"] == 12
    # the answers' order is shuffled per record: not always the order of the record
    orders = {tuple(int(rows["inputs"][r][rows["response_last"][r][s] - 1]) for s in range(3)) for r in range(4)}
    assert len(orders) > 1


def test_row_groups_place_every_pair_once():
    pairs = [(i, j) for i in range(7) for j in range(i + 1, 7)]
    groups, unfit = row_groups([5] * 7, 3, pairs, seq_len=3 + 5 * 3, max_answers=4)
    placed = [p for _, ps in groups for p in ps]
    assert sorted(placed) == pairs and not unfit
    assert all(len(m) <= 3 for m, _ in groups)  # three answers of 5 tokens fill 18 tokens beside the prompt's 3
    assert row_groups([5, 30], 3, [(0, 1)], seq_len=20, max_answers=4) == ([], [(0, 1)])


def test_a_record_too_big_for_one_row_is_split_and_logged(tmp_path, tokenizer):
    record = {"prompt": "the cat", "responses": [" ".join(WORDS[i:i + 3]) for i in range(6)],
              "ranking": [0, 1, 2, 3, 4, 5]}
    path = write_records(tmp_path / "r.jsonl", [record] * 4)
    said = []
    rows, _, stats = render_preferences(_config(path, "packed", per_row=3, extra=(f"data.eval={path}",)),
                                        tokenizer, "", layout="packed", responses_per_row=3, log=said.append)
    assert stats["n_train_pairs"] == 4 * 15 and stats["n_train_records_split"] == 4
    assert said[0].startswith(f"{path}:1: 6 answers") and "split into" in said[0]
    per_row = rows["pair_valid"].sum(1)
    assert per_row.max() <= 3 and per_row.sum() == 60


def test_the_held_out_split_keeps_a_prompts_records_together(tmp_path, tokenizer):
    records = [{"prompt": f"the cat {w}", "responses": [f"{w} a", f"{w} b", f"{w} c"], "ranking": [0, 1, 2]}
               for w in WORDS] * 3
    path = write_records(tmp_path / "r.jsonl", records)
    train, held, stats = render_preferences(_config(path, extra=("data.eval_fraction=0.3",)), tokenizer, "")
    marker = tokenizer.special_id("<|assistant|>")

    def prompts(rows):
        return {tuple(r[:r.tolist().index(marker)].tolist()) for r in rows["chosen_inputs"]}
    assert prompts(train) and prompts(held) and not prompts(train) & prompts(held)
    assert stats["n_train_pairs"] + stats["n_eval_pairs"] == 3 * len(records)


# ------------------------------------------------------------------------------------------- loss and gradients

def test_bradley_terry_over_a_ranking_by_hand():
    from llm_jax.objectives.reward import pair_loss
    rewards = jnp.array([2.0, 0.5, -1.0])  # a ranking of three, best first
    better, worse = rewards[jnp.array([0, 0, 1])], rewards[jnp.array([1, 2, 2])]
    loss, stats = pair_loss(better, worse, jnp.ones(3), margin=1.0)
    want = sum(np.log1p(np.exp(-(d - 1.0))) for d in (1.5, 3.0, 1.5))
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert float(stats["accuracy"]) == 3 and float(stats["margin"]) == 6.0


def _model_and_params(config, seed=0):
    config.mesh.update(dict(data=1, fsdp=1, tensor=1, sequence=1))
    mesh, rules = sharding.make_mesh(config.mesh, jax.devices()[:1]), sharding.check_rules(config.mesh_rules)
    t = build_training(config, ModelConfig.from_config(config.model), mesh, rules, get_objective("reward"))
    params = t.create_state().params
    head = jax.random.normal(jax.random.key(seed), params["params"]["reward_head"].shape) * 0.5
    params = {"params": {**params["params"], "reward_head": head, "reward_bias": jnp.float32(0.3)}}
    return t.model, params


@pytest.mark.parametrize("readout", ["last", "likelihood"])
def test_packed_rows_give_the_pairs_layouts_loss_and_gradients(tmp_path, tokenizer, readout):
    path = write_records(tmp_path / "r.jsonl", _rankings(12))
    extra = (f"data.eval={path}", f"reward.readout={readout}", "reward.margin=0.25")
    results = {}
    for layout, seq_len in (("pairs", 48), ("packed", 112)):
        config = _config(path, layout, per_row=3, seq_len=seq_len, extra=extra)
        rows, _, stats = render_preferences(config, tokenizer, "", layout, 3)
        model, params = _model_and_params(config)
        loss_fn = make_loss_fn(model, 0.25, readout, layout)
        batch = {k: jnp.asarray(v) for k, v in rows.items()}
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
        results[layout] = (loss, metrics, grads, stats)
    (loss_p, m_p, g_p, s_p), (loss_k, m_k, g_k, s_k) = results["pairs"], results["packed"]
    assert s_p["n_train_too_long"] == s_k["n_train_too_long"] == s_k["n_train_pairs_too_long"] == 0
    assert s_p["n_train_pairs"] == s_k["n_train_pairs"] == float(m_p["weight"]) == float(m_k["weight"]) > 20
    assert s_k["n_train_rows"] < s_p["n_train_rows"]
    assert s_k["train_tokens_per_pair"] < s_p["train_tokens_per_pair"]
    np.testing.assert_allclose(float(loss_k), float(loss_p), rtol=1e-5)
    for key in m_p:
        np.testing.assert_allclose(float(m_k[key]), float(m_p[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_p))
    for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(g_p)):  # f32 sums taken in another order: 1e-5 of the scale
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale)


def test_packed_scores_are_each_answers_alone(tmp_path, tokenizer):
    """score_packed on a row equals score on each answer's own sequence."""
    path = write_records(tmp_path / "r.jsonl", _rankings(4, seed=3))
    config = _config(path, "packed", per_row=5, seq_len=160, extra=(f"data.eval={path}", "reward.readout=likelihood"))
    rows, _, _ = render_preferences(config, tokenizer, "", "packed", 5)
    model, params = _model_and_params(config, seed=1)
    packed = model.apply(params, *(jnp.asarray(rows[k]) for k in ("inputs", "positions", "segment_ids",
                                                                  "response_last", "targets", "loss_mask")),
                         readout="likelihood", method=RewardModel.score_packed)
    for r in range(len(rows["inputs"])):
        for slot in range(int(rows["segment_ids"][r].max())):
            keep = (rows["segment_ids"][r] == PROMPT_SEGMENT) | (rows["segment_ids"][r] == slot + 1)
            alone = {k: rows[k][r][keep][None] for k in ("inputs", "positions", "targets", "loss_mask")}
            alone = {k: jnp.asarray(v) for k, v in alone.items()}
            want = model.apply(params, alone["inputs"], alone["positions"], jnp.ones_like(alone["inputs"]),
                               alone["targets"], alone["loss_mask"], readout="likelihood", method=RewardModel.score)
            np.testing.assert_allclose(float(packed[r, slot]), float(want[0]), rtol=1e-5, atol=1e-5)


def _packed_batch(tokenizer, tmp_path, config):
    rows, _, _ = render_preferences(config, tokenizer, "", "packed", 3)
    return {k: v[:8] for k, v in rows.items()}


@pytest.mark.parametrize("sharded", [dict(data=2, fsdp=2, tensor=2, sequence=1),
                                     dict(data=2, fsdp=1, tensor=2, sequence=2)])
def test_packed_step_sharded_matches_one_device(tmp_path, tokenizer, sharded):
    """Sharded over 8 devices, with sequence parallelism too: the rows' (B, 3) answer ends and pairs, which no
    length axis divides, are split by rows alone."""
    path = write_records(tmp_path / "r.jsonl", _rankings(16, seed=5))
    history = {}
    for name, axes, devices in (("one", dict(data=1, fsdp=1, tensor=1, sequence=1), jax.devices()[:1]),
                                ("eight", sharded, jax.devices())):
        config = _config(path, "packed", per_row=3, seq_len=112,
                         extra=(f"data.eval={path}", "data.batch_size=8", "optim.lr=1e-2", "optim.warmup_steps=0"))
        config.mesh.update(axes)
        mesh, rules = sharding.make_mesh(config.mesh, devices), sharding.check_rules(config.mesh_rules)
        t = build_training(config, ModelConfig.from_config(config.model), mesh, rules, get_objective("reward"))
        assert t.model.shared_prefix
        state, out = t.create_state(), []
        batch = _packed_batch(tokenizer, tmp_path, config)
        for _ in range(2):
            state, metrics = t.train_step(state, sharding.global_batch_from_local(batch, mesh, rules))
            out.append([float(metrics[k]) for k in ("loss", "grad_norm", "accuracy")])
        history[name] = out
    np.testing.assert_allclose(history["eight"], history["one"], rtol=2e-5, atol=1e-6)


def test_packed_layout_refuses_bad_settings(tmp_path):
    from llm_jax.objectives.reward import layout_of
    path = write_records(tmp_path / "r.jsonl", _rankings(2))
    with pytest.raises(ValueError, match=r"reward.layout='rows' is not one of \('pairs', 'packed'\)"):
        layout_of(_config(path, "rows"))
    with pytest.raises(ValueError, match="reward.responses_per_row must be ≥ 2"):
        layout_of(_config(path, "packed", per_row=1))
    with pytest.raises(ValueError, match="soft prompt"):
        layout_of(_config(path, "packed", extra=("model.prompt_tuning_tokens=4",)))


def test_dpo_trains_on_every_pair_of_a_ranking(tmp_path, tokenizer, tiny_rl_runs):
    from llm_jax.objectives import dpo
    path = write_records(tmp_path / "r.jsonl", [
        {"prompt": "the cat", "responses": ["a dog", "sat", "red mat", "one"], "ranking": [1, [0, 3], 2]},
        {"prompt": "a dog", "chosen": "the cat", "rejected": "mat", "edited": "two cats"}] * 2)
    policy, _ = tiny_rl_runs
    config = load("configs/dpo.py:tiny", SMALL_MODEL + [f"data.train={path}", f"data.eval={path}",
                                                        "data.seq_len=48", f"dpo.reference={policy}"])
    data = dpo.build_data(config, tokenizer, str(tmp_path))
    assert data.stats["n_train_pairs"] == 2 * (5 + 3)  # the ranking's five ordered pairs (no tie), the edit's three
    batch = data.eval_batches(1)[0]
    assert np.isfinite(batch["ref_chosen_logp"]).all() and (batch["ref_chosen_logp"] < 0).all()


@pytest.mark.parametrize("layout", ["pairs", "packed"])
def test_the_memory_commands_batch_is_the_rows_shape(tmp_path, tokenizer, layout):
    from llm_jax.objectives import reward
    path = write_records(tmp_path / "r.jsonl", _rankings(16, seed=2))
    config = _config(path, layout, per_row=3, seq_len=112, extra=(f"data.eval={path}",))
    rows, _, _ = render_preferences(config, tokenizer, "", layout, 3)
    abstract = reward.abstract_batch(config)
    assert {k: (v.shape[1:], v.dtype) for k, v in rows.items()} == {k: (a.shape[1:], a.dtype)
                                                                    for k, a in abstract.items()}
    assert reward.sequences_per_row(config) == (2 if layout == "pairs" else 1)
