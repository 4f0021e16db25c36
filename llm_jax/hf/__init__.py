"""Hugging Face checkpoints in and out: `llm-jax import-hf` and `llm-jax export-hf`.

    weights.py      our param paths ↔ HF tensor names, with the reshapes between layouts (one table for every family)
    safetensors_io.py  reading a (sharded) safetensors checkpoint tensor by tensor, and writing one
    import_hf.py    config.json → config.model, tensors streamed onto the mesh, an ordinary run directory out
    export_hf.py    any run (LoRA merged) → config.json, safetensors, tokenizer files, generation_config.json
"""
