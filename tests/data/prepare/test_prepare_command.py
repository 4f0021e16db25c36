"""`llm-jax prepare` on four small generated input files (one gzipped) with a planted document for every step: each
step drops its own, the output is the same with one or two processes and after an interrupted run, bad input is
reported with file and line, tokenized shards decode to the cleaned text, and the report's counts add up."""
import gzip
import json
import os
import re
import sys

import numpy as np
import pytest

from llm_jax.cli import main
from llm_jax.config_lib import load
from llm_jax.config_lib import ConfigError
from llm_jax.data import default_corpus
from llm_jax.data.prepare import inputs, prepare_stage, report, shards
from llm_jax.data.prepared import read_token_shard
from llm_jax.data.sources import DataError
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer

CONFIG = "configs/prepare.py:smoke"
GERMAN = ("Der Hund läuft jeden Morgen mit seinem Besitzer durch den Park, und danach trinken beide zusammen "
          "einen Kaffee in der kleinen Bäckerei an der Ecke. Die Kinder spielen auf der Wiese, während die Sonne "
          "langsam über den Bäumen aufgeht und die Vögel in den Zweigen singen. Am Nachmittag gehen wir oft in "
          "die Stadt, weil es dort viele Geschäfte gibt und man immer etwas Neues entdecken kann.")


def _clean_documents(n: int) -> list[str]:
    """n distinct documents of 150+ words that every filter keeps: default-corpus documents joined."""
    docs, current = [], []
    for text, _ in default_corpus.generate_documents(40 * n, seed=5):
        current.append(text)
        if sum(len(t.split()) for t in current) >= 150:
            docs.append("\n\n".join(current))
            current = []
        if len(docs) == n:
            return docs
    raise AssertionError(f"only {len(docs)} documents")


CLEAN = _clean_documents(22)
EMAIL = CLEAN[20] + "\n\nWrite to jane.doe@example.com for the details."
PLANTED = {  # step -> (file, text)
    "privacy": (0, CLEAN[21] + "\n\nCall 555-123-4567 after the meeting."),
    "langid": (2, GERMAN),
    "heuristics": (1, "Too short to keep."),
    "blocklist": (2, CLEAN[0] + "\n\nThe casino opens at nine."),
    "exact_dedup": (3, CLEAN[1].upper()),
    "minhash_dedup": (3, " ".join(CLEAN[7].split(" ")[:40] + ["zzyzx"] + CLEAN[7].split(" ")[41:])),
}
REPEATED = "\n".join(["The same line comes back again and again."] * 30)
FILES = ("part-0.jsonl", "part-1.jsonl", "part-2.jsonl.gz", "part-3.jsonl")


def _documents_of_files() -> list[list[str]]:
    files = [CLEAN[0:6] + [EMAIL], CLEAN[6:12] + [REPEATED], CLEAN[12:18], CLEAN[18:20]]
    for index, text in PLANTED.values():
        files[index].append(text)
    return files


def _write_inputs(directory, broken_line: int | None = None) -> str:
    """The four input files; with broken_line, that line of part-1.jsonl is not JSON. Returns the spec."""
    os.makedirs(directory, exist_ok=True)
    for name, docs in zip(FILES, _documents_of_files()):
        lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)]
        if broken_line and name == "part-1.jsonl":
            lines.insert(broken_line - 1, '{"text": "cut off in the mid')
        data = ("\n".join(lines) + "\n").encode()
        with (gzip.open if name.endswith(".gz") else open)(os.path.join(directory, name), "wb") as f:
            f.write(data)
    return os.path.join(str(directory), "part-*")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    train_tokenizer(CLEAN, path, vocab_size=400)
    return path


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return _write_inputs(tmp_path_factory.mktemp("raw"))


def _config(spec: str, tokenizer: str = "", *overrides: str):
    return load(CONFIG, [f"input.spec={spec}", f"output.tokenizer={tokenizer}", "output.parquet=true", *overrides])


def _files(workdir) -> dict:
    """Every file's bytes; an .npz by its arrays (a zip member records the time it was written)."""
    result = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            if name.endswith(".npz"):
                with np.load(path) as saved:
                    content = {k: (saved[k].dtype.str, saved[k].shape, saved[k].tobytes()) for k in saved.files}
            else:
                with open(path, "rb") as f:
                    content = f.read()
            result[os.path.relpath(path, workdir)] = content
    return result


@pytest.fixture(scope="module")
def prepared(spec, tokenizer_path, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("prepared"))
    summary = prepare_stage.run_prepare(_config(spec, tokenizer_path), workdir)
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    return workdir, summary, report


def _clean_output(workdir) -> list[dict]:
    records = []
    for name in sorted(os.listdir(os.path.join(workdir, "clean"))):
        if name.endswith(".jsonl"):
            with open(os.path.join(workdir, "clean", name)) as f:
                records += [json.loads(line) for line in f]
    return records


def test_each_step_drops_its_planted_documents(prepared, spec):
    workdir, summary, report = prepared
    steps = {s["step"]: s for s in report["steps"]}
    for step, (index, _) in PLANTED.items():
        wheres = [e["where"] for e in steps[step]["examples"]]
        assert wheres and all(FILES[index] in w for w in wheres), (step, wheres)
    assert steps["heuristics"]["dropped_by"] == {"words": 1, "dup_line_frac": 1}
    assert steps["privacy"]["dropped_by"] == {"phone": 1}
    assert steps["privacy"]["counts"]["email"] == 1 and "555-123" not in json.dumps(report)
    assert "exact duplicate of" in steps["exact_dedup"]["examples"][0]["reason"]
    assert "part-0.jsonl:2" in steps["exact_dedup"]["examples"][0]["reason"]   # CLEAN[1], the first copy
    assert "part-1.jsonl:2" in steps["minhash_dedup"]["examples"][0]["reason"]  # CLEAN[7]
    kept_of = {"exact_dedup": f"{FILES[0]}:2", "minhash_dedup": f"{FILES[1]}:2"}
    for step, kept in kept_of.items():
        clusters = steps[step]["clusters"]
        assert clusters["count"] == clusters["removed"] == 1 and clusters["sizes"] == {"2": 1}
        assert clusters["largest"][0]["kept"].endswith(kept) and FILES[3] in clusters["largest"][0]["removed"][0]
    with open(os.path.join(workdir, "clusters.jsonl")) as f:
        listed = [json.loads(line) for line in f]
    assert [(c["step"], c["kept"].endswith(kept_of[c["step"]])) for c in listed] == [(s, True) for s in kept_of]
    assert listed[1]["removed"][0]["similarity"] >= 0.8

    texts = [r["text"] for r in _clean_output(workdir)]
    assert len(texts) == summary["docs_out"] == len(CLEAN) - 1 == 21
    assert sorted(texts) == sorted(CLEAN[:20] + [EMAIL.replace("jane.doe@example.com", "<EMAIL>")])
    assert texts[:6] == CLEAN[:6]   # input order
    assert summary["docs_in"] == sum(len(d) for d in _documents_of_files())
    assert set(summary["phase_seconds"]) == {"plan", "filter", "wait", "dedup", "write", "report"}


def test_cluster_summary_counts_sizes_and_lists_the_largest_first():
    clusters = [dict(kept="a:1", removed=[dict(where="b:1")]),
                dict(kept="a:2", removed=[dict(where=f"c:{i}") for i in range(7)]),
                dict(kept="a:3", removed=[dict(where="d:1")])]
    summary = report.cluster_summary(clusters, max_listed=2)
    assert summary == dict(count=3, removed=9, sizes={"2": 2, "8": 1},
                           largest=[dict(kept="a:2", size=8, removed=[f"c:{i}" for i in range(5)]),
                                    dict(kept="a:1", size=2, removed=["b:1"])])
    markdown = report.to_markdown(dict(inputs=dict(files=1, docs=12, chars=0, errors=0, listed_errors=[]),
                                       output=dict(docs=3, chars=0), steps=[dict(
                                           step="exact_dedup", docs_in=12, docs_out=3, dropped=9, chars_in=0,
                                           chars_out=0, dropped_by={}, counts={}, histograms={}, examples=[],
                                           clusters=summary)]))
    assert "Clusters: 3 removed 9 documents; by size (kept one included): 2: 2, 8: 1" in markdown
    assert "- `a:2` kept, 7 removed: `c:0`, `c:1`, `c:2`, `c:3`, `c:4` and 2 more" in markdown


def test_report_counts_add_up(prepared, tokenizer_path):
    _, _, report = prepared
    steps = report["steps"]
    for unit in ("docs", "chars", "tokens"):
        assert steps[0][f"{unit}_in"] == report["inputs"][unit]
        for step, after in zip(steps, steps[1:]):
            assert after[f"{unit}_in"] == step[f"{unit}_out"]
        assert steps[-1][f"{unit}_out"] == report["output"][unit]
    tokenizer = Tokenizer.load(tokenizer_path)
    docs = [d for file in _documents_of_files() for d in file]
    kept = [d.replace("jane.doe@example.com", "<EMAIL>") for d in docs if d != PLANTED["privacy"][1]]
    privacy = steps[0]   # drops the phone number's document and changes the e-mail's: its tokens out are counted anew
    assert privacy["step"] == "privacy" and privacy["tokens_in"] == sum(len(tokenizer.encode(d)) + 2 for d in docs)
    assert privacy["tokens_out"] == sum(len(tokenizer.encode(d)) + 2 for d in kept)
    for s in steps:
        assert s["docs_in"] == s["docs_out"] + s["dropped"] == s["docs_out"] + sum(s["dropped_by"].values())
        assert s["histograms"] and all(h["n"] == s["docs_in"] == sum(h["counts"]) for h in s["histograms"].values())
    assert report["output"]["tokens"] == sum(s["tokens"] for s in report["output"]["shards"])
    with open(os.path.join(prepared[0], "report.md")) as f:
        markdown = f.read()
    assert "| minhash_dedup |" in markdown and "part-2.jsonl.gz" in markdown


def test_tokenized_shards_decode_to_the_cleaned_text(prepared, tokenizer_path):
    workdir, _, report = prepared
    tokenizer = Tokenizer.load(tokenizer_path)
    texts = [r["text"] for r in _clean_output(workdir)]
    decoded = []
    for shard in report["output"]["shards"]:
        tokens, offsets = read_token_shard(os.path.join(workdir, "tokens", shard["shard"]))
        assert tokens.dtype == np.uint16 and len(offsets) == shard["docs"] + 1
        for start, end in zip(offsets[:-1], offsets[1:]):
            doc = tokens[start:end]
            assert doc[0] == tokenizer.bos_id and doc[-1] == tokenizer.eos_id
            decoded.append(list(doc[1:-1]))
    assert decoded == [tokenizer.encode(t) for t in texts]
    assert tokenizer.decode(decoded[0]) == texts[0]


def test_two_processes_write_the_same_files(prepared, spec, tokenizer_path, tmp_path):
    prepare_stage.run_prepare(_config(spec, tokenizer_path, "processes=2"), str(tmp_path))
    assert _files(tmp_path) == _files(prepared[0])


def test_an_interrupted_run_resumes_to_the_same_files(prepared, spec, tokenizer_path, tmp_path, monkeypatch):
    read = inputs.iter_input_documents

    def fail_in_the_second_file(file, on_error, errors):
        for i, document in enumerate(read(file, on_error, errors)):
            if file.index == 1 and i == 3:
                raise RuntimeError("interrupted")
            yield document

    monkeypatch.setattr(inputs, "iter_input_documents", fail_in_the_second_file)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare_stage.run_prepare(_config(spec, tokenizer_path), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "work")) == ["shard-00000"]
    monkeypatch.undo()
    # What a killed worker leaves behind: the next run removes it.
    os.makedirs(tmp_path / "work" / "shard-00001.tmp.99999")
    (tmp_path / "work" / "shard-00001.tmp.99999" / "docs.jsonl").write_text('{"where": "x", "text": "half"}\n')

    written = shards.write_token_shard
    calls = []

    def fail_writing_the_third_shard(prefix, tokens, offsets):
        calls.append(prefix)
        if len(calls) == 3:
            raise RuntimeError("interrupted again")
        written(prefix, tokens, offsets)

    monkeypatch.setattr(shards, "write_token_shard", fail_writing_the_third_shard)
    with pytest.raises(RuntimeError, match="interrupted again"):
        prepare_stage.run_prepare(_config(spec, tokenizer_path), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "done")) == ["shard-00000.json", "shard-00001.json"]
    monkeypatch.undo()

    summary = prepare_stage.run_prepare(_config(spec, tokenizer_path), str(tmp_path))
    assert summary["filtered_now"] == 0
    assert _files(tmp_path) == _files(prepared[0])


def test_a_broken_line_stops_the_command_with_its_file_and_line(tmp_path, capsys):
    spec = _write_inputs(tmp_path / "raw", broken_line=3)
    workdir = str(tmp_path / "out")
    code = main(["prepare", "--config", CONFIG, "--workdir", workdir, f"--config.input.spec={spec}"])
    assert code == 1
    assert f"{tmp_path / 'raw' / 'part-1.jsonl'}:3: invalid JSON" in capsys.readouterr().err
    assert os.listdir(os.path.join(workdir, "work")) == ["shard-00000"]   # the complete shard stays


def test_a_broken_line_is_skipped_counted_and_listed(tmp_path, capsys):
    spec = _write_inputs(tmp_path / "raw", broken_line=3)
    workdir = str(tmp_path / "out")
    code = main(["prepare", "--config", CONFIG, "--workdir", workdir, f"--config.input.spec={spec}",
                 "--config.on_error=skip"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["docs_out"] == 21
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert report["inputs"]["errors"] == 1
    assert report["inputs"]["listed_errors"][0]["where"] == f"{tmp_path / 'raw' / 'part-1.jsonl'}:3"
    with open(os.path.join(workdir, "report.md")) as f:
        assert "part-1.jsonl:3`: invalid JSON" in f.read()


def test_zstd_input(tmp_path, monkeypatch):
    import zstandard

    path = tmp_path / "docs.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": t}) + "\n" for t in CLEAN[:3]).encode()))
    summary = prepare_stage.run_prepare(_config(str(path)), str(tmp_path / "out"))
    assert summary["docs_out"] == 3
    monkeypatch.setitem(sys.modules, "zstandard", None)   # an install without it: one clear error
    with pytest.raises(DataError, match=r"docs\.jsonl\.zst: .*pip install zstandard"):
        prepare_stage.run_prepare(_config(str(path)), str(tmp_path / "again"))


def test_each_host_takes_every_other_file(spec, tmp_path):
    prepare_stage.run_prepare(_config(spec, "", "host_index=1", "host_count=2", "dedup_scope=host"), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "done")) == ["shard-00001.json", "shard-00003.json"]
    with open(tmp_path / "report.host-1-of-2.json") as f:
        report = json.load(f)
    assert report["inputs"]["files"] == 2 and report["output"]["tokens"] is None
    # Alone, host 1 cannot see that part-3's upper-cased CLEAN[1] repeats part-0 (host 0's file).
    assert CLEAN[1].upper() in [r["text"] for r in _clean_output(tmp_path)]


def test_hosts_deduplicate_across_the_run(prepared, spec, tmp_path):
    """Host 0 stops waiting for host 1's shards (its own filtered shards stay), host 1 finds host 0's and finishes,
    host 0 resumes: together they write what one host writes, the cross-host duplicate dropped by host 1."""
    host = [_config(spec, "", f"host_index={i}", "host_count=2", "dedup_wait_seconds=0") for i in (0, 1)]
    with pytest.raises(DataError, match=r"waited 0 s for other hosts to filter 2 shards: shard-00001 \(.*part-1"
                                        r"\.jsonl, host 1\), shard-00003"):
        prepare_stage.run_prepare(host[0], str(tmp_path))
    assert sorted(os.listdir(tmp_path / "work")) == ["shard-00000", "shard-00002"]
    prepare_stage.run_prepare(host[1], str(tmp_path))
    prepare_stage.run_prepare(host[0], str(tmp_path))
    by_shard = {}
    for name in sorted(n for n in os.listdir(tmp_path / "clean") if n.endswith(".jsonl")):
        with open(tmp_path / "clean" / name) as f:
            by_shard[name] = f.read()
    with open(os.path.join(prepared[0], "clean", "shard-00003.jsonl")) as f:
        assert by_shard["shard-00003.jsonl"] == f.read()
    assert [json.loads(line)["text"] for shard in by_shard.values() for line in shard.splitlines()] == \
        [r["text"] for r in _clean_output(prepared[0])]
    with open(tmp_path / "report.host-1-of-2.json") as f:
        steps = {s["step"]: s for s in json.load(f)["steps"]}
    assert steps["exact_dedup"]["dropped"] == 1 and "part-0.jsonl:2" in steps["exact_dedup"]["examples"][0]["reason"]


@pytest.mark.parametrize("override, message", [
    ("steps=('privacy', 'spelling')", "unknown step 'spelling'"),
    ("steps=('exact_dedup', 'heuristics')", "'heuristics' comes after 'exact_dedup'"),
    ("langid.languages=('xx',)", "config.langid: .*covers only"),
    ("on_error=ignore", "on_error must be one of"),
    ("input.format=xml", "input.format must be one of"),
    ("dedup_scope=world", "dedup_scope must be one of"),
    ("dedup_wait_seconds=-1.0", "dedup_wait_seconds must be a number >= 0"),
])
def test_config_errors_exit_2(override, message, tmp_path, capsys):
    code = main(["prepare", "--config", CONFIG, "--workdir", str(tmp_path), f"--config.{override}"])
    assert code == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_workdir_keeps_its_own_settings(spec, tmp_path):
    prepare_stage.run_prepare(_config(spec), str(tmp_path))
    with pytest.raises(ConfigError, match=r"prepared with other config \(blocklist\.max_hits: 0 then, 3 now\)"):
        prepare_stage.run_prepare(_config(spec, "", "blocklist.max_hits=3"), str(tmp_path))


def test_the_default_preset_plans_every_step():
    plan = prepare_stage.make_plan(load("configs/prepare.py:default", ["host_count=1"]), "unused")
    assert plan.steps.steps == ("privacy", "langid", "heuristics", "blocklist", "exact_dedup", "minhash_dedup")
    assert [f.format for f in plan.files] == ["jsonl"]


def test_text_parquet_and_unreadable_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text(f"{CLEAN[0]}\f{CLEAN[1]}\f\n")
    pq.write_table(pa.table({"text": [CLEAN[2], None, CLEAN[3]]}), raw / "b.parquet")
    (raw / "c.jsonl.gz").write_bytes(b"not gzip at all")
    config = _config(f"{raw}/a.txt,{raw}/b.parquet,{raw}/c.jsonl.gz", "", "on_error=skip")
    summary = prepare_stage.run_prepare(config, str(tmp_path / "out"))
    assert summary["docs_out"] == 4 and summary["input_errors"] == 2
    texts = [r["text"] for r in _clean_output(tmp_path / "out")]
    assert texts == CLEAN[:4]
    with open(tmp_path / "out" / "report.json") as f:
        errors = json.load(f)["inputs"]["listed_errors"]
    assert [e["where"] for e in errors] == [f"{raw}/b.parquet: row 2", f"{raw}/c.jsonl.gz:1"]
    assert "'text' is null" in errors[0]["message"] and "cannot read" in errors[1]["message"]


def test_exact_jaccard_confirms_the_same_near_duplicates(prepared, spec, tmp_path):
    prepare_stage.run_prepare(_config(spec, "", "minhash_dedup.exact_jaccard=true"), str(tmp_path))
    assert _clean_output(tmp_path) == _clean_output(prepared[0])


def test_an_unknown_extension_asks_for_the_format(tmp_path, capsys):
    (tmp_path / "docs.data.gz").write_bytes(gzip.compress(CLEAN[0].encode()))
    code = main(["prepare", "--config", CONFIG, "--workdir", str(tmp_path / "out"),
                 f"--config.input.spec={tmp_path / 'docs.data.gz'}"])
    assert code == 1
    assert f"{tmp_path / 'docs.data.gz'}: cannot tell the format" in capsys.readouterr().err
    summary = prepare_stage.run_prepare(_config(str(tmp_path / "docs.data.gz"), "", "input.format=text"),
                                        str(tmp_path / "out"))
    assert summary["docs_out"] == 1


def _error_lines(err: str) -> list[str]:
    """stderr without prepare's progress lines."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("prepare: ")]


def _good_and_bad_files(tmp_path, bad_file) -> tuple[str, str]:
    """A good file (shard 0) and then the bad one (shard 1); returns (the spec, the bad file's path)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    good = raw / "a-good.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in CLEAN[:2]))
    bad = bad_file.write(raw)
    return f"{good},{bad}", bad


def _prepare_command(spec: str, workdir: str, *overrides: str) -> int:
    return main(["prepare", "--config", CONFIG, "--workdir", workdir, f"--config.input.spec={spec}", *overrides])


def _stat_files(directory) -> dict:
    """name -> (modification time, bytes) of every file in a directory."""
    result = {}
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            result[name] = (os.stat(f.fileno()).st_mtime_ns, f.read())
    return result


def test_a_bad_file_stops_prepare_with_one_line_and_keeps_complete_shards(bad_file, tmp_path, capsys):
    spec, bad = _good_and_bad_files(tmp_path, bad_file)
    workdir = str(tmp_path / "out")
    code = _prepare_command(spec, workdir)
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    lines = _error_lines(err)
    assert len(lines) == 1 and re.fullmatch("llm-jax prepare: " + bad_file.pattern(bad), lines[0]), err
    assert os.listdir(os.path.join(workdir, "work")) == ["shard-00000"]
    complete = _stat_files(os.path.join(workdir, "work", "shard-00000"))
    # A rerun stops at the same file and leaves the complete shard as it was.
    assert _prepare_command(spec, workdir) == 1
    assert _error_lines(capsys.readouterr().err) == lines
    assert _stat_files(os.path.join(workdir, "work", "shard-00000")) == complete


def test_a_bad_file_or_record_is_skipped_counted_and_listed(bad_file, tmp_path, capsys):
    spec, bad = _good_and_bad_files(tmp_path, bad_file)
    workdir = str(tmp_path / "out")
    code = _prepare_command(spec, workdir, "--config.on_error=skip")
    out, err = capsys.readouterr()
    assert code == 0
    assert "Traceback" not in out + err and _error_lines(err) == []
    assert json.loads(out)["input_errors"] == 1
    with open(os.path.join(workdir, "report.json")) as f:
        inputs_report = json.load(f)["inputs"]
    [error] = inputs_report["listed_errors"]
    assert re.fullmatch(bad_file.pattern(bad), f"{error['where']}: {error['message']}"), error
    # The good file, and what the bad one held before its break (and after a bad record), were read.
    assert inputs_report["docs"] >= 2 + bad_file.docs_before + (1 if bad_file.record else 0)
    with open(os.path.join(workdir, "report.md")) as f:
        assert f"`{error['where']}`: {error['message']}" in f.read()


@pytest.mark.parametrize("bad_file", ["corrupt-zst"], indirect=True)
def test_a_bad_file_read_in_a_worker_process_is_the_same_one_line(bad_file, tmp_path, capsys):
    spec, bad = _good_and_bad_files(tmp_path, bad_file)
    assert _prepare_command(spec, str(tmp_path / "out"), "--config.processes=2") == 1
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and re.fullmatch("llm-jax prepare: " + bad_file.pattern(bad), lines[0]), lines
