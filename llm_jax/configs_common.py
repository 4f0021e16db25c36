"""The fields every training config shares, with their defaults; config files override what they need.

Every field is listed once, so `--config.x.y=...` overrides are typed and a typo is an error: here, or, for an
objective's own section (`reward`, `dpo`, `rl`), in its module's `CONFIG_DEFAULTS` (llm_jax/objectives/), which
`base_config` gathers without importing the objective (so loading a config does not import JAX).
"""
import ml_collections

from llm_jax.objectives import config_sections

# Logical axis -> mesh axes. Model code names logical axes only; this table is the only mapping.
# Activations: batch over (data, fsdp), sequence over `sequence`. Weights: the embed dimension over fsdp
# (ZeRO-3 style), heads / mlp / vocab over tensor (Megatron style).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),  # LoRA's rank axis: tiny, replicated; A and B shard like their base weight otherwise
)


def model_from_depth(depth: int, aspect: int = 64, head_dim: int = 64) -> dict:
    """The one-dial model family: `depth` layers of width aspect·depth in heads of `head_dim`, SwiGLU hidden
    8/3·width (rounded to a multiple of 32). Non-embedding parameters grow as 12·aspect²·depth³."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    d_model = aspect * depth
    if aspect < 1 or head_dim < 1 or d_model % head_dim:
        raise ValueError(f"width {d_model} (aspect {aspect} × depth {depth}) must be a positive multiple of "
                         f"head_dim {head_dim}")
    heads = d_model // head_dim
    return dict(n_layers=depth, d_model=d_model, n_heads=heads, n_kv_heads=heads, head_dim=head_dim,
                d_ff=32 * round(8 * d_model / 3 / 32))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.objective = "lm"
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        n_layers=4, d_model=128, n_heads=4, n_kv_heads=4,
        head_dim=0,            # 0: d_model // n_heads
        d_ff=512, vocab_size=2048,
        rope_theta=10_000.0, norm_eps=1e-6, tie_embeddings=True,
        dtype="float32",       # compute dtype; bfloat16 on accelerators
        param_dtype="float32",
        scan_layers=True,      # one compiled layer applied n_layers times
        remat="none",          # none | full | dots | dots_no_batch | dots_attention (dots + flash residuals)
        attention_impl="auto",  # auto | reference | xla | pallas | cudnn (auto: pallas on TPU, cudnn on
                                # NVIDIA in bf16, xla elsewhere); see llm_jax/kernels/attention/__init__.py
        attention_block_q=0,   # flash kernel tiles (powers of two); 0: the kernel family's default
        attention_block_kv=0,
        init_std=0.02,
        # LoRA (Hu et al. 2021; llm_jax/model/lora.py): with lora_rank > 0 each target projection W gains
        # x·W + (lora_alpha / lora_rank)·dropout(x)·A·B, and only A, B (and task heads) train.
        lora_rank=0,           # 0: no adapters, every param trains
        lora_alpha=16.0,
        lora_dropout=0.0,      # on the adapters' input, training steps only
        lora_targets="wq,wk,wv,wo",  # comma-separated subset of wq,wk,wv,wo,w_gate,w_up,w_down
        # A quantized frozen base (QLoRA; llm_jax/model/quant.py): the seven projections stored as codes and
        # dequantized inside each matmul. Needs adapters (lora_rank > 0), a soft prompt or optim.freeze over them.
        base_quant="none",     # none | int8 | nf4
        quant_block=64,        # weights per absmax scale, along the projection's input
        quant_double=True,     # double quantization: the scales stored as int8 too
        quant_scale_block=256,  # scales per second-level scale
        # Prompt tuning (Lester et al. 2021): this many trained embeddings before every sequence; 0: none.
        prompt_tuning_tokens=0,
        # The architecture (llm_jax/model/families/): today's model is "llama"; an imported checkpoint sets these.
        family="llama",        # llama | mistral | qwen2 | qwen3 | gemma3
        sliding_window=0,      # local layers attend to the last W positions; 0: no window
        global_every=0,        # with a window, every global_every-th layer is global (Gemma 3); 0: all local
        rope_local_theta=0.0,  # RoPE base of the local layers; 0: the global one
        rope_scaling="none",   # none | linear | llama3 (Llama 3.1's), on the global layers
        rope_scaling_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
        query_scale_dim=0.0,   # scores are q·k/√query_scale_dim; 0: head_dim
        max_seq_len=0,         # the checkpoint's context (HF max_position_embeddings); 0: unknown
        from_init=False,       # take every architecture field from train.init_from's run (train/run_record.inherit_model)
    ))

    c.tokenizer = ml_collections.ConfigDict(dict(
        path="",               # a trained sentencepiece .model; empty: train one into <workdir>/tokenizer.model
        vocab_size=2048, model_type="unigram", character_coverage=1.0, max_sentence_chars=20_000,
    ))

    c.data = ml_collections.ConfigDict(dict(
        train="default",       # "default" / "default:domain" (embedded corpora), a file / glob, a `llm-jax prepare`
                               # workdir (its token shards when the tokenizer matches), or a comma list; "" with mixture
        eval="",               # empty: hold out eval_fraction of the training documents
        # Named components, each dict(train=<spec>, weight=<float>[, eval=<spec>, eval_fraction=<float>]), mixed row
        # by row in proportion to their weights (weight 0: evaluated only); see llm_jax/data/mixture.py.
        mixture=ml_collections.ConfigDict(),
        format="auto",         # auto | text | jsonl | parquet
        text_key="text",
        eval_fraction=0.02,
        seq_len=128, batch_size=16,  # global batch, in sequences
        cache_dir="",          # tokenized-corpus cache; empty: <workdir>/data
        chat_template="chatml_min",  # how sft/reward/dpo records become tokens (llm_jax/data/chat.py)
        use_edited=True,       # preference records: an `edited` answer ranks above chosen (data/records.py)
    ))

    for section, defaults in config_sections():  # each objective's own section: objectives/<name>.py
        c[section] = ml_collections.ConfigDict(defaults)

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, schedule="cosine",  # cosine | wsd | constant
        warmup_steps=100, min_lr_ratio=0.1, decay_fraction=0.2,  # decay_fraction: the wsd cool-down share
        b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, grad_accum=1,
        freeze="",             # comma-separated regexes; params whose path ("params/blocks/attn/wq",
                               # "params/embedding") one of them matches do not train, e.g. "embedding"
        also_train="",         # with adapters or a soft prompt, comma-separated regexes of params that train
                               # beside them (PEFT's modules_to_save), e.g. "embedding" for new chat tokens
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000, log_every=10, eval_every=200,
        eval_batches=-1,       # held-out batches per eval; -1: every held-out row
        checkpoint_every=200, keep_checkpoints=3,
        init_from="",          # a run directory whose latest params start this run (continued pretraining,
                               # SFT from pretraining, reward and DPO from SFT)
        progress_bar=True,
        resume_overrides="",   # fields a resume may change on purpose, e.g. "optim.lr" (train/run_record.py)
        # Named generative evaluations run at every eval, logged as eval_<name>_score (eval/during_training.py):
        # e.g. c.train.generative_evals.gold = dict(prompts="default_task", judge="gold", n_prompts=64)
        generative_evals=ml_collections.ConfigDict(),
        # The divergence guard (train/guard.py): a spike is loss > factor × its recent median (and > median +
        # margin nats) or grad_norm > grad factor × its median; `patience` spiking steps in a row stop the run.
        spike_loss_factor=3.0, spike_loss_margin=1.0, spike_grad_factor=100.0, spike_patience=3,
        spike_window=100, spike_min_history=3,   # spike_loss_factor=0: off
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, sequence=1))
    c.mesh_rules = DEFAULT_RULES
    return c


HF_SIZE = "hf"  # a stage's preset for a model imported with `llm-jax import-hf` (or any run: its model is inherited)


def hf_stage_base(seed: int, init_from: str) -> ml_collections.ConfigDict:
    """The base of every stage's `hf` preset: the model taken whole from `train.init_from` (model.from_init, so
    any imported family), f32 master weights whatever dtype the checkpoint had, and the checkpoint's own chat
    template and tokenizer."""
    config = base_config()
    config.seed = seed
    config.model.update(from_init=True, param_dtype="float32", dtype="float32")
    config.train.init_from = init_from
    config.data.chat_template = "hf"
    return config


def stage_config(arg, *, objective: str, init_from: str, stage_sizes: dict) -> ml_collections.ConfigDict:
    """A post-training stage's config: the pretraining config of the same size (so the params fit the run it
    starts from: one config lineage), the objective, `train.init_from`, and the stage's own settings per size.

    `arg` is the config file's argument: `size`, `steps`, `seed`, `init_from`.
    """
    import os

    from llm_jax.config_lib import load_config, parse_arg
    arg = parse_arg(arg, size="tiny", steps=-1, seed=0, init_from=init_from)
    if arg.size == HF_SIZE:
        config = hf_stage_base(arg.seed, init_from if arg.init_from == init_from else arg.init_from)
    else:
        pretrain = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "pretrain.py")
        config = load_config(f"{pretrain}:size={arg.size},seed={arg.seed}")
        config.train.init_from = arg.init_from
    config.objective = objective
    config.data.update(train="default_task", eval="")
    for section, fields in stage_sizes.get(arg.size, {}).items():
        config[section].update(fields)
    if arg.steps > 0:
        config.train.steps = arg.steps
    return config


# `rl_stage_config`'s tasks: what an RL preset trains on, over its size's settings.
RL_TASKS = {
    "default": {},  # the embedded task (data/default_task.py), paid by the reward model; policy runs/sft
    # Verifiable rewards: the embedded arithmetic task (data/arithmetic_task.py), graded by numeric_match, no
    # reward model; the policy is configs/sft_arithmetic.py's run.
    "arithmetic": dict(rl=dict(prompts="arithmetic_task", eval_prompts="arithmetic_task", reward="numeric_match",
                               reward_run="", value_from="policy", max_new_tokens=48, n_eval_prompts=256),
                       data=dict(seq_len=128)),
}
RL_INIT_FROM = {"default": "runs/sft", "arithmetic": "runs/sft_arithmetic"}


def rl_stage_config(arg, *, stage_sizes: dict, variants: dict | None = None) -> ml_collections.ConfigDict:
    """An RL preset's config (objective "rl"; configs/ppo.py, grpo.py, rloo.py, reinforce_pp.py): `stage_config`
    of its size, then the task's fields (RL_TASKS), then the variant's (an algorithm's options, e.g. grpo's
    dr_grpo). `arg`: `size`, `task`, `variant`, `steps`, `seed`, `init_from`."""
    from llm_jax.config_lib import ConfigError, parse_arg
    variants = variants or {"": {}}
    parsed = parse_arg(arg, size="tiny", task="default", variant=next(iter(variants)), steps=-1, seed=0,
                       init_from="")
    if parsed.task not in RL_TASKS:
        raise ConfigError(f"unknown RL task {parsed.task!r}; known: {sorted(RL_TASKS)}")
    if parsed.variant not in variants:
        raise ConfigError(f"unknown variant {parsed.variant!r}; known: {sorted(variants)}")
    default_init = RL_INIT_FROM[parsed.task]
    config = stage_config(f"size={parsed.size},steps={parsed.steps},seed={parsed.seed},"
                          f"init_from={parsed.init_from or default_init}", objective="rl", init_from=default_init,
                          stage_sizes=stage_sizes)
    for fields in (RL_TASKS[parsed.task], variants[parsed.variant]):
        for section, values in fields.items():
            config[section].update(values)
    return config
