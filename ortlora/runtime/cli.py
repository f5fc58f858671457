"""ortlora-train: train the LoRA weights of an artifact directory on a dataset, without torch."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from importlib import resources
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError, add_debug_argument, cli_entry
from ortlora.files import read_json
from ortlora.manifest import Manifest
from ortlora.output_dirs import remove_stale_temp
from ortlora.runtime import config as cfg
from ortlora.runtime import data_formats
from ortlora.runtime.checkpoint import TRAINER_STATE, find_checkpoint, load_adapter, load_resume_state
from ortlora.runtime.data import pack
from ortlora.runtime.precision import resolve as resolve_precision
from ortlora.runtime.providers import parse_ep_options, short_name
from ortlora.runtime.report import JsonlLog, ProgressBar, TensorBoardLog, format_step, plot_losses, tensorboard_writer
from ortlora.runtime.run_dir import (
    LOG,
    RunDir,
    check_run_dir,
    expect_event_files,
    finished,
    json_bytes,
    mark_finished,
    write_owned,
)
from ortlora.runtime.tokenizer import Tokenizer
from ortlora.runtime.trainer import RunState, Trainer, TrainingStopped, keep_last, plan_steps

BUILTIN = cfg.BUILTIN
RESUME_ELSEWHERE = "resume from another checkpoint"
PROFILE_TEMP = "ortlora-profile"  # session_backend's first-step profiles, named ortlora-profile-<pid>_...


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ortlora-train",
        description="Train LoRA weights on ONNX Runtime from an ortlora-build artifact directory.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", type=Path, help="TOML file of settings (the command line wins over it)")
    cfg.add_arguments(parser)
    parser.add_argument("--ep-option", action="append", metavar="KEY=VALUE",
                        help="an option for --ep's provider, over ortlora's own (repeatable): --ep ggml --ep-option "
                             "weights=f16; recorded in config.json and summary.json")
    from ortlora.build.cli import add_artifact_arguments  # torch-free: the definitions of ortlora-build's options

    add_artifact_arguments(parser.add_argument_group("build options, with --model (ortlora-build's; in a TOML file "
                                                     "as top-level keys)"), defaults=False)
    add_debug_argument(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[cfg.TrainConfig, Path | None]:
    """defaults < the resumed run's settings < --config file < command line. ``resume`` in the file resumes as
    --resume does (the command line's wins). A resume from the command line makes the file's init_adapter and
    overwrite give way; one source that sets a resume and either of them (overwrite: of the run resumed), or both
    epochs and max_steps, is refused: the run would ignore one of them."""
    given = cfg.given(args)
    if getattr(args, "ep_option", None):
        given["ep_options"] = parse_ep_options(args.ep_option)
    from ortlora.build.cli import artifact_defaults

    build = {key: getattr(args, key) for key in artifact_defaults() if getattr(args, key, None) is not None}
    if build:
        given["build"] = build
    if args.config:
        cfg.check_paths({"--config": args.config})
    layers = [(str(args.config), cfg.toml_values(args.config))] if args.config else []
    layers.append((cfg.COMMAND_LINE, given))
    for source, values in layers:
        cfg.check_length(values, source)
        cfg.check_source(values, source)
    at = next((i for i in reversed(range(len(layers))) if layers[i][1].get("resume")), None)
    resume = None if at is None else layers[at][1]["resume"]
    base, resume_from = cfg.TrainConfig(), None
    if resume:
        cfg.check_paths({"--resume": resume})
        resume_from = find_checkpoint(Path(resume))
        state = resume_from / TRAINER_STATE
        saved = read_json(state, RESUME_ELSEWHERE).get("config", {}) if state.is_file() else {}
        if not isinstance(saved, dict):
            raise OrtloraError(f"{state}: config must be a JSON object; {RESUME_ELSEWHERE}")
        # --overwrite is the user's word for this command, never inherited from the run resumed.
        base = cfg.from_mapping({k: v for k, v in saved.items() if k not in ("resume", "init_adapter", "overwrite")},
                                str(state))
        base.out = str(resume_from.parent)  # unless the file or the command line names another --out
    config = base
    for source, values in layers:
        if "artifacts" in values:  # artifacts named here replace a model (and its build options) named below
            config = dataclasses.replace(config, model=None, build=None)
        if values.get("ep", config.ep) != config.ep and "ep_options" not in values:
            config = dataclasses.replace(config, ep_options=None)  # another provider: the options below were not its
        config = cfg.from_mapping(values, source, config)
        if "epochs" in values and "max_steps" not in values:
            config.max_steps = None  # epochs set here set the length, over a max_steps of the layers below
    if resume_from and not any(values.get("init_adapter") for _, values in layers[at:]):
        config.init_adapter = None  # the file's init_adapter gives way to --resume on the command line
    if resume_from and any(values.get("overwrite") for _, values in layers[at:]) and \
            Path(config.out).resolve() == resume_from.parent.resolve():
        raise OrtloraError(f"--overwrite would start {config.out} over, and --resume {resume} continues the run in it: "
                           "pass one of them (or --out elsewhere to start a new run from that checkpoint)")
    if resume_from and Path(config.out).resolve() == resume_from.parent.resolve():
        config.overwrite = False  # a file's overwrite gives way to --resume on the command line: the run goes on
    cfg.check_together(config)
    return config, resume_from


def data_path(spec: str, split: str) -> Path:
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN):]
        path = resources.files("ortlora.data") / f"{name}_{split}.jsonl"
        if not path.is_file():
            raise OrtloraError(f"unknown built-in dataset {spec!r}; choose builtin:chat, builtin:completions or builtin:text")
        return Path(str(path))
    return Path(spec)


def make_backend(c: cfg.TrainConfig, artifacts: Path, manifest: Manifest):
    """The backend the settings ask for: auto takes ORT's training API where it exists and runs the
    provider, the portable training graph otherwise. Returns its name and the backend."""
    from ortlora.runtime.backend import OrtTrainingBackend, has_training_api

    precision = resolve_precision(c.precision, c.ep)
    if c.workers > 1 or c.ray_address:
        from ortlora.runtime.distributed import RayBackend

        backend = RayBackend(c, artifacts)
        backend.precision = precision  # each worker resolves the same on its machine
        return f"{backend.worker_backend} on {c.workers} Ray worker{'s' if c.workers > 1 else ''}", backend
    name = c.backend
    if name == "auto":
        name = "ort-training" if c.ep in ("cpu", "cuda") and has_training_api() else "ort-session"
    if name == "ort-training":
        return name, OrtTrainingBackend(artifacts, manifest, ep=c.ep, threads=c.threads, precision=precision)
    from ortlora.runtime.session_backend import OrtSessionBackend

    return name, OrtSessionBackend(artifacts, manifest, ep=c.ep, threads=c.threads, allow_fallback=c.allow_fallback,
                                   precision=precision, ep_options=c.ep_options)


def data_sources(c: cfg.TrainConfig) -> tuple[data_formats.Source, data_formats.Source | None, str | None]:
    """What --data and --eval-data name: the training rows, the evaluation rows (None: none, or --eval-split's),
    and a note when the evaluation rows were not named (a directory's valid file, as mlx-lm takes it)."""
    cfg.check_paths({"--data": c.data, "--eval-data": c.eval_data})  # a name too long, a loop: one line
    if c.data.startswith(BUILTIN):
        train = data_formats.Source("jsonl", str(data_path(c.data, "train")))
    else:
        train = data_formats.resolve(c.data, "--data", c.data_split)
    if c.eval_data:
        return train, data_formats.resolve(c.eval_data, "--eval-data", c.eval_data_split, stem="valid"), None
    if c.eval_split:
        return train, None, None
    if c.data.startswith(BUILTIN):
        return train, data_formats.Source("jsonl", str(data_path(c.data, "valid"))), None
    valid = data_formats.layout_file(Path(c.data), "valid") if Path(c.data).is_dir() else None
    if valid is None:
        return train, None, None
    return train, data_formats.Source(data_formats.SUFFIXES[valid.suffix], str(valid)), \
        f"evaluating on {valid.name} of {c.data} (mlx-lm's layout; --eval-data or --eval-split to choose other data)"


def load_data(c: cfg.TrainConfig, tokenizer: Tokenizer) -> tuple[list, list, list[str]]:
    """Training and evaluation examples, and lines that say what was loaded."""
    columns = data_formats.parse_columns(c.columns)
    train_source, eval_source, note = data_sources(c)
    train, report = data_formats.load(train_source, tokenizer, c.max_seq_len, c.on_bad_data, columns)
    messages = [report.summary()] + report.skipped[:5]
    evaluation = []
    if eval_source:
        evaluation, eval_report = data_formats.load(eval_source, tokenizer, c.max_seq_len, c.on_bad_data, columns)
        messages += [note] if note else []
        messages.append("eval: " + eval_report.summary())
    elif c.eval_split:
        if len(train) < 2:
            raise OrtloraError(f"--eval-split needs at least 2 training examples to hold some out, {c.data} has {len(train)}")
        order = np.random.default_rng(c.seed).permutation(len(train))
        n_eval = min(len(train) - 1, max(1, int(len(train) * c.eval_split)))
        evaluation = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
        messages.append(f"eval: {len(evaluation)} examples held out of the training data")
    if c.pack:
        n = len(train)
        train = pack(train, c.max_seq_len)
        messages.append(f"packed {n} examples into {len(train)} sequences")
    return train, evaluation, messages


@contextlib.contextmanager
def stop_at_step_boundary(trainer: Trainer):
    """Ctrl-C or SIGTERM asks the trainer to save and stop after the step in progress; a second one
    stops at once (losing the steps since the last checkpoint)."""

    def handler(signum, frame):
        trainer.stop_requested = signal.Signals(signum).name
        signal.signal(signum, previous[signum])
        print(f"\n{trainer.stop_requested}: saving a checkpoint after this step (again to stop at once)",
              file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():  # ortlora.train() in a thread: no handlers there
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))[0]


def run(args: argparse.Namespace) -> tuple[int, Path, Path]:
    """Train as ``args`` (ortlora-train's, parsed) say. Returns the exit code (0, or 130 where a signal stopped the
    run at a checkpoint), the run directory and the artifacts. ortlora-train and ``ortlora.train()`` both train
    through here."""
    c, resume_from = resolve_config(args)
    if c.report_to == "tensorboard":
        tensorboard_writer()  # not installed: one line saying what to install, before any work
    reads = [Path(p) for p in (c.data, c.eval_data, c.init_adapter)
             if p and not p.startswith(BUILTIN) and not data_formats.is_hub_id(p)]
    if c.model:  # the one command: artifacts built on first use, then reused from the cache
        from ortlora.build_cache import artifacts_for

        if c.out:  # an --out this run may not write is refused before a build
            check_run_dir(Path(c.out), resuming_from=resume_from, overwrite=c.overwrite, reads=reads)
        c.artifacts = str(artifacts_for(c.model, c.build or {}, c.threads))
    artifacts = Path(c.artifacts)
    run_path = Path(c.out) if c.out else Path("runs") / f"{artifacts.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    same_run, start_over = check_run_dir(run_path, resuming_from=resume_from, overwrite=c.overwrite,
                                         reads=[artifacts, *reads])
    manifest = Manifest.load(artifacts)
    base_model = str(manifest.base_model_dir(artifacts).resolve())
    stored = manifest.model.get("base_precision", "fp32")  # the frozen matrices as the build stored them
    base_model += "" if stored == "fp32" else f" stored as {stored}"
    print(f"ortlora-train: {artifacts} (base model {base_model}; LoRA r={manifest.lora['rank']} on "
          f"{', '.join(manifest.lora['targets'])}), data {c.data}", flush=True)
    limit = manifest.context_length(artifacts)
    if c.max_seq_len > limit:
        raise OrtloraError(f"--max-seq-len {c.max_seq_len} is longer than the model's context "
                           f"(max_position_embeddings {limit}); pass at most {limit}")

    if c.pack and manifest.model.get("attention_mask") != "segments":
        raise OrtloraError(f"{artifacts} was built before --pack kept packed examples apart (they would attend to "
                           "each other); rebuild it with ortlora-build, or train without --pack")
    tokenizer = Tokenizer(artifacts)
    train, evaluation, messages = load_data(c, tokenizer)
    if c.early_stop_patience and not evaluation:
        raise OrtloraError("--early-stop-patience needs evaluation data: pass --eval-data or --eval-split")
    _, _, total = plan_steps(len(train), c)
    state = load_resume_state(resume_from, manifest)[1] if resume_from else {}
    done = state["position"]["step"] if resume_from else 0
    if resume_from and (done >= total or RunState.from_state(state, resume_from / TRAINER_STATE).stopped_early(
            c.early_stop_patience)):
        code = finish_ended_run(run_path, c, resume_from, state, same_run, done, total)
        return code, run_path if same_run else resume_from.parent, artifacts

    # The starting weights are read and checked before the run directory is touched: a refusal writes nothing.
    start = resume_from or (find_checkpoint(Path(c.init_adapter)) if c.init_adapter else None)
    initial = load_adapter(start, manifest) if start else None
    remove_stale_temp(PROFILE_TEMP)
    backend = make_backend(c, artifacts, manifest)  # before the run directory: a provider's refusal writes nothing
    run = RunDir(run_path)  # locked until the process ends
    try:
        messages += run.begin(start_over=start_over, resume_from=resume_from, step=done)
        code = train_in(run_path, c, artifacts, manifest, base_model, backend, tokenizer, train, evaluation, messages,
                        resume_from, initial)
        return code, run_path, artifacts
    finally:
        run.close()
        if hasattr(backend[1], "close"):  # Ray's workers
            backend[1].close()


def train_in(run_dir: Path, c: cfg.TrainConfig, artifacts: Path, manifest: Manifest, base_model: str, backend: tuple,
             tokenizer: Tokenizer, train: list, evaluation: list, messages: list[str], resume_from: Path | None,
             initial: dict | None) -> int:
    backend_name, backend = backend
    c.out = str(run_dir)
    log = JsonlLog(run_dir / LOG)  # made (empty, or cut back to the checkpoint resumed) by RunDir.begin
    trainer = Trainer(c, manifest, backend, train, evaluation, tokenizer.pad_id, run_dir, base_model)
    if hasattr(backend, "on_message"):  # Ray's workers: a lost one is replaced, which the log says
        backend.on_message = trainer.note
    if c.init_adapter and not resume_from:
        backend.set_weights(initial)
        messages.append(f"initialised LoRA weights from {c.init_adapter}")
    if resume_from:
        messages += trainer.restore(resume_from, initial)
        messages.append(f"resumed from {resume_from} at step {trainer.position.step}")
    write_owned(run_dir, "config.json", json_bytes(c.with_absolute_paths().to_dict()))

    interactive = c.progress and sys.stderr.isatty()
    bar = ProgressBar(trainer.total_steps, trainer.position.step, enabled=interactive)
    trainer.callbacks = [log, bar]
    if c.report_to == "tensorboard":
        # A resume's events start after its checkpoint: TensorBoard drops the earlier process's from there on.
        suffix = f".{time.time_ns()}.{os.getpid()}"
        expect_event_files(run_dir, suffix)  # the writer's file is the run's from its first byte
        trainer.callbacks.append(TensorBoardLog(run_dir, purge_step=trainer.position.step + 1 if resume_from else None,
                                                suffix=suffix))
    if not interactive:  # logs and CI: about twenty plain lines instead of a bar
        every = max(1, trainer.total_steps // 20)
        trainer.callbacks.append(lambda r: print(format_step(r), flush=True)
                                 if r["kind"] == "train" and (r["step"] % every == 0 or r["step"] == r["total_steps"]) else None)
    precision = trainer.precision = backend.precision
    if c.precision != "fp32":
        messages.append(precision.describe())
    running = " + ".join(short_name(p) for p in getattr(backend, "providers", [c.ep]))
    if getattr(backend, "route", ""):  # a plugin provider: its package and device
        running += f" ({backend.route})"
    if getattr(backend, "fell_back", False):
        messages.append(f"{c.ep} cannot run the training graph; the CPU provider runs it (--allow-fallback)")
    elif getattr(backend, "ep_options", None):
        messages.append(f"{c.ep}'s provider options: " + ", ".join(f"{k}={v}" for k, v in backend.ep_options.items()))
    print(f"  {manifest.counts['trainable']:,} LoRA parameters, {trainer.total_steps} steps "
          f"({trainer.steps_per_epoch} per epoch), backend {backend_name} on {running} in {precision.runs}, "
          f"run {run_dir}")
    for line in messages:
        print("  " + line)
    try:
        with stop_at_step_boundary(trainer):
            summary = trainer.train()
    except TrainingStopped as stop:
        bar.close()
        print(f"stopped at step {stop.step} of {stop.total}; saved {stop.checkpoint}; continue with: "
              f"ortlora-train --resume {run_dir}", file=sys.stderr)
        return 130
    finally:
        bar.close()
        for callback in trainer.callbacks:
            if hasattr(callback, "close"):
                callback.close()
    if getattr(backend, "providers", None):  # what ran, and the accelerator's options as it got them
        summary["execution_providers"] = backend.providers
        summary["ep_options"] = getattr(backend, "ep_options", None) or {}
        if getattr(backend, "route", ""):
            summary["ep_route"] = backend.route
    if getattr(backend, "placement", None):
        summary["nodes_per_provider"] = backend.placement
        print("nodes run per execution provider: " + ", ".join(f"{ep} {n}" for ep, n in backend.placement.items()))
    finish(run_dir, c, summary)
    eval_text = f", eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_perplexity']:.2f})" if summary["eval_loss"] is not None else ""
    print(f"done: {summary['steps']} steps, {summary['trained_tokens']:,} trained tokens in {summary['wall_seconds']:.1f} s "
          f"({summary['tokens_per_s']:,.0f} tok/s), train loss {summary['train_loss']:.4f}{eval_text}, "
          f"peak memory {summary['peak_rss_mb']:.0f} MB")
    if summary["stopped_early"]:
        print(f"stopped early at step {summary['steps']} of {trainer.total_steps}: {summary['stop_reason']}")
    if summary["best_checkpoint"] and summary["best_checkpoint"] != summary["checkpoint"]:
        print(f"best: {summary['best_checkpoint']} (eval loss {summary['best_eval_loss']:.4f}; {run_dir / 'best'} "
              "names it to ortlora-export and ortlora-generate)")
    print(f"adapter: {summary['checkpoint']}  (PeftModel.from_pretrained(base, that directory))")
    return 0


def finish(run_dir: Path, c: cfg.TrainConfig, summary: dict) -> None:
    """The end of a run: its loss curve, summary.json, and the record that the end is done."""
    png = plot_losses(run_dir / LOG) if c.plot else None
    if png is not None:
        write_owned(run_dir, "loss.png", png)
        summary["loss_curve"] = str(run_dir / "loss.png")
    write_owned(run_dir, "summary.json", json_bytes(summary))
    mark_finished(run_dir, True)


def finish_ended_run(run_path: Path, c: cfg.TrainConfig, resume_from: Path, state: dict, same_run: bool, done: int,
                     total: int) -> int:
    """--resume of a run whose last step is saved: nothing to train; the end of the run (--keep-last's removals,
    loss.png, summary.json) is completed once, where a kill had stopped it."""
    stopped_early = done < total
    more = ("pass a larger --early-stop-patience, or 0, to train further" if stopped_early else
            "pass a larger --max-steps or --epochs to train further")
    what = (f"stopped early at step {done} (its eval loss had not improved for --early-stop-patience "
            f"{c.early_stop_patience} evaluations)" if stopped_early else f"has done all {total} steps of its run")
    summary = state.get("summary")
    if not same_run or not isinstance(summary, dict) or finished(run_path):
        print(f"{resume_from} {what}; nothing to do ({more})")
        return 0
    run = RunDir(run_path)  # locked until the end is written
    try:
        kept, refused = keep_last(run_path, RunState.from_state(state, resume_from / TRAINER_STATE), c.keep_last)
        summary = {**summary, "checkpoint": str(resume_from), "checkpoints": [f"checkpoint-{s}" for s in kept]}
        finish(run_path, c, summary)
    finally:
        run.close()
    kept_note = f" (--keep-last kept {', '.join(refused)}: they hold files ortlora-train did not write)" if refused else ""
    print(f"{resume_from} {what}; completed the end of the run that a stop had cut short: {run_path / 'summary.json'}"
          f"{kept_note}")
    return 0
