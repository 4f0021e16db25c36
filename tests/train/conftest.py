"""A small tokenizer and config shared by the end-to-end loop tests."""
import pytest

from llm_jax.cli import load
from llm_jax.data.tokenizer_stage import run_tokenizer

SMALL_OVERRIDES = [
    "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.d_ff=128",
    "model.vocab_size=512", "tokenizer.vocab_size=512", "data.seq_len=32", "data.batch_size=8",
    "optim.warmup_steps=2", "train.steps=8", "train.log_every=1", "train.eval_every=4",
    "train.checkpoint_every=4", "train.eval_batches=2",
]


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tok")
    return run_tokenizer(load("configs/pretrain.py:tiny", SMALL_OVERRIDES), str(workdir))["path"]


@pytest.fixture
def small_overrides():
    return list(SMALL_OVERRIDES)


@pytest.fixture
def small_config(small_tokenizer):
    def make(*extra):
        return load("configs/pretrain.py:tiny", SMALL_OVERRIDES + [f"tokenizer.path={small_tokenizer}", *extra])
    return make
