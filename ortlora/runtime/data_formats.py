"""Where training rows come from: a file (.jsonl, .json, .csv, .parquet), a directory in mlx-lm's layout, or a
split of a Hugging Face Hub dataset; with TRL's column names, or other names mapped onto them (--columns).

Every reader yields (row number, row) pairs for data.encode_rows, numbered from 1 as the source's rows are: the
line of a JSON Lines file, the element of a .json list, the data row of a CSV file (the header and blank lines
not counted), the row of a Parquet file or Hub split (pyarrow's and datasets' index + 1). A row the reader cannot
make into an object comes as the BadExample that says why, so a bad row is ``source:number: what is wrong``
whatever the format. Parquet needs pyarrow and Hub datasets need ``datasets``, both optional: neither is imported
until such data is read.
"""

from __future__ import annotations

import csv
import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ortlora.errors import OrtloraError, one_line
from ortlora.files import json_type, parse_json, read_text
from ortlora.runtime.data import MAX_LINE_BYTES, BadExample, encode_rows, jsonl_rows

COLUMNS = ("text", "prompt", "completion", "messages", "tools")  # TRL's names, what --columns maps onto
TRAINED = ("text", "prompt", "completion", "messages")  # a row needs one of these
JSON_TEXT = ("messages", "tools")  # a table may hold these as JSON text (a CSV file always does)
SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # any other: JSON Lines
# A Hub dataset id, owner/name, by huggingface_hub's rule (utils/_validators.py): names of word characters, "-" and
# ".", each starting and ending with a word character, neither "--" nor ".." anywhere.
HUB_NAME = r"\w(?:[\w.-]{0,94}\w)?"
HUB_ID = re.compile(f"{HUB_NAME}/{HUB_NAME}")
DEFAULT_SPLITS = {"--data": "train", "--eval-data": "validation"}
# Parquet is read a record batch at a time: 1,024 rows of chat data are a few MB, whatever the file's size.
PARQUET_BATCH_ROWS = 1024
OPTIONAL = {"pyarrow.parquet": ("pyarrow", "parquet"), "datasets": ("datasets", "hub-data")}


@dataclass(frozen=True)
class Source:
    """One set of rows: a file of a known format, or a split of a Hub dataset."""

    kind: str  # jsonl, json, csv, parquet or hub
    location: str  # the file's path or the Hub id
    split: str | None = None  # hub only

    @property
    def name(self) -> str:
        """What messages call it: the path, or owner/name[split]."""
        return f"{self.location}[{self.split}]" if self.kind == "hub" else self.location


def parse_columns(text: str | None, flag: str = "--columns") -> dict[str, str]:
    """``prompt=question,completion=answer`` as {TRL name: column of the data}; one line for anything else."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    for pair in text.split(","):
        name, sep, column = (part.strip() for part in pair.partition("="))
        if not sep or not name or not column:
            raise OrtloraError(f"{flag} {text!r}: {pair.strip()!r} is not NAME=COLUMN; write e.g. "
                               "prompt=question,completion=answer")
        if name not in COLUMNS:
            raise OrtloraError(f"{flag} {text!r}: {name!r} is not one of TRL's column names ({', '.join(COLUMNS)}), "
                               "which go on the left of each NAME=COLUMN")
        if name in mapping:
            raise OrtloraError(f"{flag} {text!r} maps {name!r} twice; keep one")
        mapping[name] = column
    return mapping


def is_hub_id(spec: str | None, base: Path | None = None) -> bool:
    """Whether ``spec`` names a Hub dataset: shaped owner/name, not an existing path (relative to ``base`` when
    given) and not named like a data file (a missing data/train.jsonl stays a missing file)."""
    if not spec or not HUB_ID.fullmatch(spec) or "--" in spec or ".." in spec or Path(spec).suffix.lower() in SUFFIXES:
        return False
    return not os.path.exists((base / spec) if base else spec)  # False for a path that cannot be looked up


def layout_file(directory: Path, stem: str) -> Path | None:
    """``stem``.jsonl / .json / .parquet / .csv of a directory in mlx-lm's layout: at most one may exist."""
    found = [directory / f"{stem}{suffix}" for suffix in SUFFIXES if (directory / f"{stem}{suffix}").is_file()]
    if len(found) > 1:
        raise OrtloraError(f"{directory} holds {' and '.join(p.name for p in found)}: a directory of data holds one "
                           f"{stem} file; remove or rename the others")
    return found[0] if found else None


def resolve(spec: str, flag: str, split: str | None = None, stem: str = "train") -> Source:
    """The rows ``flag`` (--data or --eval-data) names: a directory gives its ``stem`` file, a Hub id its
    ``split`` (default train for --data, validation for --eval-data), a file its format by suffix."""
    path = Path(spec)
    if path.is_dir():
        file = layout_file(path, stem)
        if file is None:
            raise OrtloraError(f"{flag} {spec} is a directory without a {stem}.jsonl, .json, .parquet or .csv file "
                               "(mlx-lm's layout: train, valid and test files)")
        return Source(SUFFIXES[file.suffix], str(file))
    if is_hub_id(spec):
        return Source("hub", spec, split or DEFAULT_SPLITS[flag])
    return Source(SUFFIXES.get(path.suffix.lower(), "jsonl"), spec)


def load(source: Source, tokenizer, max_seq_len: int, on_bad: str = "stop", columns: dict[str, str] | None = None):
    """Read and tokenise one source: (examples, data.LoadReport)."""
    if source.kind != "hub":
        path = Path(source.location)
        if not path.is_file():
            raise OrtloraError(f"data file {path} " + ("is not a file" if path.exists() else "does not exist"))
    rows = READERS[source.kind](source, columns or {})
    return encode_rows(rows, source.name, tokenizer, max_seq_len, on_bad, "line" if source.kind == "jsonl" else "row")


def _optional(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = OPTIONAL[module]
        raise OrtloraError(f"{what} needs the {package} package: pip install 'ortlora[{extra}]'") from None


# -- mapping columns ---------------------------------------------------------------------------------------------


def _mapped(row, columns: dict[str, str]):
    """The row with TRL's names: each mapped column renamed (a column of that TRL name already there gives way)."""
    if not columns or not isinstance(row, dict):
        return row
    missing = [column for column in columns.values() if column not in row]
    if missing:
        return BadExample(f"no {', '.join(map(repr, missing))} field, which --columns names (the row has: "
                          f"{', '.join(row) or 'nothing'})")
    renamed = {k: v for k, v in row.items() if k not in columns and k not in columns.values()}
    return renamed | {name: row[column] for name, column in columns.items()}


def _check_header(where: str, header: list[str], columns: dict[str, str]) -> None:
    """A table's columns, checked before its first row: the mapped ones exist, and one of TRL's is there."""
    have = f"its columns: {', '.join(header) or 'none'}"
    missing = [column for column in columns.values() if column not in header]
    if missing:
        raise OrtloraError(f"{where} has no column {', '.join(map(repr, missing))}, which --columns names ({have})")
    names = {c for c in header if c not in columns.values()} | set(columns)
    if not names & set(TRAINED):
        example = next((c for c in header if c not in COLUMNS), "COLUMN")
        raise OrtloraError(f"{where} has no 'text', 'prompt'/'completion' or 'messages' column ({have}); name the "
                           f"one to train on with --columns, e.g. --columns text={example}")


def _table_row(row: dict, columns: dict[str, str]):
    """A table's row with TRL's names; an empty cell (null, or an empty messages/tools text) is an absent field,
    and messages or tools given as text are the JSON they spell."""
    row = _mapped(row, columns)
    fields = {}
    for key, value in row.items():
        if value is None or key in JSON_TEXT and value == "":
            continue
        if key in JSON_TEXT and isinstance(value, str):
            try:
                value = parse_json(value)
            except ValueError as e:
                return BadExample(f"{key!r} holds text that is {e}; a table holds {key} as a list, or as its JSON text")
        fields[key] = value
    if not fields.keys() & set(TRAINED):
        empty = [key for key in row if key in TRAINED]
        return BadExample(f"{' and '.join(map(repr, empty))} {'is' if len(empty) == 1 else 'are'} empty in this row")
    return fields


# -- readers: (number, row or BadExample) ------------------------------------------------------------------------


def _jsonl(source: Source, columns: dict[str, str]):
    for lineno, row in jsonl_rows(Path(source.location)):
        yield lineno, row if isinstance(row, BadExample) else _mapped(row, columns)


def _json(source: Source, columns: dict[str, str]):
    """A .json file is one JSON list of row objects, parsed whole (as json.load and datasets read it)."""
    path = source.location
    try:
        rows = parse_json(read_text(Path(path)))
    except ValueError as e:
        hint = "; it looks like JSON Lines, one row per line: name it .jsonl" if "Extra data" in str(e) else ""
        raise OrtloraError(f"{path} is {e}; a .json data file holds one JSON list of rows{hint}") from None
    if not isinstance(rows, list):
        raise OrtloraError(f'{path} holds {json_type(rows)}, expected a JSON list of rows ([{{"text": ...}}, ...]); '
                           "JSON Lines, one row per line, are read from a .jsonl file")
    for number, row in enumerate(rows, 1):
        yield number, _mapped(row, columns) if isinstance(row, dict) else \
            BadExample(f'{json_type(row)}, not an object of fields like {{"text": ...}}; a .json file is a list of them')


def _csv(source: Source, columns: dict[str, str]):
    """A CSV file with a header row (Excel's dialect: commas, double quotes). An empty cell is an absent field, as
    datasets (pandas) reads it. Each row is decoded on its own: a cell that is not UTF-8 is one bad row."""
    path = source.location
    limit = csv.field_size_limit(MAX_LINE_BYTES)  # a cell may hold as much as a JSON Lines line (default: 128 KiB)
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise OrtloraError(f"{path} has no header row; a CSV data file starts with its column names, e.g. "
                                   "text or prompt,completion")
            if _undecodable(header):
                raise OrtloraError(f"{path}: the header row is not UTF-8 text")
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise OrtloraError(f"{path}: column {twice[0]!r} appears twice in the header; rename one")
            _check_header(path, header, columns)
            number = 0
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    number += 1
                    yield number, BadExample(f"not valid CSV ({e})")
                    continue
                if not cells:  # a blank line
                    continue
                number += 1
                if len(cells) != len(header):
                    yield number, BadExample(f"the row has {len(cells)} fields and the header {len(header)}")
                elif _undecodable(cells):
                    yield number, BadExample("not UTF-8 text")
                else:
                    yield number, _table_row(dict(zip(header, (cell or None for cell in cells))), columns)
    except OSError as e:
        raise OrtloraError(f"data file {path} cannot be read ({e.strerror or e})") from None
    finally:
        csv.field_size_limit(limit)


def _undecodable(cells: list[str]) -> bool:
    """Whether a cell holds bytes that are not UTF-8 (read as surrogates by errors="surrogateescape")."""
    try:
        for cell in cells:
            cell.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parquet(source: Source, columns: dict[str, str]):
    """A Parquet file, read a record batch at a time and only the columns the rows use."""
    pq = _optional("pyarrow.parquet", "reading a .parquet file")
    import pyarrow

    path = source.location
    try:
        file = pq.ParquetFile(path)
    except (OSError, ValueError, pyarrow.ArrowException) as e:
        raise OrtloraError(f"{path} is not a Parquet file pyarrow can read ({one_line(e)})") from None
    header = file.schema_arrow.names
    _check_header(path, header, columns)
    number = 0
    try:
        wanted = [c for c in header if c in COLUMNS or c in columns.values()]
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
            for row in batch.to_pylist():
                number += 1
                yield number, _table_row(row, columns)
    except (OSError, ValueError, pyarrow.ArrowException) as e:
        raise OrtloraError(f"{path}:{number + 1}: the rows from here on cannot be read ({one_line(e)})") from None


def _hub(source: Source, columns: dict[str, str]):
    """A split of a Hub dataset, through datasets.load_dataset (downloaded once into its cache)."""
    datasets = _optional("datasets", f"{source.location} is no file or directory here, and reading it as a Hub dataset")
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its warnings of each failed request: the error below is the one line
    try:
        dataset = datasets.load_dataset(source.location, split=source.split)
    except Exception as e:  # datasets' own errors, ValueError (an unknown split), ConnectionError, FileNotFoundError
        raise OrtloraError(f"{source.location}: no file or directory of that name here, and the Hub dataset's "
                           f"{source.split!r} split cannot be loaded ({one_line(e)})") from None
    finally:
        hub_log.setLevel(level)
    header = list(dataset.column_names)
    _check_header(source.name, header, columns)
    dataset = dataset.select_columns([c for c in header if c in COLUMNS or c in columns.values()])
    for number, row in enumerate(dataset, 1):
        yield number, _table_row(row, columns)


READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet, "hub": _hub}
