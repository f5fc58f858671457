"""Training settings: defaults < saved run config (on resume) < TOML file < command line.

Every field carries its help text and the range of values it accepts; the command line is generated
from the fields, and unknown keys, wrong types and values out of range (NaN included) are refused in
one line, not ignored. Paths in a TOML file are taken relative to that file.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from ortlora.errors import OrtloraError
from ortlora.runtime.data_formats import COLUMNS, is_hub_id, layout_file, parse_columns
from ortlora.runtime.precision import PRECISIONS
from ortlora.runtime.providers import OPTION_KEY, parse_ep

BACKENDS = ("auto", "ort-training", "ort-session")
BUILTIN = "builtin:"
REPORT_TO = ("none", "tensorboard")
COMMAND_LINE = "command line"  # the source name of settings typed as options

# Ranges, as (test, what the message says). Every float must also be finite.
POSITIVE = (lambda v: v > 0, "positive")
NON_NEGATIVE = (lambda v: v >= 0, "0 or more")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
# numpy's and torch's generators take seeds of 64 bits, numpy's legacy one and most tools 32: every command
# takes 32, so that a seed means the same everywhere.
SEED_MAX = 2**32 - 1
SEED = (lambda v: 0 <= v <= SEED_MAX, f"from 0 to {SEED_MAX}")
# A step's micro-batches are all read before it is computed (Trainer.train): 1,000,000 of them ran out of
# memory after a minute. A larger step is a larger --batch-size, or more --workers.
MAX_GRAD_ACCUM = 1024
GRAD_ACCUM = (lambda v: 1 <= v <= MAX_GRAD_ACCUM,
              f"from 1 to {MAX_GRAD_ACCUM} (a step's micro-batches are held in memory together; for a larger step "
              "raise --batch-size)")
THREADS_PER_CPU = 4  # more threads than this per core only slows ONNX Runtime and torch (4096 took 35 s to start)


def _f(default, help: str, choices=None, valid=None, path=False):
    return field(default=default, metadata={"help": help, "choices": choices, "valid": valid, "path": path})


@dataclass
class TrainConfig:
    artifacts: str = _f("artifacts/tiny", "artifact directory made by ortlora-build", path=True)
    model: str | None = _f(None, "instead of --artifacts: a model (a Hugging Face directory, a Hub id owner/name with "
                           "--revision, or builtin:tiny) whose artifacts are built on first use with the build options "
                           "below (ortlora-build's, which needs pip install 'ortlora[build]'), kept in a cache "
                           "($ORTLORA_CACHE, default ~/.cache/ortlora) and reused from then on", path=True)
    data: str = _f("builtin:chat", "training data: a .jsonl, .json (a list of rows), .csv or .parquet file, a directory "
                   "with train and valid files (mlx-lm's layout: valid is the evaluation data), a Hugging Face Hub "
                   "dataset id (owner/name; pip install 'ortlora[hub-data]'), or builtin:chat|completions|text for "
                   "the shipped sets", path=True)
    data_split: str | None = _f(None, "the split of a Hub dataset --data reads (default: train)")
    eval_data: str | None = _f(None, "evaluation data, in any form --data takes (a directory: its valid file); builtin "
                               "data comes with its own validation split", path=True)
    eval_data_split: str | None = _f(None, "the split of a Hub dataset --eval-data reads (default: validation)")
    columns: str | None = _f(None, "the data's column names for TRL's (" + ", ".join(COLUMNS) + "), NAME=COLUMN "
                             "pairs: text=body, or prompt=question,completion=answer")
    eval_split: float = _f(0.0, "hold out this fraction of the training data for evaluation when no --eval-data",
                           valid=FRACTION)
    out: str | None = _f(None, "run directory: checkpoints, log, config, summary, loss curve (default: runs/NAME-TIME)",
                         path=True)
    overwrite: bool = _f(False, "start --out over when it holds an earlier run: its checkpoints and files are removed")
    backend: str = _f("auto", "ort-training: ORT's training API (onnxruntime-training, cpu/cuda); ort-session: the "
                      "portable training graph on any onnxruntime and provider; auto: the first that fits", choices=BACKENDS)
    ep: str = _f("cpu", "execution provider: cpu, cuda, coreml, dml, openvino, ... or an installed plugin's (onnxruntime-ep-"
                 "NAME, onnxruntime-ggml: ggml), NAME:gpu|npu|cpu for one of its devices; the CPU provider runs what "
                 "it does not take")
    ep_options: dict | None = _f(None, "options for --ep's provider, over ortlora's own (--ep-option KEY=VALUE, "
                                 "repeatable; in a TOML file a table ep_options = {KEY = \"VALUE\"})")
    allow_fallback: bool = _f(False, "when --ep's provider cannot run the training graph, train on the CPU provider "
                              "instead of stopping")
    precision: str = _f("fp32", "bf16: the frozen model's matrix products in bf16 with fp32 accumulation where --ep "
                        "and the CPU have them (OpenVINO on a CPU with AVX512_BF16 or AMX; the CPU provider on Arm64 "
                        "with BF16), fp32 where PyTorch's autocast keeps fp32 (norms, softmax, the residual stream); bf16-all: "
                        "OpenVINO rounds every node it chooses (faster, less accurate); elsewhere the run says why and trains in fp32. "
                        "LoRA weights, AdamW and the loss stay fp32", choices=PRECISIONS)
    threads: int | None = _f(None, "intra-op threads (default: ONNX Runtime's choice, all cores)", valid=POSITIVE)
    epochs: int = _f(1, "passes over the training data (ignored when --max-steps is set)", valid=POSITIVE)
    max_steps: int | None = _f(None, "optimizer steps to train; overrides --epochs", valid=POSITIVE)
    batch_size: int = _f(8, "examples per micro-batch", valid=POSITIVE)
    grad_accum: int = _f(1, "micro-batches per optimizer step (gradient accumulation)", valid=GRAD_ACCUM)
    workers: int = _f(1, "data-parallel workers on Ray (pip install \"ortlora[ray]\"): each step's micro-batches, "
                      "--grad-accum on each worker, are spread over them; the same step as --grad-accum x workers "
                      "in one process", valid=POSITIVE)
    ray_address: str | None = _f(None, "with --workers: join this Ray cluster (auto, or ray://HEAD:10001) instead of "
                                 "starting one on this machine")
    max_seq_len: int = _f(512, "longer examples are truncated (and counted); at most the model's context length",
                          valid=POSITIVE)
    pack: bool = _f(False, "pack short examples into sequences of up to --max-seq-len tokens")
    shuffle: bool = _f(True, "shuffle the training data each epoch")
    seed: int = _f(0, "seed for data order and the evaluation split", valid=SEED)
    lr: float = _f(2e-4, "peak learning rate", valid=POSITIVE)
    schedule: str = _f("cosine", "learning-rate schedule", choices=("constant", "linear", "cosine", "warmup-cosine"))
    warmup_steps: int = _f(0, "linear warmup steps (warmup-cosine defaults to 10%% of the steps)", valid=NON_NEGATIVE)
    min_lr: float = _f(0.0, "final learning rate of the linear and cosine schedules (not constant)",
                       valid=NON_NEGATIVE)
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
    # With --model: ortlora-build's options that shape the artifacts (rank, alpha, targets, ...), by name, as given
    # (on the command line as ortlora-build's own options, in a TOML file as top-level keys).
    build: dict | None = _f(None, "ortlora-build's options for --model")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_absolute_paths(self) -> "TrainConfig":
        """The same settings with every path absolute: a saved config then works from any directory."""
        return dataclasses.replace(self, **{name: _absolute(getattr(self, name)) for name in PATH_FIELDS})


def _absolute(value: str | None) -> str | None:
    if value is None or value.startswith(BUILTIN) or is_hub_id(value):
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
    """Rules that tie settings to each other (each alone passed ``_check``): a setting that another one would
    make the run ignore is refused, never dropped."""
    if c.build and not c.model:
        name, value = next(iter(c.build.items()))
        flag = "--" + name.replace("_", "-")
        shown = flag if value is True else f"{flag} {value}"
        raise OrtloraError(f"{shown} is a build option, and --artifacts {c.artifacts} is built already: pass --model "
                           f"ID_OR_DIR instead (its artifacts are built with {flag} and cached), or leave {flag} out")
    if c.min_lr > c.lr:
        raise OrtloraError(f"--min-lr ({c.min_lr}) must not exceed --lr ({c.lr})")
    if c.min_lr and c.schedule == "constant":
        raise OrtloraError(f"--min-lr {c.min_lr} is where a decaying schedule ends, and --schedule constant never "
                           "decays: pass --schedule linear or cosine, or --min-lr 0")
    if c.max_steps and c.warmup_steps > c.max_steps:
        raise OrtloraError(f"--warmup-steps {c.warmup_steps} is longer than the run (--max-steps {c.max_steps}), so the "
                           f"learning rate would never reach --lr: pass at most {c.max_steps}")
    if c.early_stop_patience and not c.eval_every:
        raise OrtloraError(f"--early-stop-patience {c.early_stop_patience} counts evaluations during training: "
                           "pass --eval-every N too")
    if c.resume and c.init_adapter:
        raise OrtloraError(f"--resume {c.resume} continues a run from its checkpoint's weights and optimizer state, "
                           f"so --init-adapter {c.init_adapter} would be ignored: pass one of them")
    if c.eval_data and c.eval_split:
        raise OrtloraError(f"--eval-split {c.eval_split} holds out training data for evaluation when there is no "
                           f"--eval-data, and --eval-data {c.eval_data} is given: pass one of them (--eval-split 0 "
                           "turns it off)")
    check_data(c)
    has_eval = c.eval_data or c.eval_split or c.data.startswith(BUILTIN) or \
        os.path.isdir(c.data) and layout_file(Path(c.data), "valid")
    for name in ("eval_every", "eval_batches"):
        if getattr(c, name) and not has_eval:
            raise OrtloraError(f"--{name.replace('_', '-')} {getattr(c, name)} needs evaluation data, and {c.data} "
                               "has none: pass --eval-data FILE or --eval-split FRACTION")
    parse_ep(c.ep)
    if c.ep_options:
        shown = " ".join(f"--ep-option {k}={v}" for k, v in c.ep_options.items())
        if c.ep == "cpu":
            raise OrtloraError(f"{shown} passes options to --ep's provider, and --ep is cpu (its settings are ortlora's "
                               "own, such as --threads): leave it out, or name the provider with --ep")
        if c.backend == "ort-training" or c.backend == "auto" and c.ep == "cuda":
            raise OrtloraError(f"{shown} passes options to the portable training graph's provider, and --backend "
                               f"{c.backend} with --ep {c.ep} uses ORT's training API: pass --backend ort-session")
    if c.allow_fallback:
        if c.ep == "cpu":
            raise OrtloraError("--allow-fallback lets the CPU provider take over from another --ep, and --ep is cpu: "
                               "leave it out (--no-allow-fallback)")
        if c.backend == "ort-training" or c.backend == "auto" and c.ep == "cuda":
            raise OrtloraError(f"--allow-fallback works with the portable training graph, and --backend {c.backend} "
                               f"with --ep {c.ep} uses ORT's training API, which has no fallback: pass --backend "
                               "ort-session, or --no-allow-fallback")
    check_threads(c.threads)
    check_paths({"--" + name.replace("_", "-"): getattr(c, name) for name in PATH_FIELDS})
    if not c.ray_address:
        check_workers(c.workers, os.cpu_count() or 1, "this machine")


def check_ep_options(options: dict, where: str) -> dict[str, str] | None:
    """Provider options as ONNX Runtime takes them (strings by name); numbers are written as strings."""
    for key, value in options.items():
        if not isinstance(key, str) or not OPTION_KEY.fullmatch(key):
            raise OrtloraError(f"{where}: {key!r} is not an option name (letters, digits and _.:-)")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise OrtloraError(f"{where}: {key} must be a string or a number, got {value!r}")
    return {key: str(value) for key, value in options.items()} or None


def check_data(c: TrainConfig) -> None:
    """--columns spells a mapping, and a split is given only for a Hub dataset."""
    parse_columns(c.columns)
    for flag, spec, split in (("--data", c.data, c.data_split), ("--eval-data", c.eval_data, c.eval_data_split)):
        if split is not None and not is_hub_id(spec):
            raise OrtloraError(f"{flag}-split {split} picks a split of a Hub dataset, and {flag} "
                               f"{spec if spec else 'is not given'}{'' if not spec else ' is not one (owner/name)'}: "
                               f"leave {flag}-split out")


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    """At most THREADS_PER_CPU threads per core of this machine (None: the library's own choice)."""
    if threads is None:
        return
    if threads <= 0:
        raise OrtloraError(f"{flag} must be positive, got {threads}")
    cpus = os.cpu_count() or 1
    if threads > THREADS_PER_CPU * cpus:
        raise OrtloraError(f"{flag} {threads} is more than {THREADS_PER_CPU} threads for each of this machine's {cpus} "
                           f"CPUs; pass at most {THREADS_PER_CPU * cpus}, or leave {flag} out for one per core")


def check_seed(seed: int | None, flag: str = "--seed") -> None:
    if seed is not None and not SEED[0](seed):
        raise OrtloraError(f"{flag} must be {SEED[1]}, got {seed}")


def check_workers(workers: int, cpus: float, cluster: str) -> None:
    """Each Ray worker takes one CPU: more workers than the cluster has CPUs would wait for CPUs forever."""
    if workers > cpus:
        raise OrtloraError(f"--workers {workers} needs {workers} CPUs (one per worker), and {cluster} has {cpus:g}; "
                           f"pass --workers {max(1, int(cpus))} or fewer, or --ray-address of a cluster with more")


def check_source(values: dict, source: str) -> None:
    """--artifacts and --model both name the artifacts; one source gives one of them."""
    if values.get("model") and "artifacts" in values:
        where = "--artifacts and --model" if source == COMMAND_LINE else f"{source}: artifacts and model"
        raise OrtloraError(f"{where} both name the artifacts to train ({values['artifacts']}; {values['model']}, built "
                           "and cached on first use): pass one of them")


def check_length(values: dict, source: str) -> None:
    """epochs and max_steps both set the run's length; one source that sets both would see epochs ignored."""
    if {"epochs", "max_steps"} <= values.keys():
        where = "--epochs and --max-steps" if source == COMMAND_LINE else f"{source}: epochs and max_steps"
        raise OrtloraError(f"{where} both set the length of the run (epochs {values['epochs']}, max_steps "
                           f"{values['max_steps']}): pass one of them")


def from_mapping(values: dict, source: str, base: TrainConfig | None = None) -> TrainConfig:
    config = dataclasses.replace(base) if base else TrainConfig()
    for key, value in values.items():
        name = key.replace("-", "_")
        value = _check(name, value, source)
        if name == "build" and value is not None:  # the build options of each source add to those below it
            value = {**(config.build or {}), **value}
        if name == "ep_options" and value is not None:
            value = check_ep_options(value, "--ep-option" if source == COMMAND_LINE else f"{source}: ep_options")
        setattr(config, name, value)
    return config


def load_toml(path: Path, base: TrainConfig | None = None) -> TrainConfig:
    """Settings from a TOML file; its relative paths are relative to the file, not to the working directory."""
    return from_mapping(toml_values(path), str(path), base)


def toml_values(path: Path) -> dict[str, Any]:
    """The settings of a TOML file by field name, each checked; relative paths made relative to the file."""
    if not path.is_file():
        raise OrtloraError(f"config file {path} does not exist")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise OrtloraError(f"{path} is not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise OrtloraError(f"{path} is not valid TOML: {e}") from None
    named = {key.replace("-", "_"): value for key, value in values.items()}
    if len(named) < len(values):
        twice = sorted(k for k in values if k.replace("-", "_") != k and k.replace("-", "_") in values)
        raise OrtloraError(f"{path}: {twice[0]!r} and {twice[0].replace('-', '_')!r} are the same setting; keep one")
    from ortlora.build.cli import artifact_defaults  # torch-free: ortlora-build's options, no more

    build = {key: named.pop(key) for key in artifact_defaults() if key in named}
    if build:
        named["build"] = {**named.get("build", {}), **build} if isinstance(named.get("build"), dict) else build
    for key in PATH_FIELDS:
        value = named.get(key)
        if isinstance(value, str) and not value.startswith(BUILTIN) and not Path(value).is_absolute() and \
                not is_hub_id(value, path.parent):
            named[key] = os.path.relpath(path.parent / value)
    return {key: _check(key, value, str(path)) for key, value in named.items()}


def check_paths(paths: dict[str, Any]) -> None:
    """Each path given (flag -> path) can at least be looked up: a symbolic link that loops, a name too long or a
    folder that may not be entered is refused in one line here; whether it exists is for its reader to say."""
    for flag, path in paths.items():
        if path is None or str(path).startswith(BUILTIN):
            continue
        try:
            os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            loop = " (a symbolic link that leads back to itself)" if e.errno == errno.ELOOP else ""
            raise OrtloraError(f"{flag} {path}: {e.strerror or e}{loop}; pass another path") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field; defaults are None so that only what the user typed overrides."""
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = _types(f.name)[0][0]
        if kind is dict:  # build: ortlora-build's own options stand for it (runtime/cli.py)
            continue
        help_text = f.metadata["help"]
        if f.default is not None and "default" not in help_text:
            help_text += f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"), help=help_text)


def given(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in _FIELDS and v is not None}
