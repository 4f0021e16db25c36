"""resolve_spec: `default_task` alone or as entries of a comma list, every other spec untouched."""
import json

from llm_jax.data import default_task, records
from llm_jax.data.post_training import resolve_spec


def test_default_task_alone_is_the_task_file():
    paths = default_task.write_default_task()
    assert resolve_spec("default_task", "preferences", "train") == paths["preferences_train"]
    assert resolve_spec("default_task", "prompts", "eval") == paths["prompts_eval"]


def test_specs_without_the_task_come_back_as_given():
    for spec in ("pairs.jsonl", "a.jsonl, b.jsonl", "data/*.jsonl", "default_task.jsonl,x", "default"):
        assert resolve_spec(spec, "preferences", "train") == spec


def test_each_task_entry_of_a_comma_list_is_resolved_in_place(tmp_path):
    task = default_task.write_default_task()["preferences_train"]
    mine = tmp_path / "pairs.jsonl"
    mine.write_text(json.dumps({"prompt": "copy, zuma bru", "chosen": "zuma bru", "rejected": "bru"}) + "\n")
    assert resolve_spec(f"default_task,{mine}", "preferences", "train") == f"{task},{mine}"
    assert resolve_spec(f"{mine}, default_task", "preferences", "train") == f"{mine},{task}"

    examples = list(records.iter_ranked_examples(resolve_spec(f"default_task,{mine}", "preferences", "train")))
    assert len(examples) == default_task.DEFAULT_SIZES["preferences_train"] + 1
    examples[-1] = examples[-1].preference_examples()[0]
    assert examples[-1].chosen == "zuma bru" and examples[-1].where.startswith(str(mine))
