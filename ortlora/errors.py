"""User-facing errors: one line, no traceback, non-zero exit."""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from pathlib import Path
from typing import Callable

REBUILD = "rebuild the artifacts"  # what to do about a damaged or incomplete artifact directory
# A write that finds the disk full: the OSError's errno, or the words of a library that reports it as text
# (ONNX Runtime's C++ exceptions, safetensors' Rust errors).
NO_SPACE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded"}
NO_SPACE_WORDS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT}
PACKAGE = Path(__file__).resolve().parent
# Memory that ran out: a MemoryError (numpy, and C++'s std::bad_alloc through pybind11), or the words of ONNX
# Runtime's and torch's allocators.
OUT_OF_MEMORY_WORDS = ("bad_alloc", "Failed to allocate memory", "can't allocate memory", "out of memory")


class OrtloraError(Exception):
    """An error caused by the user's input or environment, reported as one line."""


def one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces made single spaces: a message is one line."""
    return " ".join(str(text).split())


def listing(problems: list[str], shown: int = 5) -> str:
    """The first few of a list of problems, for one line that names them all by count."""
    more = len(problems) - shown
    return "; ".join(problems[:shown]) + (f"; and {more} more" if more > 0 else "")


def debugging(argv: list[str] | None) -> bool:
    """Whether --debug was given (or ORTLORA_DEBUG=1 is set): then an unexpected error shows its traceback."""
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("ORTLORA_DEBUG") == "1"


_interrupted_said = False


def say_interrupted() -> None:
    """Print "interrupted" for Ctrl-C, and remember it: a second Ctrl-C that ends the process at once
    (ortlora._entry) does not print it again."""
    global _interrupted_said
    _interrupted_said = True
    print("interrupted", file=sys.stderr, flush=True)


def cli_entry(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI main so that every error ends the process with a one-line message: 2 for an OrtloraError and
    for a full disk or memory, 130 for Ctrl-C, 1 for anything unexpected (a bug or a case nobody checked), whose traceback
    --debug shows."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except OrtloraError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            say_interrupted()
            return 130
        except Exception as e:
            if (message := no_space(e) or out_of_memory(e)) and not debugging(argv):
                print(f"error: {one_line(message)}", file=sys.stderr)
                return 2
            if debugging(argv):
                traceback.print_exc()
            else:
                print(f"error: unexpected {type(e).__name__}: {one_line(e)} "
                      "(run again with --debug or ORTLORA_DEBUG=1 for the traceback)", file=sys.stderr)
            return 1

    return wrapper


def no_space(error: BaseException) -> str | None:
    """The one line for an error that is a full disk or quota (in ``error`` or the errors that caused it), naming the
    file being written where it is known; None for any other error."""
    seen, cause = set(), error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        code = cause.errno if isinstance(cause, OSError) else None
        code = code if code in NO_SPACE else next((c for w, c in NO_SPACE_WORDS.items() if w in str(cause)), None)
        if code is not None:
            target = getattr(cause, "filename", None) or _written_path(error.__traceback__)
            where = f" while writing {target}" if target else ""
            return (f"{NO_SPACE[code]}{where}: free some space there (or write elsewhere, e.g. another --out) and run "
                    "again; what was being written is not used (ortlora-train --resume continues from the last "
                    "checkpoint)")
        cause = cause.__cause__ or cause.__context__
    return None


def out_of_memory(error: BaseException) -> str | None:
    """The one line for an error that is memory running out; None for any other error."""
    if isinstance(error, MemoryError) or any(w in str(error) for w in OUT_OF_MEMORY_WORDS):
        detail = f" ({one_line(error)[:200]})" if str(error) else ""
        return (f"out of memory{detail}: pass smaller settings (a smaller --batch-size or --max-seq-len, fewer --workers "
                "or --threads) or use a machine with more memory (--debug shows where it ran out)")
    return None


def _written_path(tb) -> str | None:
    """The first path among the arguments of the innermost ortlora function on the traceback: the file or folder it
    was writing (write_json(path, ...), write_safetensors(path, ...), a checkpoint's save(directory))."""
    for frame, _ in reversed(list(traceback.walk_tb(tb))):
        if not Path(frame.f_code.co_filename).resolve().is_relative_to(PACKAGE):
            continue
        code = frame.f_code
        for name in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]:
            if isinstance(frame.f_locals.get(name), os.PathLike):
                return os.fspath(frame.f_locals[name])
        return None
    return None


def add_debug_argument(parser) -> None:
    """The --debug option of every command: ``cli_entry`` shows an unexpected error's traceback with it."""
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
