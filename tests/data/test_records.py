"""Chat records: the three formats from jsonl, jsonl.gz and parquet, and errors naming file:line (or row) and key."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_jax.data.records import (Message, iter_preference_examples, iter_prompt_examples, iter_records,
                                  iter_sft_examples)
from llm_jax.data.sources import DataError


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_records_carry_where_in_every_format(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"x": 1}])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write('\n{"x": 2}\n')
    pq.write_table(pa.table({"x": [3, None]}), tmp_path / "c.parquet")
    assert list(iter_records(str(tmp_path / "*"))) == [
        (f"{tmp_path}/a.jsonl:1", {"x": 1}), (f"{tmp_path}/b.jsonl.gz:2", {"x": 2}),
        (f"{tmp_path}/c.parquet: row 1", {"x": 3}), (f"{tmp_path}/c.parquet: row 2", {"x": None})]
    (tmp_path / "d.txt").write_text("a document")
    with pytest.raises(DataError, match="d.txt: a text file holds documents, not records"):
        list(iter_records(str(tmp_path / "d.txt")))


def test_sft_both_forms(tmp_path):
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
             {"role": "assistant", "content": ""}]
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "2+2?", "response": "4", "id": 7},
        {"prompt": "Hi", "response": "Hello.", "system": "Be brief."},
        {"messages": turns}])
    examples = list(iter_sft_examples(path))
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert examples[0].messages == (Message("user", "2+2?"), Message("assistant", "4"))
    assert examples[1].messages == tuple(Message(**m) for m in turns[:3])
    assert examples[2].messages == tuple(Message(**m) for m in turns)


def test_parquet_messages_preferences_and_prompts(tmp_path):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    pq.write_table(pa.table({"messages": [turns]}), tmp_path / "sft.parquet")
    assert next(iter_sft_examples(str(tmp_path / "sft.parquet"))).messages == tuple(Message(**m) for m in turns)

    pq.write_table(pa.table({"prompt": ["Q1", "Q2"], "chosen": ["good", "yes"], "rejected": ["bad", "no"]}),
                   tmp_path / "pref.parquet")
    pairs = list(iter_preference_examples(str(tmp_path / "pref.parquet")))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ((Message("user", "Q1"),), "good", "bad"), ((Message("user", "Q2"),), "yes", "no")]
    assert pairs[1].where == f"{tmp_path}/pref.parquet: row 2"

    path = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Add 2 and 3.", "task_id": "add-17", "answer": 5},
        {"prompt": turns + [{"role": "user", "content": "More?"}]}])
    prompts = list(iter_prompt_examples(path))
    assert prompts[0].prompt == (Message("user", "Add 2 and 3."),)
    assert prompts[0].metadata == {"task_id": "add-17", "answer": 5}
    assert prompts[1].prompt[-1] == Message("user", "More?") and prompts[1].metadata == {}


USER, ASSISTANT = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q" "response": "a"}', r"x\.jsonl:2: invalid JSON"),
    ('{"prompt": "q"}', r"x\.jsonl:2: missing key 'response'"),
    ('{"response": "a"}', r"x\.jsonl:2: missing key 'messages' \(or 'prompt' and 'response'\)"),
    ('{"prompt": "q", "response": 3}', r"x\.jsonl:2: 'response' is int, expected a string"),
    ('{"prompt": null, "response": "a"}', r"x\.jsonl:2: 'prompt' is null, expected a string or a list"),
    ('{"prompt": "q", "response": "a", "system": 1}', r"x\.jsonl:2: 'system' is int"),
    ('{"prompt": "<|end|> q", "response": "a"}', r"x\.jsonl:2: 'prompt' contains the reserved chat symbol '<\|end\|>'"),
    ('{"messages": "q"}', r"x\.jsonl:2: 'messages' is str, expected a list of messages"),
    ('{"messages": []}', r"x\.jsonl:2: 'messages' is an empty list"),
    (json.dumps({"messages": [USER, {"role": "bot", "content": "a"}]}),
     r"x\.jsonl:2: messages\[1\]\.role is 'bot', expected one of \('system', 'user', 'assistant'\)"),
    (json.dumps({"messages": [USER, {"role": "assistant"}]}), r"x\.jsonl:2: messages\[1\] is missing key 'content'"),
    (json.dumps({"messages": [USER, {"role": "assistant", "content": ["a"]}]}),
     r"x\.jsonl:2: messages\[1\]\.content is list, expected a string"),
    (json.dumps({"messages": [USER, "a"]}), r"x\.jsonl:2: messages\[1\] is str, expected an object"),
    (json.dumps({"messages": [USER]}), r"x\.jsonl:2: 'messages' has no assistant turn"),
    (json.dumps({"messages": [USER, ASSISTANT, USER]}),
     r"x\.jsonl:2: 'messages' ends with role 'user', expected 'assistant'"),
    (json.dumps({"messages": [ASSISTANT, USER, ASSISTANT]}),
     r"x\.jsonl:2: messages\[0\]\.role is 'assistant', expected 'user'"),
    (json.dumps({"messages": [USER, {"role": "system", "content": "s"}, ASSISTANT]}),
     r"x\.jsonl:2: messages\[1\]\.role is 'system', expected 'assistant'"),
    (json.dumps({"messages": [USER, ASSISTANT], "prompt": "q"}), r"x\.jsonl:2: both 'messages' and 'prompt' given"),
])
def test_bad_sft_records(tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text('{"prompt": "ok", "response": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        list(iter_sft_examples(str(path)))


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"x\.jsonl:1: 'chosen' and 'rejected' are the same text"),
    ({"prompt": "q", "chosen": "a"}, r"x\.jsonl:1: missing key 'rejected'"),
    ({"prompt": [USER, ASSISTANT], "chosen": "a", "rejected": "b"},
     r"x\.jsonl:1: 'prompt' ends with role 'assistant', expected 'user'"),
    ({"prompt": [USER], "system": "s", "chosen": "a", "rejected": "b"}, r"x\.jsonl:1: 'system' goes with a prompt"),
])
def test_bad_preference_records(tmp_path, record, message):
    path = write_jsonl(tmp_path / "x.jsonl", [record])
    with pytest.raises(DataError, match=message):
        list(iter_preference_examples(path))


def test_bad_parquet_rows_name_the_row(tmp_path):
    pq.write_table(pa.table({"prompt": ["q", None], "chosen": ["a", "b"], "rejected": ["b", "c"]}),
                   tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: row 2: 'prompt' is null"):
        list(iter_preference_examples(str(tmp_path / "p.parquet")))
    turns = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]]
    pq.write_table(pa.table({"messages": turns}), tmp_path / "m.parquet")
    with pytest.raises(DataError, match=r"m\.parquet: row 1: messages\[1\]\.content is null"):
        list(iter_sft_examples(str(tmp_path / "m.parquet")))
    with pytest.raises(DataError, match=r"m\.parquet: row 1: missing key 'prompt'"):
        list(iter_prompt_examples(str(tmp_path / "m.parquet")))
