"""The lm-evaluation-harness adapter (llm_jax/eval/harness.py) on tiny runs: its answers against plain forward
passes, lm-eval's own HF backend on the export of the same run (tests/eval/hf_reference.json), one compilation per
bucket, sharded = one device, truncation, chat templates, lm-eval's output files, and every bad input's message."""
import functools
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402  (after the skip)

from llm_jax import generate as generate_lib  # noqa: E402
from llm_jax import sharding  # noqa: E402
from llm_jax.data import chat  # noqa: E402
from llm_jax.data.records import Message  # noqa: E402
from llm_jax.eval import harness  # noqa: E402
from llm_jax.eval.harness import EvalError, LlmJaxLM, run_lm_eval  # noqa: E402
from llm_jax.model.transformer import Transformer  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(HERE, "tasks")
TASKS = ["llm_jax_mc", "llm_jax_rolling", "llm_jax_gen"]
LLAMA = os.path.join(os.path.dirname(HERE), "hf", "fixtures", "llama")
REFERENCE = os.path.join(HERE, "hf_reference.json")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
GEN_TASK_KWARGS = {"until": ["\n", "."], "max_gen_toks": 16, "do_sample": False}  # llm_jax_gen's: programs shared
LONG_TEXT = "the river runs fast in spring and slow in autumn " * 40  # longer than the fixture's 256-token context


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """The tiny random HF llama fixture imported as a run: HF tokenizer (BOS added), jinja chat template, 256-token
    context."""
    from llm_jax.hf.import_hf import import_hf
    run_dir = str(tmp_path_factory.mktemp("llama") / "run")
    import_hf(LLAMA, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def lm(llama_run):
    return LlmJaxLM(llama_run, batch_size=4)


@pytest.fixture(scope="module")
def evaluated(llama_run, tmp_path_factory):
    """All three local tasks through run_lm_eval, with samples and lm-eval's files."""
    out_dir = str(tmp_path_factory.mktemp("lm_eval_out"))
    results = run_lm_eval(llama_run, TASKS, include_path=TASKS_DIR, log_samples=True, out_dir=out_dir,
                          batch_size=4)  # the rows of the `lm` fixture: its programs serve
    return results, out_dir


def _ll(context, continuation):
    return Instance("loglikelihood", {}, (context, continuation), 0)


def _gen(context, **gen_kwargs):
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


@functools.lru_cache(maxsize=4)
def _forward(model):
    return jax.jit(lambda params, seq: model.apply(params, seq[None], method=Transformer.logits)[0])


def _log_probs(lm, ids):
    """log p(ids[t] | ids[:t]) for t ≥ 1 by one plain forward pass, and whether each is the argmax. The input
    is padded to the context so one compilation serves every call; causal attention keeps the tail out."""
    seq = np.zeros(lm.context, np.int32)
    seq[:len(ids) - 1] = ids[:-1]
    logits = _forward(lm.run.model)(lm.run.params, jnp.asarray(seq))[:len(ids) - 1]
    log_probs = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    targets = np.asarray(ids[1:])
    return log_probs[np.arange(len(targets)), targets], np.argmax(log_probs, axis=-1) == targets


def _expected(lm, context, continuation):
    """lm-eval's split by hand: the pair encoded whole after the tokenizer's BOS, the context's tokens (its
    trailing spaces moved to the continuation) cut off; an empty context is the BOS alone."""
    tok = lm.tokenizer
    whole = [tok.bos_id] + tok.encode(context + continuation)
    n_context = 1 + (len(tok.encode(context.rstrip())) if context else 0)
    n_continuation = len(whole) - n_context
    lp, hit = _log_probs(lm, whole[-(lm.context + 1):])
    return float(lp[-n_continuation:].sum()), bool(hit[-n_continuation:].all())


def test_requests_of_many_lengths_compile_once_per_bucket(lm):
    """Run first: every bucket shape it meets is new, and each compiles exactly once however many requests of
    however many lengths fill it (later tests reuse these programs)."""
    compiled = []

    def listen(event, duration, **kwargs):
        if event == COMPILE_EVENT and kwargs.get("fun_name") in ("jit(score_rows)", "jit(generate_fn)"):
            compiled.append(kwargs["fun_name"])

    before = set(lm.shapes)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        words = "one two three four five six seven eight nine ten eleven twelve".split()
        pairs = [(" ".join(words[:k % 12 + 1]) * (1 + k // 6), f" {words[k % 12]}") for k in range(48)]
        prompts = [" ".join(words[:k + 1]) * (1 + k // 4) for k in range(8)] + [LONG_TEXT]
        for _ in range(2):
            lm.loglikelihood([_ll(c, x) for c, x in pairs])
            lm.generate_until([_gen(p, **GEN_TASK_KWARGS) for p in prompts])
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    lengths = {len(lm.tok_encode(c + x)) for c, x in pairs}
    new = set(lm.shapes) - before
    score_shapes = {s for s in new if s[0] == "score"}
    generate_shapes = {s for s in new if s[0] == "generate"}
    assert len(score_shapes) >= 4 and len(lengths) > 5 * len(score_shapes)
    assert len(generate_shapes) >= 2 and len({len(lm.tok_encode(p)) for p in prompts}) > 2 * len(generate_shapes)
    assert compiled.count("jit(score_rows)") == len(score_shapes)
    assert compiled.count("jit(generate_fn)") == len(generate_shapes)


def test_loglikelihoods_equal_a_plain_forward_pass(lm):
    pairs = [("The capital of France is", " Paris"), ("Hello", " world, how are you today?"),
             ("", "An empty context is the BOS alone."), ("Q: 2 + 2 = ?\nA:", " 4"), ("x " * 90, "y z")]
    got = lm.loglikelihood([_ll(c, x) for c, x in pairs])
    for (context, continuation), (log_prob, greedy) in zip(pairs, got):
        want, want_greedy = _expected(lm, context, continuation)
        assert log_prob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    # the model's own argmax continuation is greedy
    ids = [lm.tokenizer.bos_id] + lm.tokenizer.encode("Once upon a time")
    n = len(ids)
    for _ in range(5):
        seq = np.zeros(lm.context, np.int32)
        seq[:len(ids)] = ids
        ids.append(int(jnp.argmax(_forward(lm.run.model)(lm.run.params, jnp.asarray(seq))[len(ids) - 1])))
    (log_prob, greedy), = lm._loglikelihood_tokens([(None, ids[:n], ids[n:])])
    assert greedy and log_prob == pytest.approx(float(_log_probs(lm, ids)[0][n - 1:].sum()), abs=1e-4)


def test_one_token_answers_of_one_context_share_a_row(lm):
    context = [lm.tokenizer.bos_id] + lm.tokenizer.encode("Question: which letter? Answer:")
    lp, _ = _log_probs(lm, context + [0])
    seq = np.zeros(lm.context, np.int32)
    seq[:len(context)] = context
    best = int(jnp.argmax(_forward(lm.run.model)(lm.run.params, jnp.asarray(seq))[len(context) - 1]))
    answers = [5, 17, best, 300]
    computed = dict(lm.tokens)
    got = lm._loglikelihood_tokens([(None, context, [a]) for a in answers] + [(None, context, [5, 17])])
    assert lm.tokens["scored_inputs"] - computed["scored_inputs"] == 2 * len(context) + 1  # two rows, not five
    for a, (log_prob, greedy) in zip(answers, got):
        want, _ = _log_probs(lm, context + [a])
        assert log_prob == pytest.approx(float(want[-1]), abs=1e-4) and greedy == (a == best)
    assert got[-1][0] == pytest.approx(float(_log_probs(lm, context + [5, 17])[0][-2:].sum()), abs=1e-4)


def test_the_lm_head_in_chunks_gives_the_same_scores(lm):
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 400, (2, 64)).astype(np.int32)
    segments = np.ones((2, 64), np.int32)
    segments[1, 40:] = 0
    targets = np.roll(tokens, -1, axis=1)
    scored = np.zeros((2, 64), np.float32)
    scored[0, 10:63], scored[1, 20:39] = 1, 1
    args = (lm.run.params, tokens, targets, segments, scored)
    whole = jax.jit(harness.make_score_fn(lm.run.model))(*args)
    chunked = jax.jit(harness.make_score_fn(lm.run.model, head_chunk_bytes=2 * 16 * 432 * 4))(*args)
    assert harness.head_chunk(2, 64, 432, 2 * 16 * 432 * 4) == 16
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_rolling_loglikelihood_is_the_whole_documents_log_prob(lm):
    text = "A journey of a thousand miles begins with a single step."
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    # lm-eval's HF backend: the document as the tokenizer encodes it (BOS first), after the BOS prefix
    ids = [lm.tokenizer.bos_id, lm.tokenizer.bos_id] + lm.tokenizer.encode(text)
    assert len(ids) < lm.context
    assert got == pytest.approx(float(_log_probs(lm, ids)[0].sum()), abs=1e-4)


def test_generate_until_cuts_at_the_first_stop_string(lm):
    context = "Q: What is the capital of France?\nA:"
    (free,) = lm.generate_until([_gen(context, until=[], max_gen_toks=12)])
    assert len(free) > 6
    stop = free[3:5]
    early = lm._early_stop_ids([stop])  # tokens whose own text holds the stop: a row may end at one
    assert all(stop in lm.tokenizer.decode([i]) and i not in lm._special_ids for i in early)
    cut, again = lm.generate_until([_gen(context, until=[stop], max_gen_toks=12),
                                    _gen(context, until=["\u2603", stop], max_gen_toks=12)])
    assert cut == again == free.split(stop)[0] and stop not in cut


def test_gen_kwargs_become_the_sampling_settings(lm, monkeypatch):
    seen = []

    def fake_generate(model, params, tokens, lengths, key, sampling):
        seen.append(sampling)
        n = sampling.max_new_tokens
        return generate_lib.Generation(np.zeros((len(lengths), n), np.int32), np.zeros((len(lengths), n)),
                                       np.ones((len(lengths), n)), np.full(len(lengths), n, np.int32))

    monkeypatch.setattr(harness, "generate", fake_generate)
    lm.generate_until([_gen("a", until=[], max_gen_toks=5, do_sample=True, temperature=0.7, top_k=5, top_p=0.9),
                       _gen("b", until=[], max_gen_toks=5, do_sample=False, temperature=0.7),
                       _gen("c", until=[], max_new_tokens=7)])
    sampled, greedy, default = seen
    assert (sampled.temperature, sampled.top_k, sampled.top_p, sampled.max_new_tokens) == (0.7, 5, 0.9, 5)
    assert greedy.temperature == 0.0 and default.temperature == 0.0 and default.max_new_tokens == 7
    assert set(lm.tokenizer.eos_ids) <= set(sampled.stop_ids)


@pytest.mark.parametrize("axes", [dict(data=8, fsdp=1), dict(data=1, fsdp=8)], ids=["data8", "fsdp8"])
def test_a_sharded_run_gives_the_loglikelihoods_of_one_device(lm, axes):
    mesh = sharding.make_mesh(dict(axes, tensor=1, sequence=1))
    sharded = LlmJaxLM(lm.run_dir, batch_size=4, mesh=mesh)
    assert sharded.rows == 8  # a multiple of the mesh's 8 batch shards
    pairs = [("The capital of France is", " Paris"), ("Hello", " world"), ("Numbers: 1, 2, 3,", " 4, 5"),
             ("", "Rain fell all night.")]
    want, got = (m.loglikelihood([_ll(c, x) for c, x in pairs]) for m in (lm, sharded))
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=0)
    assert [g[1] for g in got] == [w[1] for w in want]


def test_a_context_longer_than_the_models_is_cut_from_the_left_and_counted(lm, capsys):
    long_context = LONG_TEXT
    before = dict(lm.truncated)
    (log_prob, _), _ = lm.loglikelihood([_ll(long_context, " then"), _ll("short", " one")])
    assert lm.truncated["loglikelihood"] == before["loglikelihood"] + 1
    assert len(lm.tok_encode(long_context + " then")) > lm.context + 1
    assert log_prob == pytest.approx(_expected(lm, long_context, " then")[0], abs=1e-4)
    lm.generate_until([_gen(long_context, **GEN_TASK_KWARGS)])
    assert lm.truncated["generate_until"] == before["generate_until"] + 1
    err = capsys.readouterr().err
    assert "1 of 2 loglikelihood requests are longer than the run's context of 256 tokens" in err
    assert "1 of 1 generate_until requests" in err
    with pytest.raises(EvalError, match="max_gen_toks=256 must be in"):
        lm.generate_until([_gen("hi", until=[], max_gen_toks=256)])


def test_results_and_samples_land_in_lm_evals_own_layout(evaluated, llama_run):
    results, out_dir = evaluated
    json.dumps(results)  # serialisable as returned
    (directory,) = glob.glob(os.path.join(out_dir, "*"))
    assert os.path.basename(directory) == llama_run.replace("/", "__")
    (results_file,) = glob.glob(os.path.join(directory, "results_*.json"))
    with open(results_file) as f:
        saved = json.load(f)
    assert set(saved["results"]) == set(TASKS) and saved["config"]["llm_jax"]["truncated_requests"] == 3
    assert results["config"]["llm_jax"]["output"]["results"] == results_file
    for task in TASKS:
        (samples_file,) = glob.glob(os.path.join(directory, f"samples_{task}_*.jsonl"))
        with open(samples_file) as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == results["results"][task]["sample_len"] == len(results["samples"][task])
        assert {"doc_id", "arguments", "resps", "filtered_resps"} <= set(rows[0])
    # the mc task's long question (3 choices) is cut; the rest fit
    assert results["config"]["llm_jax"]["truncated_by_type"] == {"loglikelihood": 3, "generate_until": 0}


def _responses(samples):
    return {s["doc_id"]: (s["arguments"], [r[0] for r in s["resps"]]) for s in samples}


def compare_with_reference(results, reference) -> float:
    """Asserts our per-request answers equal lm-eval's HF backend's; returns the largest |Δ log-likelihood|."""
    worst = 0.0
    for task, documents in reference["documents"].items():
        ours = _responses(json.loads(json.dumps(results["samples"][task], default=str)))
        for doc in documents:
            arguments, responses = ours[doc["doc_id"]]
            assert [list(a) for a in arguments] == doc["arguments"], (task, doc["doc_id"])
            for got, want in zip(responses, doc["resps"]):
                if isinstance(want, str):  # a generation: the same text exactly
                    assert got == want, (task, doc["doc_id"])
                    continue
                got, want = (got, want) if isinstance(want, list) else ([got], [want])
                assert got[0] == pytest.approx(want[0], abs=1e-4, rel=1e-6), (task, doc["doc_id"])
                worst = max(worst, abs(got[0] - want[0]))
                if len(want) > 1:
                    assert bool(got[1]) == bool(want[1]), (task, doc["doc_id"])
    for task, metrics in reference["metrics"].items():
        for name, value in metrics.items():
            assert results["results"][task][name] == pytest.approx(value, rel=1e-5), (task, name)
    return worst


def test_answers_equal_lm_evals_hf_backend_on_the_export(evaluated):
    with open(REFERENCE) as f:
        reference = json.load(f)
    results, _ = evaluated
    assert reference["about"]["max_length"] == results["config"]["llm_jax"]["context"]
    assert compare_with_reference(results, reference) < 1e-3


@pytest.mark.slow
def test_live_hf_backend_on_the_export(evaluated, llama_run, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import make_hf_reference
    from llm_jax.hf.export_hf import export_hf
    export_hf(llama_run, str(tmp_path / "export"))
    reference = make_hf_reference.hf_reference(str(tmp_path / "export"), 256)
    assert compare_with_reference(evaluated[0], reference) < 1e-3


def test_the_model_is_registered_with_lm_eval(llama_run):
    from lm_eval.api.registry import get_model
    assert get_model("llm_jax") is LlmJaxLM
    model = LlmJaxLM.create_from_arg_string(f"run={llama_run},batch_size=2,max_gen_toks=32",
                                            {"batch_size": None, "device": "cpu"})
    assert (model.rows, model.max_gen_toks, model.max_length) == (2, 32, 256)
    with pytest.raises(EvalError, match=r"unknown llm_jax model arguments \['temperature'\]"):
        LlmJaxLM(llama_run, temperature=0.5)


def test_chat_template_of_an_imported_checkpoint_renders_as_transformers(lm):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    text = lm.apply_chat_template(history)
    assert text.startswith("<|begin_of_text|>") and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    messages = [Message(m["role"], m["content"]) for m in history]
    assert lm.tok_encode(text) == list(chat.render_prompt(messages, lm.tokenizer, "hf"))
    prefilled = lm.apply_chat_template(history + [{"role": "assistant", "content": "The answer is"}],
                                       add_generation_prompt=False)
    assert prefilled == text + "The answer is"
    assert lm.chat_template(True) == lm.tokenizer.chat_template and lm.chat_template(False) is None
    assert lm.tokenizer_name.startswith("llm_jax-")


def test_chat_template_of_a_sentencepiece_run_reads_back_its_own_tokens(small_tokenizer, tmp_path):
    from run_fixtures import save_run
    run_dir = save_run(tmp_path / "sft", "configs/sft.py:tiny", small_tokenizer, lambda p: p)
    model = LlmJaxLM(run_dir, batch_size=2)
    messages = [Message("user", "What is the capital of France?")]
    text = model.apply_chat_template([{"role": "user", "content": messages[0].content}])
    ids = [int(i) for i in chat.render_prompt(messages, model.tokenizer, chat.DEFAULT_TEMPLATE)]
    assert model.tok_encode(text) == ids
    assert model._encode_pair(text, " Paris") == (ids, model.tokenizer.encode(" Paris"))
    (log_prob, _), = model.loglikelihood([_ll(text, " Paris")])
    whole = ids + model.tokenizer.encode(" Paris")
    assert log_prob == pytest.approx(float(_log_probs(model, whole)[0][len(ids) - 1:].sum()), abs=1e-4)
    assert model.tokenizer.special_id("<|end|>") in model._stop_ids  # an answer ends at the end of its turn


def test_run_lm_eval_with_the_chat_template(llama_run):
    results = run_lm_eval(llama_run, "llm_jax_mc", include_path=TASKS_DIR, limit=2, log_samples=True,
                          apply_chat_template=True, batch_size=4)
    context = results["samples"]["llm_jax_mc"][0]["arguments"][0][0]
    assert context.startswith("<|begin_of_text|><|start_header_id|>")
    assert results["results"]["llm_jax_mc"]["sample_len"] == 2


# ---- bad input: one EvalError naming the thing, before any model is loaded


def test_an_unknown_task_names_the_closest_ones(llama_run):
    with pytest.raises(EvalError, match=r"unknown lm-eval task 'llm_jax_mcq'; did you mean llm_jax_mc"):
        run_lm_eval(llama_run, ["llm_jax_mcq"], include_path=TASKS_DIR)


def test_task_patterns_expand_as_lm_evals_command_line_expands_them():
    manager = harness.task_manager((TASKS_DIR,))
    assert harness.expand_task_names(manager, ["llm_jax_r*", "llm_jax_mc", "llm_jax_m?"]) == [
        "llm_jax_rolling", "llm_jax_mc"]


def test_a_task_yaml_that_does_not_parse_is_named(llama_run, tmp_path):
    include = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR, include)
    (include / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    with pytest.raises(EvalError, match=r"task file .*broken\.yaml does not parse as YAML"):
        run_lm_eval(llama_run, ["llm_jax_mc"], include_path=str(include))


def test_more_shots_than_the_few_shot_pool_names_the_task_and_pool(llama_run):
    with pytest.raises(EvalError, match=r"num_fewshot=9 is more than lm-eval task 'llm_jax_mc' can draw: its "
                                        r"few-shot pool has 8 documents"):
        run_lm_eval(llama_run, ["llm_jax_mc"], include_path=TASKS_DIR, num_fewshot=9)


def test_a_run_without_a_tokenizer_is_named(llama_run, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(llama_run, "config.json"), bare / "config.json")
    with pytest.raises(EvalError, match=rf"run directory '{bare}' has no tokenizer"):
        run_lm_eval(str(bare), ["llm_jax_mc"], include_path=TASKS_DIR)
    with pytest.raises(EvalError, match="does not exist"):
        run_lm_eval(str(tmp_path / "missing"), ["llm_jax_mc"])


def test_without_lm_eval_the_error_says_what_to_install(llama_run, monkeypatch):
    monkeypatch.setattr(harness, "lm_eval", None)
    with pytest.raises(EvalError, match=r"pip install -e '\.\[eval\]'"):
        run_lm_eval(llama_run, ["llm_jax_mc"])


def test_buckets_and_head_chunks():
    assert harness.length_buckets(256) == (16, 32, 64, 128, 256)
    assert harness.length_buckets(48) == (16, 32, 48)
    assert harness.head_chunk(16, 2048, 128_000, budget_bytes=1 << 28) == 32
    assert harness.head_chunk(2, 64, 432) == 64
