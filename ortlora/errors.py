"""User-facing errors: one line, no traceback, non-zero exit."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class OrtloraError(Exception):
    """An error caused by the user's input or environment, reported as one line."""


def cli_entry(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI main so that OrtloraError and Ctrl-C end the process with a one-line message."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main(argv) or 0
        except OrtloraError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper
