"""Hugging Face checkpoints of every family in and out, against the committed references of transformers.

The fixtures (tests/hf/fixtures/<family>/) are tiny random checkpoints written by transformers with the
reference logits and greedy tokens it computed (tests/hf/make_fixtures.py, run in an environment with torch); CI
compares against them without torch. tests/hf/test_live_transformers.py reruns the comparison live, and reloads
our exports in transformers, where transformers is installed.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llm_jax import cli, runs
from llm_jax.generate import SamplingConfig, generate
from llm_jax.hf.export_hf import ExportError, export_hf
from llm_jax.hf.import_hf import import_hf
from llm_jax.model.families import UnsupportedConfig
from llm_jax.model.transformer import Transformer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def fixture(family: str) -> str:
    return os.path.join(FIXTURES, family)


def hf_tensors(directory: str) -> dict:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> its import's run directory, made once per module."""
    root = tmp_path_factory.mktemp("imports")
    return {family: (import_hf(fixture(family), str(root / family)), str(root / family)) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers_within_1e_4(imported, family):
    run = runs.load_run(imported[family][1])
    reference = np.load(os.path.join(fixture(family), "reference.npz"))
    logits = run.model.apply(run.params, jnp.asarray(reference["input_ids"], jnp.int32), method=Transformer.logits)
    np.testing.assert_allclose(np.asarray(logits), reference["logits"], atol=1e-4, rtol=0)
    assert run.model_cfg.family == family


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_the_kv_cache_is_token_identical(imported, family):
    run = runs.load_run(imported[family][1])
    reference = np.load(os.path.join(fixture(family), "reference.npz"))
    prompt = np.asarray(reference["greedy_prompt"], np.int32)
    want = reference["greedy_tokens"]
    sampling = SamplingConfig(max_new_tokens=want.shape[1], temperature=0.0)
    out = generate(run.model, run.params, prompt, np.asarray([prompt.shape[1]], np.int32), jax.random.key(0), sampling)
    np.testing.assert_array_equal(np.asarray(out.tokens), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_the_checkpoint_back_tensor_for_tensor(imported, family, tmp_path):
    summary = export_hf(imported[family][1], str(tmp_path / "out"))
    got, want = hf_tensors(str(tmp_path / "out")), hf_tensors(fixture(family))
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    with open(tmp_path / "out" / "config.json") as f:
        config = json.load(f)
    with open(os.path.join(fixture(family), "config.json")) as f:
        original = json.load(f)
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings", "rms_norm_eps",
                "max_position_embeddings", "sliding_window", "layer_types", "query_pre_attn_scalar",
                "bos_token_id", "pad_token_id"):
        if key in original and original[key] is not None:
            assert config[key] == original[key] and type(config[key]) is type(original[key]), key
    assert config["architectures"] == original["architectures"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(summary["files"])


@pytest.mark.parametrize("family", FAMILIES)
def test_import_export_import_is_bit_identical(imported, family, tmp_path):
    export_hf(imported[family][1], str(tmp_path / "out"))
    import_hf(str(tmp_path / "out"), str(tmp_path / "again"))
    first, second = runs.load_run(imported[family][1]), runs.load_run(str(tmp_path / "again"))
    assert first.config.model.to_dict() == second.config.model.to_dict()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), first.params,
                 second.params)


def test_a_sharded_import_equals_the_single_device_one(imported, tmp_path):
    """FSDP × tensor over 8 devices: every param lands split on the mesh and equal to the one-device import."""
    run_dir = str(tmp_path / "sharded")
    summary = import_hf(fixture("qwen3"), run_dir, ["mesh.fsdp=4", "mesh.tensor=2"])
    assert summary["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
    one = runs.load_run(imported["qwen3"][1])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), one.params,
                 runs.load_run(run_dir).params)


def test_import_records_the_source_and_reruns_as_a_no_op(imported, tmp_path):
    summary, run_dir = imported["llama"]
    with open(os.path.join(run_dir, "import.json")) as f:
        assert json.load(f) == summary
    assert summary["source"] == os.path.abspath(fixture("llama"))
    assert set(summary["files"]) == {"config.json", "model-00001-of-00003.safetensors",
                                     "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"}
    assert import_hf(fixture("llama"), run_dir) == summary
    with pytest.raises(ValueError, match="already holds an import of"):
        import_hf(fixture("qwen2"), run_dir)


def _broken_copy(tmp_path, family, edit_config=None, edit_tensors=None, remove=None) -> str:
    directory = tmp_path / f"broken_{family}"
    shutil.copytree(fixture(family), directory)
    if edit_config:
        path = directory / "config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(str(directory / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(directory / "model.safetensors"))
    if remove:
        os.remove(directory / remove)
    return str(directory)


@pytest.mark.parametrize("family, edit_config, edit_tensors, remove, message", [
    ("qwen2", lambda c: c.update(model_type="phi3"), None, None, "model_type='phi3' is not supported"),
    ("mistral", lambda c: c["rope_parameters"].update(rope_type="yarn"), None, None,
     "rope_type='yarn' is not supported"),
    ("qwen2", lambda c: c.update(num_local_experts=8), None, None, "num_local_experts=8: mixture-of-experts"),
    ("qwen2", lambda c: c.update(hidden_act="relu"), None, None, "hidden_act='relu' is not supported"),
    ("gemma3", lambda c: c.update(layer_types=["full_attention", "sliding_attention", "full_attention"]), None,
     None, "is not every 1-th layer global"),
    ("llama", None, None, "model-00002-of-00003.safetensors", "shard file missing"),
    ("qwen2", None, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((3, 64), np.float32)}), None,
     "tensor 'model.layers.0.mlp.up_proj.weight' has shape \\[3, 64\\], expected \\[128, 64\\]"),
    ("qwen2", None, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((128, 64), np.int32)}), None,
     "has dtype I32"),
    ("qwen2", None, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"), None,
     "has no tensor 'model.layers.1.self_attn.k_proj.bias'"),
    ("qwen2", None, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)}), None,
     "'model.layers.0.self_attn.o_proj.bias' \\(and 0 more\\) is not part of a qwen2 model"),
    ("qwen3", lambda c: c.update(vocab_size=400), None, None, "has 4\\d\\d pieces but model.vocab_size=400"),
])
def test_bad_checkpoints_fail_naming_the_field_or_tensor_before_anything_is_written(
        tmp_path, family, edit_config, edit_tensors, remove, message):
    source = _broken_copy(tmp_path, family, edit_config, edit_tensors, remove)
    with pytest.raises((ValueError, UnsupportedConfig), match=message):
        import_hf(source, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_commands_exit_0_with_a_summary_and_1_with_one_line(imported, tmp_path, capsys):
    assert cli.main(["import-hf", "--hf", fixture("mistral"), "--workdir", str(tmp_path / "run")]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "mistral"
    assert cli.main(["export-hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    assert cli.main(["export-hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty: pass --overwrite" in err
    assert cli.main(["export-hf", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--overwrite",
                     "--dtype", "bfloat16"]) == 0
    assert all(t.dtype == jnp.bfloat16 for t in hf_tensors(str(tmp_path / "out")).values())
    assert cli.main(["import-hf", "--hf", str(tmp_path / "nothing"), "--workdir", str(tmp_path / "r2")]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_export_refuses_a_non_empty_directory(imported, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="is not empty"):
        export_hf(imported["qwen2"][1], str(tmp_path / "out"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_generate_renders_prompts_as_transformers_does(imported, family, tmp_path, capsys):
    """The prompt ids of `generate` equal transformers': its chat template with the generation prompt, and with
    --no-chat-template the text tokenized as AutoTokenizer does (a BOS where it adds one)."""
    with open(os.path.join(fixture(family), "reference.json")) as f:
        reference = json.load(f)
    conversation = reference["conversations"][2]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": conversation["messages"][:-1]}) + "\n")
    raw = tmp_path / "raw.jsonl"
    # the rendered conversation as plain text: transformers' ids of it (add_special_tokens=False), after a BOS
    # where the tokenizer adds one
    raw.write_text(json.dumps({"prompt": conversation["text"]}) + "\n")
    raw_ids = [reference["bos_token_id"]] * reference["add_bos"] + conversation["ids"]
    run_dir = imported[family][1]
    for spec, extra, want in ((prompts, [], conversation["prompt_ids"]), (raw, ["--no-chat-template"], raw_ids)):
        out = tmp_path / f"{spec.stem}_out.jsonl"
        assert cli.main(["generate", "--run", run_dir, "--prompts", str(spec), "--out", str(out),
                         "--max-new-tokens", "4", *extra]) == 0
        row = json.loads(out.read_text())
        assert row["prompt_token_ids"] == want
        assert len(row["tokens"]) == len(row["log_probs"]) == 4
    capsys.readouterr()
