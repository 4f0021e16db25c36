"""A stage that starts from a LoRA run starts from its merged weights: the run's learning is in its adapters."""
import jax
import numpy as np

from run_fixtures import RL_MODEL_OVERRIDES, save_run
from llm_jax import runs
from llm_jax.model import lora
from llm_jax.model.transformer import Transformer
from llm_jax.train.checkpoint import restore_params


def test_restoring_a_lora_run_into_a_plain_model_merges_its_adapters(tmp_path, small_tokenizer):
    def trained_adapters(params):  # B = 0 would make the merge a no-op: give every adapter a real update
        keys = iter(jax.random.split(jax.random.key(3), 64))
        return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), params)

    run_dir = save_run(tmp_path / "sft_lora", "configs/sft.py:tiny", small_tokenizer, trained_adapters,
                        overrides=RL_MODEL_OVERRIDES + ["model.lora_rank=4", "model.lora_targets=wq,wv,w_up"])
    run = runs.load_run(run_dir)
    assert run.model_cfg.lora_rank == 4
    plain = Transformer(lora.without_lora(run.model_cfg))
    restored = restore_params(run_dir, runs.abstract_params(plain, init_method=Transformer.logits))
    want = lora.merge(run.params, run.model_cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, want)
    tokens = np.arange(12, dtype=np.int32)[None] % 100
    np.testing.assert_allclose(plain.apply(restored, tokens, method=Transformer.logits),
                               run.model.apply(run.params, tokens, method=Transformer.logits), atol=1e-4)
    # the base weights alone would not give the LoRA run's outputs
    base = lora.without_adapters(run.params)
    assert not np.allclose(base["params"]["blocks"]["attn"]["wq"], restored["params"]["blocks"]["attn"]["wq"])
