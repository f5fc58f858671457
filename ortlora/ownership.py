"""What ortlora may remove: only files it can prove it wrote.

The rule every command holds: a file or directory is removed or replaced only when

- its name is one that ortlora writes there,
- a record that the same command wrote lists it (``ortlora-files.json`` in a directory written whole:
  artifacts by ortlora-build, an export by ortlora-export, a checkpoint by ortlora-train; ``ortlora-run.json``
  for a run directory's own files), and
- its content checks out: the size and SHA-256 the record holds (for a file that grows, a log, those of
  its first bytes, and the rest in the log's own format).

A record holds the SHA-256 of its own content, so a hand-written or edited one proves nothing. A directory
that holds anything else (a file of the user's, one that changed, a symbolic link, an empty folder) is
refused whole, before any work.

Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

FILES_RECORD = "ortlora-files.json"  # in a directory written whole: every file in it, with size and SHA-256
CHUNK = 1 << 20


def sha256(path: Path, size: int | None = None) -> str:
    """The SHA-256 of a file's first ``size`` bytes (all of it when None)."""
    digest, left = hashlib.sha256(), size
    with path.open("rb") as f:
        while left is None or left > 0:
            block = f.read(CHUNK if left is None else min(CHUNK, left))
            if not block:
                break
            digest.update(block)
            if left is not None:
                left -= len(block)
    return digest.hexdigest()


def describe(path: Path) -> dict:
    """What a record holds of a file: its size and SHA-256."""
    return {"size": path.stat().st_size, "sha256": sha256(path)}


def describe_bytes(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _checksum(record: dict) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def signed(record: dict) -> dict:
    """``record`` with the SHA-256 of its own content: edited by hand, it no longer proves anything."""
    return {**{k: v for k, v in record.items() if k != "checksum"}, "checksum": _checksum(record)}


def read_record(path: Path) -> dict | None:
    """A record ortlora wrote (a regular file whose checksum holds), else None."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 * CHUNK:
            return None
        record = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or record.get("checksum") != _checksum(record):
        return None
    return record


def write_atomic(path: Path, data: bytes) -> None:
    """``data`` into ``path`` through a temporary file renamed over it, flushed to disk first."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_record(path: Path, record: dict) -> None:
    write_atomic(path, (json.dumps(signed(record), indent=2) + "\n").encode())


def seal(directory: Path, by: str) -> None:
    """Record every file under ``directory`` (a build, an export, a checkpoint, written whole) as written ``by``
    that command."""
    files, folders = {}, []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink() or relative == FILES_RECORD:
            continue
        if path.is_dir():
            folders.append(relative)
        elif path.is_file():
            files[relative] = describe(path)
    write_record(directory / FILES_RECORD, {"written_by": by, "files": files, "folders": folders})


def matches(path: Path, accepted: list[dict], tail_ok: Callable[[bytes], bool] | None = None) -> bool:
    """Whether ``path`` is a regular file that one of the ``accepted`` descriptions proves ortlora's.

    A description ``{"size", "sha256"}`` must hold exactly; one with ``"grows": true`` holds the file's
    first ``size`` bytes, and what follows them must satisfy ``tail_ok`` (a log's own format)."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        size = path.stat().st_size
        for known in accepted:
            if not (isinstance(known, dict) and type(known.get("size")) is int and isinstance(known.get("sha256"), str)):
                continue
            if known.get("grows"):
                if size < known["size"] or tail_ok is None or sha256(path, known["size"]) != known["sha256"]:
                    continue
                with path.open("rb") as f:
                    f.seek(known["size"])
                    if tail_ok(f.read()):
                        return True
            elif size == known["size"] and sha256(path) == known["sha256"]:
                return True
    except OSError:
        return False
    return False


def unproven(directory: Path, by: str) -> list[str]:
    """Entries of ``directory`` (written whole) that its ``ortlora-files.json`` does not prove written ``by`` that
    command: all of them when the record is missing, not ortlora's, or another command's."""
    record = read_record(directory / FILES_RECORD)
    files = record.get("files") if record and record.get("written_by") == by else None
    if not isinstance(files, dict):
        return sorted(p.name for p in directory.iterdir())
    folders = {f for f in record.get("folders", []) if isinstance(f, str)}  # seal lists every folder it saw
    strangers = []
    for root, dirs, names in os.walk(directory):
        base = Path(root)
        for name in dirs + names:
            path = base / name
            relative = path.relative_to(directory).as_posix()
            if relative == FILES_RECORD:
                continue
            if path.is_symlink() or (path.is_dir() and relative not in folders):
                strangers.append(relative)
            elif not path.is_dir() and not matches(path, [files.get(relative)]):
                strangers.append(relative)
        dirs[:] = [d for d in dirs if (base / d).relative_to(directory).as_posix() in folders
                   and not (base / d).is_symlink()]
    return sorted(strangers)


def named(strangers: list[str], shown: int = 3) -> str:
    """'a', 'a and b', 'a, b and c', 'a, b, c and 4 more': entries in a one-line message."""
    more = len(strangers) - shown
    if more > 0:
        return ", ".join(strangers[:shown]) + f" and {more} more"
    return " and ".join(filter(None, [", ".join(strangers[:-1]), strangers[-1]])) if strangers else "nothing"
