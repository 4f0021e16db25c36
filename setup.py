"""llm_jax: train a GPT-style assistant end to end in JAX."""
from setuptools import find_packages, setup

setup(
    name="llm_jax",
    version="0.1.0",
    description="Pretraining, post-training (SFT, reward, PPO, DPO) and scaling laws in one JAX codebase.",
    packages=find_packages(include=["llm_jax", "llm_jax.*"]),
    # the training text of the language identifier, read at run time
    package_data={"llm_jax.data.prepare": ["langid_text.txt"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "sentencepiece>=0.2",
        "ml-collections>=1.0",
        "tensorboard>=2.18",
        "numpy",
        "pyarrow",
        "tqdm",
        "zstandard",   # .zst inputs of llm-jax prepare
        # Hugging Face formats, read and written with their own libraries (import-hf, export-hf, chat templates)
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "jinja2>=3.1",
        # quantized frozen bases (model.base_quant: int8, nf4): the code book and blockwise numerics
        "qwix>=0.1.8",
    ],
    extras_require={
        # scaling-fit's PNGs (llm_jax/scaling/plots.py imports it only when drawing; --no-plots needs none)
        "plots": ["matplotlib"],
        # ruff and import-linter: the lint and import-cycle checks of .ci/run (ruff.toml, .importlinter)
        "dev": ["pytest", "pytest-xdist", "nbclient", "nbformat", "ipykernel", "matplotlib", "ruff>=0.16",
                "import-linter>=2.16"],
        # live parity against transformers (tests/hf/make_fixtures.py, tests/hf/test_live_transformers.py): torch
        # from the package registry is the CUDA build (several GB), so CI compares with the committed references
        "parity": ["torch", "transformers>=5"],
        # lm-evaluation-harness for `llm-jax eval --lm-eval-tasks` (llm_jax/eval/harness.py); no torch needed
        "eval": ["lm-eval>=0.4.13"],
        "gpu": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
    },
    entry_points={"console_scripts": ["llm-jax=llm_jax.cli:main"]},
)
