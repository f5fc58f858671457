"""Data beyond JSON Lines: .json lists, CSV, Parquet, mlx-lm's directory layout and Hub datasets give the examples
the same rows give as JSON Lines; --columns maps other names onto TRL's; a bad row is ``source:row: what is wrong``.

The Hub path is tested up to datasets.load_dataset, which is replaced by a loader that returns an in-memory
Dataset (the tests run offline).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ortlora.build.tiny import QWEN25_TOKENIZER_DIR
from ortlora.errors import OrtloraError
from ortlora.runtime import cli as train_cli
from ortlora.runtime import data_formats
from ortlora.runtime.cli import data_path
from ortlora.runtime.data import batches_in_epoch
from ortlora.runtime.tokenizer import Tokenizer
from tests.cli_helpers import one_line

FAST = ["--no-progress", "--no-plot", "--batch-size", "4", "--max-steps", "1"]


def rows_of(name: str, n: int | None = None) -> list[dict]:
    lines = data_path(f"builtin:{name}", "train").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


# Every kind of row, mixed in one file: tables then hold empty cells, which are absent fields.
MIXED = rows_of("chat", 6) + rows_of("completions", 6) + rows_of("text", 6)


def table_cell(key: str, value):
    return json.dumps(value, ensure_ascii=False) if key in ("messages", "tools") else value


def write(path: Path, rows: list[dict], json_text: bool = False) -> Path:
    """``rows`` in the format of ``path``'s suffix; messages and tools as JSON text in CSV (always) and Parquet
    (json_text: Arrow cannot hold tool schemas whose fields differ from row to row)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows([table_cell(k, row[k]) if k in row else "" for k in columns] for row in rows)
    elif path.suffix == ".parquet":
        table = [{k: table_cell(k, row.get(k)) if json_text else row.get(k) for k in columns} for row in rows]
        pq.write_table(pa.Table.from_pylist(table), path, row_group_size=5)  # several row groups
    return path


def as_lists(examples) -> list:
    return [(e.input_ids.tolist(), e.labels.tolist(), None if e.segments is None else e.segments.tolist())
            for e in examples]


def assert_same(examples, reference, pad_id: int) -> None:
    assert as_lists(examples) == as_lists(reference)
    for got, want in zip(batches_in_epoch(examples, 4, 0, 0, True, pad_id),
                         batches_in_epoch(reference, 4, 0, 0, True, pad_id), strict=True):
        assert all(np.array_equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def tokenizer(artifacts) -> Tokenizer:
    return Tokenizer(artifacts)


def load(path_or_id: str, tokenizer, columns: str | None = None, split: str | None = None, on_bad: str = "stop",
         max_seq_len: int = 64):
    source = data_formats.resolve(str(path_or_id), "--data", split)
    return data_formats.load(source, tokenizer, max_seq_len, on_bad, data_formats.parse_columns(columns))


class FakeHub:
    """datasets.load_dataset for owner/name ids, from rows held here: the calls it gets are recorded."""

    def __init__(self, monkeypatch, splits: dict[str, list[dict]]):
        import datasets

        self.splits, self.calls = splits, []
        monkeypatch.setattr(datasets, "load_dataset", self)

    def __call__(self, name, split=None, **kwargs):
        import datasets

        self.calls.append((name, split))
        if split not in self.splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(self.splits)}.')
        return datasets.Dataset.from_list(self.splits[split])


# -- the same examples from every format -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet", "hub"])
def test_every_format_gives_the_examples_of_the_same_rows_in_json_lines(tokenizer, tmp_path, monkeypatch, suffix):
    reference, report = load(write(tmp_path / "rows.jsonl", MIXED), tokenizer)
    assert report.examples == len(MIXED)
    if suffix == "hub":
        monkeypatch.chdir(tmp_path)
        hub = FakeHub(monkeypatch, {"train": [{k: r.get(k) for k in ("messages", "prompt", "completion", "text")}
                                              for r in MIXED]})
        examples, report = load("owner/rows", tokenizer)
        assert hub.calls == [("owner/rows", "train")] and report.path == "owner/rows[train]"
    else:
        examples, report = load(write(tmp_path / f"rows{suffix}", MIXED), tokenizer)
    assert report.examples == len(MIXED) and report.unit == "row"
    assert_same(examples, reference, tokenizer.pad_id)


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_tool_calling_rows_read_the_same_from_every_format(tmp_path, suffix):
    """Tools whose schemas differ row to row: Parquet holds them (and the conversations) as JSON text."""
    qwen = Tokenizer(QWEN25_TOKENIZER_DIR)
    rows = rows_of("tools")
    reference, _ = load(write(tmp_path / "tools.jsonl", rows), qwen, max_seq_len=2048)
    examples, report = load(write(tmp_path / f"tools{suffix}", rows, json_text=True), qwen, max_seq_len=2048)
    assert report.examples == len(rows) == 6
    assert_same(examples, reference, qwen.pad_id)


def test_a_parquet_file_is_read_in_batches_of_rows(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(data_formats, "PARQUET_BATCH_ROWS", 4)
    reference, _ = load(write(tmp_path / "rows.jsonl", MIXED), tokenizer)
    seen = []
    batches = pq.ParquetFile.iter_batches

    def iter_batches(self, *args, **kwargs):
        for batch in batches(self, *args, **kwargs):
            seen.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    examples, _ = load(write(tmp_path / "rows.parquet", MIXED), tokenizer)
    assert seen and max(seen) <= 4 and sum(seen) == len(MIXED)  # 18 rows in 5 batches, not one table
    assert_same(examples, reference, tokenizer.pad_id)


# -- a directory in mlx-lm's layout ------------------------------------------------------------------------------


def test_a_directory_trains_on_its_train_file_and_evaluates_on_its_valid_file(artifacts, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write(data / "train.csv", MIXED)
    write(data / "valid.parquet", rows_of("chat", 3))
    write(data / "test.jsonl", [{"text": 5}])  # ignored by training: a bad row there stops nothing
    run = tmp_path / "run"
    assert train_cli.main(["--artifacts", str(artifacts), "--data", str(data), "--out", str(run), "--no-progress",
                           "--no-plot", "--batch-size", "4", "--max-steps", "2", "--eval-every", "1"]) == 0
    out = capsys.readouterr().out
    assert f"18 examples from {data / 'train.csv'}" in out
    assert f"evaluating on valid.parquet of {data} (mlx-lm's layout" in out
    assert f"eval: 3 examples from {data / 'valid.parquet'}" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_loss"] is not None
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "eval"][:2] == [1, 2]


def test_a_directory_without_valid_has_no_eval_and_eval_split_overrides_valid(artifacts, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write(data / "train.jsonl", MIXED)
    c, _ = train_cli.resolve_config(train_cli.parse_args(["--data", str(data)]))
    assert train_cli.data_sources(c)[1] is None
    write(data / "valid.json", rows_of("text", 2))
    c, _ = train_cli.resolve_config(train_cli.parse_args(["--data", str(data), "--eval-split", "0.2"]))
    assert train_cli.data_sources(c)[1:] == (None, None)
    c, _ = train_cli.resolve_config(train_cli.parse_args(["--data", str(data), "--eval-data", str(data)]))
    assert train_cli.data_sources(c)[1] == data_formats.Source("json", str(data / "valid.json"))


@pytest.mark.parametrize("files, message", [
    (["train.jsonl", "train.csv"], "holds train.jsonl and train.csv: a directory of data holds one train file"),
    (["valid.jsonl"], "is a directory without a train.jsonl, .json, .parquet or .csv file (mlx-lm's layout"),
    (["train.jsonl", "valid.json", "valid.parquet"], "holds valid.json and valid.parquet"),
])
def test_a_directory_out_of_layout_is_one_line(artifacts, tmp_path, capsys, files, message):
    data = tmp_path / "data"
    data.mkdir()
    for name in files:
        write(data / name, MIXED)
    code = train_cli.main(["--artifacts", str(artifacts), "--data", str(data), "--out", str(tmp_path / "run"), *FAST])
    assert message in one_line(capsys, code)


# -- bad rows: file:row: what is wrong ---------------------------------------------------------------------------


def csv_bytes(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


GOOD = {"text": "The cat sits."}
BAD_ROWS = {
    # name: (file, its bytes or rows, the message, the number of good rows)
    "json row not an object": ("d.json", [GOOD, "just text", GOOD], "d.json:2: a string, not an object of fields", 2),
    "json content not a string": ("d.json", [GOOD, {"messages": [{"role": "user", "content": 5}]}],
                                  "d.json:2: message 0 needs a string 'content'", 1),
    "csv messages not JSON": ("d.csv", csv_bytes("text,messages", "The cat.,", ',"[{""role"": ""user"""'),
                              "d.csv:2: 'messages' holds text that is not valid JSON", 1),
    "csv fields missing": ("d.csv", csv_bytes("prompt,completion", "Q:, A.", "Q: only"),
                           "d.csv:2: the row has 1 fields and the header 2", 1),
    "csv not UTF-8": ("d.csv", csv_bytes("text", "The cat.") + b"caf\xe9\nThe dog.\n", "d.csv:2: not UTF-8 text", 2),
    "csv empty cell": ("d.csv", csv_bytes("prompt,completion", "Q:, A.", "Q:,"),
                       "d.csv:2: 'prompt' and 'completion' must both be strings", 1),
    "parquet null text": ("d.parquet", [GOOD, {"text": None}, GOOD], "d.parquet:2: 'text' is empty in this row", 2),
    "parquet completion null": ("d.parquet", [{"prompt": "Q:", "completion": " A."}, {"prompt": "Q:", "completion": None}],
                                "d.parquet:2: 'prompt' and 'completion' must both be strings", 1),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_bad_row_names_file_and_row_in_every_format_and_can_be_skipped(artifacts, tmp_path, capsys, case):
    name, content, message, good = BAD_ROWS[case]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write(path, content)
    code = train_cli.main(["--artifacts", str(artifacts), "--data", str(path), "--out", str(tmp_path / "run"), *FAST])
    err = one_line(capsys, code)
    assert f"{tmp_path}/{message}" in err and "(pass --on-bad-data skip to skip such rows)" in err
    assert train_cli.main(["--artifacts", str(artifacts), "--data", str(path), "--out", str(tmp_path / "run2"), *FAST,
                           "--on-bad-data", "skip"]) == 0
    assert f"{good} examples from {path}, 1 bad rows skipped" in capsys.readouterr().out


def test_a_bad_hub_row_names_the_dataset_split_and_row(artifacts, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    FakeHub(monkeypatch, {"train": [GOOD, GOOD], "test": [GOOD, {"text": None}]})
    code = train_cli.main(["--artifacts", str(artifacts), "--data", "owner/name", "--data-split", "test",
                           "--out", str(tmp_path / "run"), *FAST])
    assert "owner/name[test]:2: 'text' is empty in this row" in one_line(capsys, code)


BAD_FILES = {
    "json not a list": ("d.json", b'{"rows": [{"text": "a"}]}', "d.json holds an object, expected a JSON list of rows"),
    "json lines in a .json": ("d.json", b'{"text": "a"}\n{"text": "b"}\n',
                              "d.json is not valid JSON (Extra data at line 2 column 1); a .json data file holds one "
                              "JSON list of rows; it looks like JSON Lines, one row per line: name it .jsonl"),
    "json not UTF-8": ("d.json", b'[{"text": "caf\xe9"}]', "d.json is not UTF-8 text"),
    "csv empty": ("d.csv", b"", "d.csv has no header row"),
    "csv without a trl column": ("d.csv", csv_bytes("body,id", "The cat.,1"),
                                 "d.csv has no 'text', 'prompt'/'completion' or 'messages' column (its columns: body, "
                                 "id); name the one to train on with --columns, e.g. --columns text=body"),
    "csv column twice": ("d.csv", csv_bytes("text,text", "a,b"), "d.csv: column 'text' appears twice in the header"),
    "parquet not parquet": ("d.parquet", b"PAR1 not really", "d.parquet is not a Parquet file pyarrow can read"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_one_line(artifacts, tmp_path, capsys, case):
    name, content, message = BAD_FILES[case]
    (tmp_path / name).write_bytes(content)
    code = train_cli.main(["--artifacts", str(artifacts), "--data", str(tmp_path / name), "--out",
                           str(tmp_path / "run"), *FAST])
    assert f"{tmp_path}/{message}" in one_line(capsys, code)


# -- --columns ---------------------------------------------------------------------------------------------------

RENAMED = [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(rows_of("completions", 8))]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_columns_map_other_names_onto_trls(tokenizer, tmp_path, suffix):
    reference, _ = load(write(tmp_path / "rows.jsonl", rows_of("completions", 8)), tokenizer)
    path = write(tmp_path / f"renamed{suffix}", RENAMED)
    examples, _ = load(path, tokenizer, columns="prompt=question, completion=answer")
    assert_same(examples, reference, tokenizer.pad_id)
    # A column of a TRL name gives way to the one mapped onto it; names may swap.
    swapped = [{"prompt": r["answer"], "completion": r["question"], "text": "unused"} for r in RENAMED]
    examples, _ = load(write(tmp_path / f"swapped{suffix}", swapped), tokenizer, columns="prompt=completion,completion=prompt")
    assert_same(examples, reference, tokenizer.pad_id)


def test_columns_in_a_toml_config_and_for_the_eval_data(artifacts, tmp_path, capsys):
    write(tmp_path / "train.csv", [{"body": r["text"]} for r in rows_of("text", 8)])
    write(tmp_path / "valid.jsonl", [{"body": r["text"]} for r in rows_of("text", 2)])
    config = tmp_path / "run.toml"
    config.write_text('data = "train.csv"\neval_data = "valid.jsonl"\ncolumns = "text=body"\n')
    run = tmp_path / "run"
    assert train_cli.main(["--config", str(config), "--artifacts", str(artifacts), "--out", str(run), *FAST]) == 0
    assert "eval: 2 examples from" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["columns"] == "text=body"


@pytest.mark.parametrize("columns, message", [
    ("txt=body", "--columns 'txt=body': 'txt' is not one of TRL's column names (text, prompt, completion, messages, "
                 "tools)"),
    ("text", "--columns 'text': 'text' is not NAME=COLUMN; write e.g. prompt=question,completion=answer"),
    ("text=a,text=b", "--columns 'text=a,text=b' maps 'text' twice; keep one"),
    ("prompt=question,completion=reply", "{path} has no column 'reply', which --columns names (its columns: question, "
                                         "answer, id)"),
])
def test_a_bad_column_mapping_is_one_line(artifacts, tmp_path, capsys, columns, message):
    path = write(tmp_path / "renamed.csv", RENAMED)
    code = train_cli.main(["--artifacts", str(artifacts), "--data", str(path), "--columns", columns,
                           "--out", str(tmp_path / "run"), *FAST])
    assert message.format(path=path) in one_line(capsys, code)


def test_a_json_lines_row_without_the_mapped_column_is_a_bad_row(tokenizer, tmp_path):
    path = write(tmp_path / "renamed.jsonl", RENAMED[:2] + [{"question": "Q:", "reply": "A."}])
    with pytest.raises(OrtloraError, match=rf"^{path}:3: no 'answer' field, which --columns names \(the row has: "
                                           r"question, reply\)"):
        load(path, tokenizer, columns="prompt=question,completion=answer")
    assert load(path, tokenizer, columns="prompt=question,completion=answer", on_bad="skip")[1].examples == 2


# -- Hub datasets ------------------------------------------------------------------------------------------------


def test_a_hub_dataset_trains_with_its_splits(artifacts, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = FakeHub(monkeypatch, {"train": [{"body": r["text"]} for r in rows_of("text", 8)],
                                "validation": [{"body": r["text"]} for r in rows_of("text", 2)],
                                "test": [{"body": "The owl."}]})
    run = tmp_path / "run"
    assert train_cli.main(["--artifacts", str(artifacts), "--data", "owner/name", "--eval-data", "owner/name",
                           "--columns", "text=body", "--out", str(run), *FAST]) == 0
    assert hub.calls == [("owner/name", "train"), ("owner/name", "validation")]
    out = capsys.readouterr().out
    assert "8 examples from owner/name[train]" in out and "eval: 2 examples from owner/name[validation]" in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"] == saved["eval_data"] == "owner/name"  # an id, not made a path
    hub.calls.clear()
    assert train_cli.main(["--artifacts", str(artifacts), "--data", "owner/name", "--data-split", "validation",
                           "--eval-data", "owner/name", "--eval-data-split", "test", "--columns", "text=body",
                           "--out", str(tmp_path / "run2"), *FAST]) == 0
    assert hub.calls == [("owner/name", "validation"), ("owner/name", "test")]


def test_a_hub_split_that_cannot_be_loaded_is_one_line(artifacts, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    FakeHub(monkeypatch, {"train": [GOOD]})
    code = train_cli.main(["--artifacts", str(artifacts), "--data", "owner/name", "--data-split", "dev",
                           "--out", str(tmp_path / "run"), *FAST])
    assert "owner/name: no file or directory of that name here, and the Hub dataset's 'dev' split cannot be loaded " \
        "(Unknown split" in one_line(capsys, code)


@pytest.mark.parametrize("options, message", [
    (["--data", "{tmp}/d.jsonl", "--data-split", "test"],
     "--data-split test picks a split of a Hub dataset, and --data {tmp}/d.jsonl is not one (owner/name): leave "
     "--data-split out"),
    (["--eval-data-split", "test"], "--eval-data-split test picks a split of a Hub dataset, and --eval-data is not "
                                    "given: leave --eval-data-split out"),
    (["--data", "data/train.jsonl"], "data file data/train.jsonl does not exist"),  # named like a file: no Hub id
])
def test_a_split_is_only_for_hub_data(artifacts, tmp_path, capsys, monkeypatch, options, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "d.jsonl", [GOOD])
    code = train_cli.main(["--artifacts", str(artifacts), *[o.format(tmp=tmp_path) for o in options],
                           "--out", str(tmp_path / "run"), *FAST])
    assert message.format(tmp=tmp_path) in one_line(capsys, code)


@pytest.mark.parametrize("module, data, message", [
    ("pyarrow.parquet", "d.parquet", "reading a .parquet file needs the pyarrow package: pip install 'ortlora[parquet]'"),
    ("datasets", "owner/name", "owner/name is no file or directory here, and reading it as a Hub dataset needs the "
                               "datasets package: pip install 'ortlora[hub-data]'"),
])
def test_a_missing_optional_package_is_one_line_saying_what_to_install(artifacts, tmp_path, capsys, monkeypatch,
                                                                       module, data, message):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "d.parquet", [GOOD])
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    code = train_cli.main(["--artifacts", str(artifacts), "--data", data, "--out", str(tmp_path / "run"), *FAST])
    assert message in one_line(capsys, code)


def test_a_json_list_in_a_jsonl_file_says_to_name_it_json(artifacts, tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n]\n')
    err = one_line(capsys, train_cli.main(["--artifacts", str(artifacts), "--data", str(path),
                                           "--out", str(tmp_path / "run"), *FAST]))
    assert f"{path}:1: not valid JSON" in err and "a file that is one JSON list of rows is read as one when it is " \
                                                  "named .json" in err
    assert train_cli.main(["--artifacts", str(artifacts), "--data", str(path.rename(tmp_path / "d.json")),
                           "--out", str(tmp_path / "run"), *FAST]) == 0
