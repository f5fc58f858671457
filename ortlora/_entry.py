"""The console commands of pyproject.toml's [project.scripts]: Ctrl-C ends each in one line, whenever it comes.

A command's module takes a second or more to import (onnxruntime, torch), and Ctrl-C in that time would end in
a KeyboardInterrupt traceback from the middle of some import; after the command has finished, a Ctrl-C while
the interpreter joins threads would print "Exception ignored in threading._shutdown". So here, Ctrl-C

- before the command's main runs (nothing has been written yet) prints "interrupted" and exits 130 at once;
- while main runs raises KeyboardInterrupt as usual, which ``cli_entry`` reports as "interrupted", exit 130
  (ortlora-train first saves a checkpoint at the next step boundary, its own handler); another Ctrl-C after
  that exits at once, as does one after main has returned, while the interpreter shuts down.

Only ``atexit`` and ``signal`` (both built in) are imported before the handler is in place, so the one window
left is the interpreter's own start-up, before any code of the package runs (~30 ms here, most of it the site
module's hook for an editable install), where Python prints its own KeyboardInterrupt traceback.
"""

import atexit
import signal

_EXIT = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C


def _exit_now(signum=None, frame=None):
    """Print "interrupted" (unless cli_entry already did), flush what was written, and end the process now.
    It imports nothing: the Ctrl-C may have come in the middle of an import."""
    import os  # both loaded by the interpreter before any script runs
    import sys

    errors = sys.modules.get("ortlora.errors")
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is sys.stderr and not getattr(errors, "_interrupted_said", False):
                stream.write("interrupted\n")
            stream.flush()
        except Exception:  # a closed or broken pipe: nothing more can be said there
            pass
    os._exit(_EXIT)


signal.signal(signal.SIGINT, _exit_now)


def _ignore_from_now() -> None:
    """The last exit handler: Ctrl-C is ignored for the rest of the interpreter's shutdown (module teardown,
    milliseconds), where Python has put back the default action and the process would die of the signal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


atexit.register(_ignore_from_now)  # registered first, so it runs after every other (Ray's shutdown among them)


def _interrupt(signum, frame):
    """Ctrl-C while main runs: KeyboardInterrupt, and any further Ctrl-C ends the process at once."""
    signal.signal(signal.SIGINT, _exit_now)
    raise KeyboardInterrupt


def _run(module: str) -> int:
    import importlib

    signal.signal(signal.SIGINT, _exit_now)
    main = importlib.import_module(module).main
    signal.signal(signal.SIGINT, _interrupt)
    try:
        return main()
    except KeyboardInterrupt:  # one that came while cli_entry was reporting something else
        _exit_now()
    finally:
        signal.signal(signal.SIGINT, _exit_now)


def build() -> int:
    return _run("ortlora.build.cli")


def train() -> int:
    return _run("ortlora.runtime.cli")


def export() -> int:
    return _run("ortlora.handoff.cli")


def generate() -> int:
    return _run("ortlora.runtime.generate_cli")
