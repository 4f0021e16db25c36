"""A small config shared by the end-to-end loop tests (the small tokenizer is in tests/conftest.py)."""
import pytest

from llm_jax.config_lib import load


@pytest.fixture
def small_config(small_tokenizer, small_overrides):
    def make(*extra):
        return load("configs/pretrain.py:tiny", small_overrides + [f"tokenizer.path={small_tokenizer}", *extra])
    return make
