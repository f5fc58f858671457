"""Reading the small files ortlora is handed (manifests, configs, checkpoint state), each failure one line.

Torch-free. Every reader names the file and what is wrong with it, and a path read from a file is
resolved only inside the directory it belongs to: such paths come from files anyone can edit.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath

from ortlora.errors import REBUILD, OrtloraError, one_line

MANIFEST_NAME = "ortlora.json"  # an artifact directory's manifest (manifest.py)

JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}


def json_type(value) -> str:
    """How JSON calls the type of ``value``: "an array", "a string", ..."""
    return JSON_TYPES.get(type(value), type(value).__name__)


def _then(fix: str) -> str:
    return f"; {fix}" if fix else ""


def read_text(path: Path, fix: str = "") -> str:
    """The file's text; ``fix`` says what to do when it cannot be read (e.g. "rebuild the artifacts")."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OrtloraError(f"{path} is not UTF-8 text (bad byte at offset {e.start}){_then(fix)}") from None
    except OSError as e:
        raise OrtloraError(f"{path} cannot be read ({e.strerror or e}){_then(fix)}") from None


def parse_json(text: str):
    """json.loads, each way it can fail a ValueError that says what is wrong in a few words."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise ValueError(f"not usable JSON ({one_line(e)})") from None


def read_json(path: Path, fix: str = "") -> dict:
    """The JSON object a file holds, or a one-line error naming the file and what is wrong with it."""
    try:
        value = parse_json(read_text(path, fix))
    except ValueError as e:
        raise OrtloraError(f"{path} is {e}{_then(fix)}") from None
    if not isinstance(value, dict):
        raise OrtloraError(f"{path} holds {json_type(value)}, expected a JSON object{_then(fix)}")
    return value


def inside(directory: Path, name: str, source: str) -> Path:
    """``directory / name`` when ``name`` is a plain relative path that stays inside ``directory``, symbolic
    links resolved; ``source`` says where the name was read (for the error)."""
    relative = PurePath(name) if isinstance(name, str) else None
    if relative is None or not relative.parts or relative.anchor or ".." in relative.parts:
        raise OrtloraError(f"{source} names {name!r}, which is not a relative path inside {directory}")
    path = Path(directory) / relative
    if not path.resolve().is_relative_to(Path(directory).resolve()):
        raise OrtloraError(f"{source} names {name!r}, which leads outside {directory} (through a symbolic link)")
    return path


def byte_size(count: int) -> str:
    """1,234,567,890 -> '1.15 GiB': sizes in messages, in binary units."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def artifact_file(directory: Path, name: str) -> Path:
    """``directory / name``, a file read by its fixed name (tokenizer.json, chat_template.jinja, ...). In an
    artifact directory (one with a manifest) it must not be a symbolic link that leads outside the directory,
    listed in the manifest or not: artifacts come from elsewhere, and such a link would make ortlora read, and
    render into training text, any file of the machine. A Hugging Face model directory is not confined: the
    Hub's cache links every file of a snapshot to a blob outside it."""
    path = Path(directory) / name
    if (Path(directory) / MANIFEST_NAME).is_file() and (path.exists() or path.is_symlink()):
        if not path.resolve().is_relative_to(Path(directory).resolve()):
            raise OrtloraError(f"{path} is a symbolic link that leads outside the artifact directory {directory}, "
                               f"which ortlora does not follow; {REBUILD}")
    return path
