"""The local data of the llm_jax_* test tasks, read from the jsonl files beside this one (so the task YAMLs work
from any directory and offline): lm-eval calls these through the YAMLs' `custom_dataset: !function`."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _split(name: str):
    import datasets
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice(**kwargs):
    return _split("multiple_choice.jsonl")


def documents(**kwargs):
    return _split("documents.jsonl")


def questions(**kwargs):
    return _split("questions.jsonl")
