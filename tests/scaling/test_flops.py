"""FLOP and parameter counts against a hand count and against the model's real parameters."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llm_jax.model.config import ModelConfig
from llm_jax.model.transformer import Transformer
from llm_jax.scaling import flops

SMALL = ModelConfig(n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16, vocab_size=10,
                    tie_embeddings=False)


def test_hand_count():
    # per layer: wq 8·2·4 + wo 8·2·4 + wk 8·1·4 + wv 8·1·4 = 192; SwiGLU 3·8·16 = 384; two norms 16
    counts = flops.param_counts(SMALL)
    assert counts["per_layer"] == 192 + 384 + 16
    assert counts["kaplan"] == 2 * 592 + 8            # + final norm
    assert counts["total"] == 1192 + 80 + 80           # + embedding + untied head
    assert counts["matmul"] == 2 * (192 + 384) + 80    # projections + head
    # training at T=6: 6·1232 + attention 6·L·H·Dh·(T+1) = 6·2·2·4·7
    assert flops.training_flops_per_token(SMALL, 6) == 6 * 1232 + 672
    assert flops.forward_flops_per_token(SMALL, 6) == (6 * 1232 + 672) // 3


def test_causal_attention_term_is_the_average_row_length():
    # a causal row of length T attends (T+1)/2 keys on average; q·kᵀ and p·v cost 2·Dh each per key and head
    t = 5
    keys_attended = sum(range(1, t + 1)) / t
    per_token_forward = SMALL.n_layers * SMALL.n_heads * 2 * (2 * SMALL.head_dim) * keys_attended
    assert flops.attention_flops_per_token(SMALL, t) == 3 * per_token_forward


def test_counts_match_the_model():
    for cfg in (SMALL, ModelConfig(**{**SMALL.__dict__, "tie_embeddings": True})):
        variables = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                                   method=Transformer.logits))
        n = sum(np.size(x) for x in jax.tree.leaves(variables))
        assert n == flops.param_counts(cfg)["total"]


def test_every_family_counts_its_own_params_and_windowed_layers_attend_fewer_keys():
    import dataclasses
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma3"):
        cfg = dataclasses.replace(SMALL, family=family, sliding_window=3 if family in ("mistral", "gemma3") else 0,
                                  global_every=2 if family == "gemma3" else 0)
        variables = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                                                   method=Transformer.logits))
        assert sum(np.size(x) for x in jax.tree.leaves(variables)) == flops.param_counts(cfg)["total"], family
    # T=6, W=3: rows see 1, 2, 3, 3, 3, 3 keys (mean 2.5) instead of 3.5
    assert flops.attended_keys(6, 3) == 2.5 and flops.attended_keys(6, 0) == 3.5 == flops.attended_keys(6, 9)
    mistral = dataclasses.replace(SMALL, family="mistral", sliding_window=3)
    assert flops.attention_flops_per_token(mistral, 6) == 12 * 2 * 4 * (2.5 + 2.5)
    gemma = dataclasses.replace(SMALL, family="gemma3", sliding_window=3, global_every=2)  # layer 1 global
    assert flops.attention_flops_per_token(gemma, 6) == 12 * 2 * 4 * (2.5 + 3.5)
    assert flops.attention_flops_per_token(SMALL, 6) == 672
