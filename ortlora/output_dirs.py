"""Output directories that ortlora writes, replaces and cleans up, and never one it did not write.

Three commands write directories: ``ortlora-build`` (artifacts), ``ortlora-export`` (an adapter or a
model) and ``ortlora-train`` (a run). The rules they share:

- ``--force`` / ``--overwrite`` replace only a directory that is empty or that ortlora can prove it wrote,
  every entry of it (ownership.py: listed in ortlora's own record, with the recorded size and SHA-256),
  and never the current directory or one above it, a filesystem root, the home directory, or a
  directory the command reads from (the model, the artifacts, the adapter). Anything else is refused
  in one line before any work starts, and checked again just before the replacement.
- Output is assembled in a staging directory beside the target and swapped in by renames, so a kill
  leaves either the old output or the new one, never a mix.
- Staging directories carry their owner's process id in their name: one whose owner is gone is a
  leftover of a kill and is removed at the next start, one whose owner lives is left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from ortlora.errors import OrtloraError
from ortlora.ownership import FILES_RECORD, named, seal, unproven

# Written into every export's output: what was exported, from what.
EXPORT_MARKER = "ortlora-export.json"


def _is_same_or_above(path: Path, other: Path) -> bool:
    """Whether replacing ``path`` would remove ``other`` (it is ``other`` or one of its ancestors)."""
    return path == other or path in other.parents


def check_location(out: Path, reads: Iterable[Path] = ()) -> None:
    """Refuse an output path that no command may write to or replace, whatever its flags."""
    shown = f"--out {out}"
    if out.is_symlink():
        raise OrtloraError(f"{shown} is a symbolic link; name the directory itself")
    if out.exists() and not out.is_dir():
        raise OrtloraError(f"{shown} exists and is not a directory")
    target = out.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == Path(target.anchor):
        raise OrtloraError(f"{shown} is a filesystem root; name a directory of its own")
    if _is_same_or_above(target, cwd):
        raise OrtloraError(f"{shown} is the current directory or one above it; name a directory of its own")
    if _is_same_or_above(target, home):
        raise OrtloraError(f"{shown} is the home directory or one above it; name a directory of its own")
    for source in reads:
        if _is_same_or_above(target, Path(source).resolve()):
            raise OrtloraError(f"{shown} would replace {source}, which this command reads; choose another --out")


def check_output_dir(out: Path, *, flag: str, replace: bool, what: str, reads: Iterable[Path] = (), hint: str = "",
                     proof: Callable[[Path], list[str]] | None = None) -> None:
    """Refuse, in one line, an output directory that ortlora may not write or replace.

    ``replace``: the user passed ``flag`` (--force, --overwrite). ``reads``: what the command reads.
    ``proof``: the entries of the directory that ``what`` cannot prove it wrote (default: ownership.unproven).
    """
    check_location(out, reads)
    if not out.is_dir() or not any(out.iterdir()):
        return
    check_owned(out, what, proof)
    if not replace:
        raise OrtloraError(f"--out {out} already holds {what}'s output; {hint}pass {flag} to replace it, or choose "
                           "another --out")


def check_owned(out: Path, what: str, proof: Callable[[Path], list[str]] | None = None) -> None:
    """Refuse a directory holding anything that the command ``what`` cannot prove it wrote; the message names
    no flag, since none may replace it."""
    strangers = proof(out) if proof else unproven(out, what)
    if strangers:
        raise OrtloraError(f"{out} holds {named(strangers)}, which {what} did not write (or which changed "
                           "since); ortlora never removes them: choose an empty or new directory, or move them out")


def pid_alive(pid: int) -> bool:
    """Whether a process of that id exists (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the entries ``PREFIX<pid>-...`` of ``parent`` whose process ``pid`` is gone.

    The leftovers of a kill: staging directories, temporary models, profiles. Entries of a living
    process, and every entry on Windows (where no safe liveness check is used here), stay.
    """
    if sys.platform == "win32" or not parent.is_dir():
        return []
    pattern = re.compile(re.escape(prefix) + r"(\d+)(?:[-_.]|$)")
    removed = []
    for entry in parent.iterdir():
        match = pattern.match(entry.name)
        if not match or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def fresh_dir(parent: Path, prefix: str) -> Path:
    """A new directory ``parent/PREFIX...`` of a unique name, with the permissions of any directory the
    user makes (tempfile.mkdtemp makes them private, 0700: the finished output would be unreadable to others)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)
    return path


def staging_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A new directory beside ``out`` to assemble it in; removed on the way out unless moved in place.

    Stale staging directories of the same target (their owner killed) are removed first.
    """
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    _restore_moved_aside(out)
    remove_stale(parent, staging_prefix(out))
    remove_stale(parent, old_prefix(out))
    staging = fresh_dir(parent, f"{staging_prefix(out)}{os.getpid()}-")
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(new: Path, final: Path, what: str) -> None:
    """Record the finished directory ``new`` as written by the command ``what`` (unless it is recorded already)
    and move it to ``final``, replacing what is there (only when all of it is proven that command's: checked
    again now, since the check before the work), by renames only.

    The old directory is moved aside under a name that marks it stale (``.NAME.old-<pid>-...``) and
    removed after the new one is in place: a kill at any moment leaves a complete ``final`` (old or
    new), except between the two renames, where the old one survives beside it.
    """
    if not (new / FILES_RECORD).is_file():
        seal(new, what)
    if not final.exists():
        new.rename(final)
        return
    check_owned(final, what)
    aside = Path(tempfile.mkdtemp(prefix=f"{old_prefix(final)}{os.getpid()}-", dir=final.absolute().parent))
    final.rename(aside / final.name)
    new.rename(final)
    shutil.rmtree(aside, ignore_errors=True)


def old_prefix(final: Path) -> str:
    return f".{final.name}.old-"


def _restore_moved_aside(final: Path) -> None:
    """A kill between the two renames of ``replace_dir`` left no ``final``: put the old one back."""
    if final.exists() or sys.platform == "win32":
        return
    pattern = re.compile(re.escape(old_prefix(final)) + r"(\d+)-")
    for entry in final.absolute().parent.glob(old_prefix(final) + "*"):
        match = pattern.match(entry.name)
        if match and not pid_alive(int(match.group(1))) and (entry / final.name).is_dir():
            (entry / final.name).rename(final)
            return


def temp_prefix(name: str) -> str:
    """The prefix of a temporary entry of this process in the system's temporary directory."""
    return f"{name}-{os.getpid()}-"


def remove_stale_temp(name: str) -> list[Path]:
    """Remove ``NAME-<pid>-...`` entries of dead processes from the system's temporary directory."""
    return remove_stale(Path(tempfile.gettempdir()), f"{name}-")
