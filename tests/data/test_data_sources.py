"""Reading documents: formats, ordering, and errors that name the file and line (the bad files of
tests/data/conftest.py, through the reader and through `llm-jax train`)."""
import gzip
import json
import pickle
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_jax.cli import main
from llm_jax.config_lib import load
from llm_jax.data import sources
from llm_jax.data.sources import DataError, iter_documents, resolve_files


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_text_parquet_and_gzip(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two", "id": 3}])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "three"}) + "\n\n")
    (tmp_path / "c.txt").write_text("four\n\nstill four\fsix")
    with gzip.open(tmp_path / "e.txt.gz", "wt") as f:
        f.write("zipped text\n")
    pq.write_table(pa.table({"body": ["seven", "eight"]}), tmp_path / "d.parquet", row_group_size=1)
    assert list(iter_documents(str(tmp_path / "*.jsonl*"))) == ["one", "two", "three"]
    assert list(iter_documents(str(tmp_path / "c.txt"))) == ["four\n\nstill four", "six"]
    assert list(iter_documents(str(tmp_path / "e.txt.gz"))) == ["zipped text"]
    assert list(iter_documents(str(tmp_path / "d.parquet"), text_key="body")) == ["seven", "eight"]
    spec = f"{tmp_path / 'd.parquet'},{tmp_path / 'a.jsonl'}"
    assert resolve_files(spec) == [str(tmp_path / "d.parquet"), str(tmp_path / "a.jsonl")]


def test_explicit_format_overrides_extension(tmp_path):
    write_jsonl(tmp_path / "data.log", [{"text": "x"}])
    assert list(iter_documents(str(tmp_path / "data.log"), format="jsonl")) == ["x"]
    with pytest.raises(DataError, match="data.log.*format"):
        list(iter_documents(str(tmp_path / "data.log")))


def test_glob_is_sorted(tmp_path):
    for name in ("b", "a", "c"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": name}])
    assert list(iter_documents(str(tmp_path / "*.jsonl"))) == ["a", "b", "c"]


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "a" "b"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:3: invalid JSON \(Expecting"):
        list(iter_documents(str(path)))


@pytest.mark.parametrize("line, message", [
    ('{"content": "a"}', r"x\.jsonl:2: missing key 'text'"),
    ('{"text": 5}', r"x\.jsonl:2: 'text' is int, expected a string"),
    ('["text"]', r"x\.jsonl:2: expected a JSON object"),
])
def test_bad_records(tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        list(iter_documents(str(path)))


def test_missing_file_empty_glob_and_bad_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        list(iter_documents(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"glob '.*\*\.parquet' matches no files"):
        list(iter_documents(str(tmp_path / "*.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read as parquet"):
        list(iter_documents(str(tmp_path / "bad.parquet")))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="ints.parquet: column 'text' has type int64"):
        list(iter_documents(str(tmp_path / "ints.parquet")))
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="bad.jsonl.gz:1: cannot read"):
        list(iter_documents(str(tmp_path / "bad.jsonl.gz")))
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(DataError, match="x.parquet.gz: compressed parquet is not supported"):
        list(iter_documents(str(tmp_path / "x.parquet.gz")))
    with pytest.raises(DataError, match="ints.parquet: no column 'body'"):
        list(iter_documents(str(tmp_path / "ints.parquet"), text_key="body"))
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        list(iter_documents(str(tmp_path / "bad.parquet"), format="csv"))


def test_default_spec_renders_the_embedded_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_JAX_CACHE", str(tmp_path))
    monkeypatch.setattr(sources.default_corpus, "DEFAULT_N_DOCS", 20)
    docs = list(iter_documents("default", format="parquet", text_key="ignored"))
    assert docs == [t for t, _ in sources.default_corpus.generate_documents(20)]


def test_every_bad_file_is_one_data_error_naming_its_file_and_line(bad_file, tmp_path):
    path = bad_file.write(tmp_path)
    read = []
    with pytest.raises(DataError) as caught:
        for where, _ in sources.iter_file_documents(path):
            read.append(where)
    assert re.fullmatch(bad_file.pattern(path), str(caught.value)), str(caught.value)
    assert caught.value.where.startswith(path) and "\n" not in str(caught.value)
    # Decompression fails lazily, mid-stream: the documents before the break have been read.
    assert len(read) >= bad_file.docs_before
    with pytest.raises(DataError, match=bad_file.pattern(path)):   # the same through a spec
        list(iter_documents(path))


def test_on_error_takes_a_bad_record_and_reading_goes_on(bad_file, tmp_path):
    path = bad_file.write(tmp_path)
    skipped = []
    if bad_file.record:
        docs = list(sources.iter_file_documents(path, on_error=skipped.append))
        assert [where for where, _ in docs] == [f"{path}:1", f"{path}:2", f"{path}:4"]
        assert [e.where for e in skipped] == [f"{path}:3"]
    else:   # what cannot be read past is raised whatever on_error is
        with pytest.raises(DataError, match=re.escape(path)):
            list(sources.iter_file_documents(path, on_error=skipped.append))
        assert skipped == []


def test_a_data_error_keeps_its_place_across_processes():
    error = pickle.loads(pickle.dumps(DataError("invalid JSON", where="x.jsonl:3")))
    assert (error.where, error.reason, str(error)) == ("x.jsonl:3", "invalid JSON", "x.jsonl:3: invalid JSON")


def test_zstd_of_several_frames_and_crlf_text(tmp_path):
    import zstandard

    frames = [zstandard.ZstdCompressor().compress(json.dumps({"text": t}).encode() + b"\n") for t in "abc"]
    (tmp_path / "x.jsonl.zst").write_bytes(b"".join(frames))
    assert list(iter_documents(str(tmp_path / "x.jsonl.zst"))) == ["a", "b", "c"]
    (tmp_path / "x.txt").write_bytes(b"one\r\ntwo\r\n\fthree\rfour")
    assert list(sources.iter_file_documents(str(tmp_path / "x.txt"))) == [
        (f"{tmp_path / 'x.txt'}: doc 1", "one\ntwo"), (f"{tmp_path / 'x.txt'}: doc 2", "three\nfour")]


def _train_config(path: str, tokenizer: str, overrides: list[str]) -> list[str]:
    return overrides + [f"data.train={path}", f"tokenizer.path={tokenizer}"]


def test_train_stops_at_a_bad_file_with_its_name(bad_file, tmp_path, small_tokenizer, small_overrides):
    from llm_jax.training import run

    path = bad_file.write(tmp_path)
    with pytest.raises(DataError) as caught:
        run(load("configs/pretrain.py:tiny", _train_config(path, small_tokenizer, small_overrides)),
            str(tmp_path / "run"))
    assert re.fullmatch(bad_file.pattern(path), str(caught.value)), str(caught.value)


def test_train_command_exits_1_with_one_line_naming_the_bad_file(bad_file, tmp_path, small_tokenizer,
                                                                  small_overrides, capsys):
    """Needs `llm-jax train` to turn a DataError into one line and exit 1 (cli.py main)."""
    path = bad_file.write(tmp_path)
    code = main(["train", "--config", "configs/pretrain.py:tiny", "--workdir", str(tmp_path / "run")]
                + [f"--config.{o}" for o in _train_config(path, small_tokenizer, small_overrides)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1
    assert re.fullmatch("llm-jax train: " + bad_file.pattern(path), err.strip()), err
