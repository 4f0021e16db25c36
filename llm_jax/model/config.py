"""The model's shape and numerics as a frozen, hashable record built from `config.model`."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from llm_jax.kernels.attention import IMPLEMENTATIONS, BlockSizes
from llm_jax.model import quant
from llm_jax.model.families import Family, get_family

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "dots_attention")
ROPE_SCALINGS = ("none", "linear", "llama3")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")  # the projections an adapter may sit on


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics; `family` (model/families/) says what the architecture changes in the trunk."""
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    attention_impl: str = "auto"
    attention_block_q: int = 0   # flash kernel tiles; 0: the kernel family's default (kernels/attention/blocks.py)
    attention_block_kv: int = 0
    init_std: float = 0.02
    lora_rank: int = 0             # LoRA adapters of this rank on `lora_targets`; 0: none (see model/lora.py)
    lora_alpha: float = 16.0       # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0      # dropout on the adapters' input, in training only
    lora_targets: str = "wq,wk,wv,wo"
    base_quant: str = "none"       # none | int8 | nf4: the projections stored quantized (see model/quant.py)
    quant_block: int = 64          # weights per absmax scale
    quant_double: bool = True      # the scales quantized again (int8, per quant_scale_block scales)
    quant_scale_block: int = 256
    prompt_tuning_tokens: int = 0  # trained embeddings before every sequence (prompt tuning); 0: none
    family: str = "llama"
    sliding_window: int = 0        # W > 0: local layers attend to the last W positions only; 0: no window
    global_every: int = 0          # with a window: every global_every-th layer is global (Gemma 3); 0: all local
    rope_local_theta: float = 0.0  # RoPE base of the local layers, unscaled; 0: the global layers' RoPE
    rope_scaling: str = "none"     # RoPE frequency scaling of the global layers: none | linear | llama3
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0    # llama3 scaling: wavelengths above original/low are divided by factor,
    rope_high_freq_factor: float = 4.0   # those below original/high kept, the ones between interpolated
    rope_original_max_len: int = 8192
    query_scale_dim: float = 0.0   # attention scores are q·k / √query_scale_dim; 0: head_dim
    max_seq_len: int = 0           # the context the checkpoint was made for (HF max_position_embeddings); 0: unknown

    @classmethod
    def from_config(cls, model_config) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in model_config.items() if k in fields}
        if not values.get("head_dim"):
            values["head_dim"] = model_config.d_model // model_config.n_heads
        result = cls(**values)
        result.validate()
        return result

    def validate(self) -> None:
        def fail(message):
            raise ValueError(f"model config: {message}")
        for name in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab_size"):
            if getattr(self, name) < 1:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            fail(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            fail(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            fail(f"remat={self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention_impl not in IMPLEMENTATIONS:
            fail(f"attention_impl={self.attention_impl!r} is not one of {IMPLEMENTATIONS}")
        for name in ("attention_block_q", "attention_block_kv"):
            value = getattr(self, name)
            if value and (value < 8 or value & (value - 1)):
                fail(f"{name}={value} must be 0 (the kernel default) or a power of two ≥ 8")
        if self.lora_rank < 0:
            fail(f"lora_rank must be >= 0 (0: no LoRA), got {self.lora_rank}")
        if not self.lora_alpha > 0:
            fail(f"lora_alpha must be positive, got {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            fail(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        targets = [t.strip() for t in self.lora_targets.split(",")]
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if unknown or len(set(targets)) != len(targets):
            fail(f"lora_targets={self.lora_targets!r} must be a comma-separated subset (no repeats) of "
                 f"{','.join(LORA_TARGETS)}" + (f"; unknown: {unknown}" if unknown else ""))
        try:
            quant.check(self)
        except ValueError as e:
            fail(str(e))
        if self.prompt_tuning_tokens < 0:
            fail(f"prompt_tuning_tokens must be >= 0 (0: none), got {self.prompt_tuning_tokens}")
        try:
            get_family(self.family)
        except ValueError as e:
            fail(str(e))
        if self.sliding_window < 0:
            fail(f"sliding_window must be >= 0 (0: none), got {self.sliding_window}")
        if self.global_every < 0 or (self.global_every and not self.sliding_window):
            fail(f"global_every={self.global_every} needs a sliding_window > 0 and must be >= 0")
        if self.rope_scaling not in ROPE_SCALINGS:
            fail(f"rope_scaling={self.rope_scaling!r} is not one of {ROPE_SCALINGS}")
        if self.rope_scaling != "none" and not self.rope_scaling_factor > 0:
            fail(f"rope_scaling_factor must be positive, got {self.rope_scaling_factor}")
        if self.query_scale_dim < 0:
            fail(f"query_scale_dim must be >= 0 (0: head_dim), got {self.query_scale_dim}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                fail(f"{name}={getattr(self, name)!r} is not a dtype")

    @property
    def family_spec(self) -> Family:
        return get_family(self.family)

    def layer_is_local(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window (False for every layer without one)."""
        if not self.sliding_window:
            return False
        return not (self.global_every and (layer + 1) % self.global_every == 0)

    @property
    def mixed_layers(self) -> bool:
        """Local and global layers alternate: a layer's window and RoPE are chosen per layer (Gemma 3)."""
        kinds = {self.layer_is_local(i) for i in range(self.n_layers)}
        return len(kinds) == 2

    @property
    def attention_blocks(self):
        """Flash-kernel tile sizes, or None for the kernel family's defaults."""
        if not (self.attention_block_q or self.attention_block_kv):
            return None
        q, kv = self.attention_block_q or self.attention_block_kv, self.attention_block_kv or self.attention_block_q
        return BlockSizes(q=q, kv=kv, q_bwd=q, kv_bwd=kv)

    @property
    def lora_target_names(self) -> tuple[str, ...]:
        """The projections that carry an adapter; empty without LoRA."""
        return tuple(t.strip() for t in self.lora_targets.split(",")) if self.lora_rank else ()

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weights_dtype(self):
        return jnp.dtype(self.param_dtype)
