"""Training settings: defaults < saved run config (on resume) < TOML file < command line.

Every field carries its help text and the range of values it accepts; the command line is generated
from the fields, and unknown keys, wrong types and values out of range (NaN included) are refused in
one line, not ignored. Paths in a TOML file are taken relative to that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from ortlora.errors import OrtloraError
from ortlora.runtime.providers import PROVIDERS

BACKENDS = ("auto", "ort-training", "ort-session")
EPS = tuple(PROVIDERS)
BUILTIN = "builtin:"
REPORT_TO = ("none", "tensorboard")
COMMAND_LINE = "command line"  # the source name of settings typed as options

# Ranges, as (test, what the message says). Every float must also be finite.
POSITIVE = (lambda v: v > 0, "positive")
NON_NEGATIVE = (lambda v: v >= 0, "0 or more")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")


def _f(default, help: str, choices=None, valid=None, path=False):
    return field(default=default, metadata={"help": help, "choices": choices, "valid": valid, "path": path})


@dataclass
class TrainConfig:
    artifacts: str = _f("artifacts/tiny", "artifact directory made by ortlora-build", path=True)
    data: str = _f("builtin:chat", "training data (JSON Lines), or builtin:chat|completions|text for the shipped sets",
                   path=True)
    eval_data: str | None = _f(None, "evaluation data; builtin data comes with its own validation split", path=True)
    eval_split: float = _f(0.0, "hold out this fraction of the training data for evaluation when no --eval-data",
                           valid=FRACTION)
    out: str | None = _f(None, "run directory: checkpoints, log, config, summary, loss curve (default: runs/NAME-TIME)",
                         path=True)
    overwrite: bool = _f(False, "start --out over when it holds an earlier run: its checkpoints and files are removed")
    backend: str = _f("auto", "ort-training: ORT's training API (onnxruntime-training, cpu/cuda); ort-session: the "
                      "portable training graph on any onnxruntime and provider; auto: the first that fits", choices=BACKENDS)
    ep: str = _f("cpu", "execution provider (the CPU provider runs what an accelerator does not take)", choices=EPS)
    allow_fallback: bool = _f(False, "when --ep's provider cannot run the training graph, train on the CPU provider "
                              "instead of stopping")
    threads: int | None = _f(None, "intra-op threads (default: ONNX Runtime's choice, all cores)", valid=POSITIVE)
    epochs: int = _f(1, "passes over the training data (ignored when --max-steps is set)", valid=POSITIVE)
    max_steps: int | None = _f(None, "optimizer steps to train; overrides --epochs", valid=POSITIVE)
    batch_size: int = _f(8, "examples per micro-batch", valid=POSITIVE)
    grad_accum: int = _f(1, "micro-batches per optimizer step (gradient accumulation)", valid=POSITIVE)
    workers: int = _f(1, "data-parallel workers on Ray (pip install \"ortlora[ray]\"): each step's micro-batches, "
                      "--grad-accum on each worker, are spread over them; the same step as --grad-accum x workers "
                      "in one process", valid=POSITIVE)
    ray_address: str | None = _f(None, "with --workers: join this Ray cluster (auto, or ray://HEAD:10001) instead of "
                                 "starting one on this machine")
    max_seq_len: int = _f(512, "longer examples are truncated (and counted); at most the model's context length",
                          valid=POSITIVE)
    pack: bool = _f(False, "pack short examples into sequences of up to --max-seq-len tokens")
    shuffle: bool = _f(True, "shuffle the training data each epoch")
    seed: int = _f(0, "seed for data order and the evaluation split", valid=NON_NEGATIVE)
    lr: float = _f(2e-4, "peak learning rate", valid=POSITIVE)
    schedule: str = _f("cosine", "learning-rate schedule", choices=("constant", "linear", "cosine", "warmup-cosine"))
    warmup_steps: int = _f(0, "linear warmup steps (warmup-cosine defaults to 10%% of the steps)", valid=NON_NEGATIVE)
    min_lr: float = _f(0.0, "final learning rate of the linear and cosine schedules", valid=NON_NEGATIVE)
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay", valid=NON_NEGATIVE)
    beta1: float = _f(0.9, "AdamW beta1", valid=FRACTION)
    beta2: float = _f(0.999, "AdamW beta2", valid=FRACTION)
    adam_eps: float = _f(1e-8, "AdamW epsilon", valid=POSITIVE)
    max_grad_norm: float | None = _f(1.0, "clip gradients to this global norm (0: no clipping)", valid=NON_NEGATIVE)
    eval_every: int = _f(0, "evaluate every N optimizer steps (0: at the end only)", valid=NON_NEGATIVE)
    eval_batches: int | None = _f(None, "evaluate on at most this many batches", valid=POSITIVE)
    save_every: int = _f(0, "save a checkpoint every N optimizer steps (one is always saved at the end)",
                         valid=NON_NEGATIVE)
    log_every: int = _f(1, "write a log line every N optimizer steps", valid=POSITIVE)
    keep_last: int = _f(0, "keep only the N newest checkpoints, removing older ones once a newer one is written; the "
                        "best by eval loss is kept too (0: keep all)", valid=NON_NEGATIVE)
    early_stop_patience: int = _f(0, "stop after N evaluations in a row without an eval loss below the best so far "
                                  "(strictly lower, no threshold; needs --eval-every; 0: off)", valid=NON_NEGATIVE)
    report_to: str = _f("none", "tensorboard: also write the logged numbers as TensorBoard event files into "
                        "RUN/tensorboard (needs tensorboardX: pip install \"ortlora[tensorboard]\")",
                        choices=REPORT_TO)
    on_bad_data: str = _f("stop", "a malformed data line: stop, or skip it and count it", choices=("stop", "skip"))
    on_nan: str = _f("stop", "a NaN/inf loss: stop (keeping the last checkpoint), or skip the step", choices=("stop", "skip"))
    resume: str | None = _f(None, "continue a run: a run directory (its latest checkpoint) or a checkpoint directory",
                            path=True)
    init_adapter: str | None = _f(None, "start from an existing PEFT adapter directory", path=True)
    plot: bool = _f(True, "write a loss-curve PNG into the run directory")
    progress: bool = _f(True, "show a progress bar")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> "TrainConfig":
        """The same settings with every path absolute: a saved config then works from any directory."""
        return dataclasses.replace(self, **{name: _absolute(getattr(self, name)) for name in PATH_FIELDS})


def _absolute(value: str | None) -> str | None:
    if value is None or value.startswith(BUILTIN):
        return value
    return os.path.abspath(value)


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_HINTS = get_type_hints(TrainConfig)
PATH_FIELDS = tuple(name for name, f in _FIELDS.items() if f.metadata["path"])


def _types(name: str) -> tuple[tuple[type, ...], bool]:
    """The accepted types of a field, and whether it may be None."""
    args = get_args(_HINTS[name]) or (_HINTS[name],)
    return tuple(t for t in args if t is not type(None)), type(None) in args


def _check(key: str, value: Any, source: str) -> Any:
    if key not in _FIELDS:
        raise OrtloraError(f"{source}: unknown setting {key!r}")
    name = "--" + key.replace("_", "-") if source == COMMAND_LINE else f"{source}: {key}"
    expected, nullable = _types(key)
    if value is None and nullable:
        return None
    if float in expected and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
        names = " or ".join(t.__name__ for t in expected)
        raise OrtloraError(f"{name} must be {names}, got {value!r}")
    choices = _FIELDS[key].metadata.get("choices")
    if choices and value not in choices:
        raise OrtloraError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    valid = _FIELDS[key].metadata.get("valid")
    finite = not isinstance(value, float) or math.isfinite(value)
    if not finite or valid and not valid[0](value):
        rule = " and ".join(([valid[1]] if valid else []) + ([] if finite and valid else ["finite"]))
        raise OrtloraError(f"{name} must be {rule}, got {value!r}")
    return value


def check_together(c: TrainConfig) -> None:
    """Rules that tie settings to each other (each alone passed ``_check``)."""
    if c.min_lr > c.lr:
        raise OrtloraError(f"--min-lr ({c.min_lr}) must not exceed --lr ({c.lr})")
    if c.early_stop_patience and not c.eval_every:
        raise OrtloraError(f"--early-stop-patience {c.early_stop_patience} counts evaluations during training: "
                           "pass --eval-every N too")


def from_mapping(values: dict, source: str, base: TrainConfig | None = None) -> TrainConfig:
    config = dataclasses.replace(base) if base else TrainConfig()
    for key, value in values.items():
        setattr(config, key.replace("-", "_"), _check(key.replace("-", "_"), value, source))
    return config


def load_toml(path: Path, base: TrainConfig | None = None) -> TrainConfig:
    """Settings from a TOML file; its relative paths are relative to the file, not to the working directory."""
    if not path.is_file():
        raise OrtloraError(f"config file {path} does not exist")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise OrtloraError(f"{path} is not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise OrtloraError(f"{path} is not valid TOML: {e}") from None
    for key in PATH_FIELDS:
        value = values.get(key)
        if isinstance(value, str) and not value.startswith(BUILTIN) and not Path(value).is_absolute():
            values[key] = os.path.relpath(path.parent / value)
    return from_mapping(values, str(path), base)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field; defaults are None so that only what the user typed overrides."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _types(f.name)[0][0]
        help_text = f.metadata["help"]
        if f.default is not None and "default" not in help_text:
            help_text += f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"), help=help_text)


def given(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in _FIELDS and v is not None}
