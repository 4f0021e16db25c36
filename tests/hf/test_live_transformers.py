"""Live parity with transformers, where it is installed (`pip install -e '.[dev,parity]'`); skipped otherwise.

CI compares against the references committed with the fixtures (test_hf_checkpoints.py); this reruns the
comparison against transformers itself and loads our exports back into it:
- an imported fixture, exported: transformers' `from_pretrained` gives the fixture's reference logits;
- a model trained here (sentencepiece tokenizer, llama family), exported: transformers' logits equal ours and
  its tokenizer's ids equal the sentencepiece ids, so the export serves as it trained.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llm_jax import runs  # noqa: E402  (after the skips)
from llm_jax.hf.export_hf import export_hf  # noqa: E402
from llm_jax.hf.import_hf import import_hf  # noqa: E402
from llm_jax.model.transformer import Transformer  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def _hf_logits(directory: str, input_ids: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="eager")
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(input_ids, np.int64))).logits.float().numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_our_export_with_the_same_logits(family, tmp_path):
    import_hf(os.path.join(FIXTURES, family), str(tmp_path / "run"))
    export_hf(str(tmp_path / "run"), str(tmp_path / "out"))
    reference = np.load(os.path.join(FIXTURES, family, "reference.npz"))
    np.testing.assert_allclose(_hf_logits(str(tmp_path / "out"), reference["input_ids"]), reference["logits"],
                               atol=1e-4, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    original = transformers.AutoTokenizer.from_pretrained(os.path.join(FIXTURES, family))
    text = "Hello world, 3.14159 — Привет 👍\n\n  end"
    assert tokenizer(text).input_ids == original(text).input_ids


def test_a_run_trained_here_exports_as_llama_that_transformers_serves(tmp_path, small_tokenizer):
    from run_fixtures import save_run  # a fresh small model of the pretraining config, saved as a run
    run_dir = str(tmp_path / "run")  # weights × 5: logits far from uniform, so the comparison can fail
    save_run(run_dir, "configs/pretrain.py:tiny", small_tokenizer, edit=lambda p: jax.tree.map(lambda x: 5 * x, p))
    export_hf(run_dir, str(tmp_path / "out"))
    run = runs.load_run(run_dir)
    text = "The cat sat on the mat.\nA second line,  with two spaces."
    ids = [run.tokenizer.bos_id] + run.tokenizer.encode(text)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf_tokenizer(text).input_ids == ids
    ours = run.model.apply(run.params, jnp.asarray([ids], jnp.int32), method=Transformer.logits)
    np.testing.assert_allclose(_hf_logits(str(tmp_path / "out"), np.asarray([ids])), np.asarray(ours),
                               atol=1e-4, rtol=0)
