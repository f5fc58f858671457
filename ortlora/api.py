"""The Python API: what the console commands do, called with keyword arguments.

    import ortlora

    artifacts = ortlora.build(model="builtin:tiny", out="artifacts/tiny", rank=8, force=True)
    run = ortlora.train(artifacts=artifacts, data="builtin:chat", out="runs/api", max_steps=10, lr=1e-2,
                        overwrite=True, progress=False)
    print(run.adapter, run.summary["train_loss"])
    ortlora.export(artifacts=artifacts, adapter=run.adapter, to="peft", out="exports/api-peft", force=True)
    generator = ortlora.Generator(artifacts, adapter=run.adapter)
    text = generator.generate(generator.prompt("Hello"), ortlora.Sampling(max_new_tokens=8)).text

Each keyword is the command's option of that name, "-" written "_" (``max_steps=10`` is ``--max-steps 10``; a flag
takes True or False, ``plot=False`` is ``--no-plot``; None leaves an option at its default). The keywords are turned
into the command's arguments and parsed by the command's own parser, and the command's own function runs them:
``ortlora-build``, ``ortlora-train`` and ``ortlora-export`` are these functions behind a parser. So every check is
the command's, and every mistake the same one-line ``OrtloraError`` (an unknown keyword names the valid ones); the
functions print what the commands print. ``ortlora.train(model=...)`` builds or reuses cached artifacts, as
``ortlora-train --model`` does (build_cache.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ortlora.errors import OrtloraError, debugging, no_space, one_line, out_of_memory
from ortlora.files import read_json

NOT_OPTIONS = ("help", "debug")  # the parsers' own actions, no keyword of the API


@dataclass(frozen=True)
class Run:
    """A finished training run, as its directory holds it."""

    out: Path  # the run directory
    artifacts: Path  # the artifacts it trained on (with model=: the cached build)
    checkpoints: list[Path]  # checkpoint-N directories, by step
    adapter: Path  # the final checkpoint: a PEFT adapter directory
    best: Path | None  # the checkpoint of lowest eval loss (None: no evaluation ran)
    summary: dict  # summary.json: steps, losses, tokens, times

    @classmethod
    def read(cls, out: Path, artifacts: Path) -> "Run":
        summary = read_json(out / "summary.json")
        steps = sorted((int(p.name.removeprefix("checkpoint-")), p) for p in out.glob("checkpoint-*")
                       if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit())
        return cls(out=out, artifacts=artifacts, checkpoints=[p for _, p in steps], adapter=Path(summary["checkpoint"]),
                   best=Path(summary["best_checkpoint"]) if summary.get("best_checkpoint") else None, summary=summary)


def _one_line_errors(function):
    """Errors as the commands report them: an OrtloraError of one line (also for a full disk and for memory that
    ran out); anything else is a bug and keeps its traceback. ORTLORA_DEBUG=1 keeps the cause of each."""

    @functools.wraps(function)
    def wrapper(*args, **options):
        if args:
            raise OrtloraError(f"ortlora.{function.__name__}() takes keyword arguments only, as "
                               f"ortlora.{function.__name__}(out=...), got {len(args)} positional")
        try:
            return function(**options)
        except OrtloraError as e:
            raise OrtloraError(one_line(e)) from (e if debugging([]) else None)
        except Exception as e:
            message = no_space(e) or out_of_memory(e)
            if message is None:
                raise
            raise OrtloraError(one_line(message)) from e

    return wrapper


def arguments(parser: argparse.ArgumentParser, options: dict, caller: str) -> argparse.Namespace:
    """``options`` (keyword -> value) parsed as the command line ``parser`` reads; a mistake is one OrtloraError
    that starts with ``caller`` (who passed them: "ortlora.train()")."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_OPTIONS}
    unknown = sorted(set(options) - set(actions))
    if unknown:
        raise OrtloraError(f"{caller} got unknown keyword{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                           f"it takes {', '.join(sorted(actions))}")
    argv = []
    for name, value in options.items():
        action, flag = actions[name], actions[name].option_strings[0]
        if value is None:
            continue  # the option's default
        if action.nargs == 0:  # a flag: store_true, or --x / --no-x
            if not isinstance(value, bool):
                raise OrtloraError(f"{caller}: {name} must be True or False, got {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else action.option_strings[1])
            elif value:
                argv.append(flag)
            continue
        if isinstance(value, dict):  # rank_pattern={"v_proj": 16}: the JSON object the option takes
            value = json.dumps(value)
        elif isinstance(value, (list, tuple)):  # targets=["q_proj", "v_proj"]
            value = ",".join(map(str, value))
        argv.append(f"{flag}={os.fspath(value) if isinstance(value, os.PathLike) else value}")

    def refuse(message: str):
        raise OrtloraError(f"{caller}: {message.replace('argument ', '', 1)}")

    parser.error = refuse  # argparse's usage-and-exit, for the command line only
    return parser.parse_args(argv)


@_one_line_errors
def build(**options) -> Path:
    """Build artifacts as ``ortlora-build`` does; returns the artifact directory (``out``, default artifacts/tiny).

    ``model`` is a local Hugging Face directory, a Hub id (owner/name, with ``revision``) or "builtin:tiny";
    ``rank``, ``alpha``, ``targets`` ("q_proj,v_proj", or a list), ``rank_pattern`` (a dict) and the rest are
    ortlora-build's options. Needs the build extra: pip install 'ortlora[build]'.
    """
    import time

    from ortlora.build import cli

    args = arguments(cli.make_parser(), options, "ortlora.build()")
    start = time.perf_counter()
    manifest = cli.run(args)
    print(cli.built(args.out, manifest, time.perf_counter() - start), flush=True)
    return Path(args.out)


@_one_line_errors
def train(**options) -> Run:
    """Train as ``ortlora-train`` does; returns the finished ``Run``.

    ``artifacts`` (a directory) or ``model`` (built on first use, cached, as ``ortlora-train --model``), ``data``,
    ``out``, ``max_steps``, ``lr``, ``config`` (a TOML file) and the rest are ortlora-train's options. A Ctrl-C
    saves a checkpoint at the next step boundary and raises KeyboardInterrupt; ``resume=out`` continues.
    """
    from ortlora.runtime import cli

    code, out, artifacts = cli.run(arguments(cli.make_parser(), options, "ortlora.train()"))
    if code:
        raise KeyboardInterrupt(f"training stopped; continue with ortlora.train(resume={str(out)!r})")
    return Run.read(out, artifacts)


@_one_line_errors
def export(**options) -> Path:
    """Export an adapter as ``ortlora-export`` does; returns the output directory.

    ``artifacts``, ``adapter`` (a checkpoint or run directory), ``to`` ("peft", "merged", "onnx", "onnx-adapter",
    "genai", "gguf", "gguf-merged" or "mlx"), ``out`` and the rest are ortlora-export's options.
    """
    from ortlora.handoff import cli

    return Path(cli.run(arguments(cli.make_parser(), options, "ortlora.export()")))
