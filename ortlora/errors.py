"""User-facing errors: one line, no traceback, non-zero exit."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Callable

REBUILD = "rebuild the artifacts"  # what to do about a damaged or incomplete artifact directory


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
    """Wrap a CLI main so that every error ends the process with a one-line message: 2 for an OrtloraError,
    130 for Ctrl-C, 1 for anything unexpected (a bug or a case nobody checked), whose traceback --debug shows."""

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
            if debugging(argv):
                traceback.print_exc()
            else:
                print(f"error: unexpected {type(e).__name__}: {one_line(e)} "
                      "(run again with --debug or ORTLORA_DEBUG=1 for the traceback)", file=sys.stderr)
            return 1

    return wrapper


def add_debug_argument(parser) -> None:
    """The --debug option of every command: ``cli_entry`` shows an unexpected error's traceback with it."""
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
