"""ortlora-train: train the LoRA weights of an artifact directory on a dataset, without torch."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError, cli_entry
from ortlora.manifest import Manifest
from ortlora.runtime import config as cfg
from ortlora.runtime.checkpoint import (
    CHECKPOINT_RE,
    TRAINER_STATE,
    find_checkpoint,
    load_adapter,
)
from ortlora.runtime.data import load_jsonl, pack
from ortlora.runtime.report import JsonlLog, ProgressBar, format_step, plot_losses
from ortlora.runtime.tokenizer import Tokenizer
from ortlora.runtime.trainer import Trainer

BUILTIN = "builtin:"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ortlora-train",
        description="Train LoRA weights on ONNX Runtime from an ortlora-build artifact directory.",
    )
    parser.add_argument("--config", type=Path, help="TOML file of settings (the command line wins over it)")
    cfg.add_arguments(parser)
    return parser.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> tuple[cfg.TrainConfig, Path | None]:
    """defaults < the resumed run's settings < --config file < command line."""
    given = cfg.given(args)
    base, resume_from = cfg.TrainConfig(), None
    if given.get("resume"):
        resume_from = find_checkpoint(Path(given["resume"]))
        saved = json.loads((resume_from / TRAINER_STATE).read_text())["config"] if (resume_from / TRAINER_STATE).is_file() else {}
        base = cfg.from_mapping({k: v for k, v in saved.items() if k not in ("resume", "init_adapter")}, str(resume_from))
        if "out" not in given:
            base.out = str(resume_from.parent)
    if args.config:
        base = cfg.load_toml(args.config, base)
    config = cfg.from_mapping(given, "command line", base)
    return config, resume_from


def data_path(spec: str, split: str) -> Path:
    if spec.startswith(BUILTIN):
        name = spec[len(BUILTIN):]
        path = resources.files("ortlora.data") / f"{name}_{split}.jsonl"
        if not path.is_file():
            raise OrtloraError(f"unknown built-in dataset {spec!r}; choose builtin:chat, builtin:completions or builtin:text")
        return Path(str(path))
    return Path(spec)


def check_values(c: cfg.TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "max_seq_len", "epochs", "log_every"):
        if getattr(c, name) <= 0:
            raise OrtloraError(f"--{name.replace('_', '-')} must be positive, got {getattr(c, name)}")
    for name in ("max_steps", "eval_batches"):
        if getattr(c, name) is not None and getattr(c, name) <= 0:
            raise OrtloraError(f"--{name.replace('_', '-')} must be positive, got {getattr(c, name)}")
    if not 0.0 <= c.eval_split < 1.0:
        raise OrtloraError(f"--eval-split must be in [0, 1), got {c.eval_split}")
    if c.lr <= 0 or c.min_lr < 0 or c.min_lr > c.lr:
        raise OrtloraError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr {c.lr}, min-lr {c.min_lr}")


def make_backend(c: cfg.TrainConfig, artifacts: Path, manifest: Manifest):
    """The backend the settings ask for: auto takes ORT's training API where it exists and runs the
    provider, the portable training graph otherwise. Returns its name and the backend."""
    from ortlora.runtime.backend import OrtTrainingBackend, has_training_api

    name = c.backend
    if name == "auto":
        name = "ort-training" if c.ep in ("cpu", "cuda") and has_training_api() else "ort-session"
    if name == "ort-training":
        return name, OrtTrainingBackend(artifacts, manifest, ep=c.ep, threads=c.threads)
    from ortlora.runtime.session_backend import OrtSessionBackend

    return name, OrtSessionBackend(artifacts, manifest, ep=c.ep, threads=c.threads)


def prepare_run_dir(c: cfg.TrainConfig, artifacts: Path, resuming: bool) -> Path:
    run_dir = Path(c.out) if c.out else Path("runs") / f"{artifacts.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.is_dir() and not resuming and not c.overwrite:
        if any(CHECKPOINT_RE.match(p.name) for p in run_dir.iterdir()):
            raise OrtloraError(f"{run_dir} already holds checkpoints; continue it with --resume {run_dir}, "
                               "or pass --overwrite, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    c.out = str(run_dir)
    return run_dir


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    c, resume_from = resolve_config(args)
    check_values(c)
    artifacts = Path(c.artifacts)
    manifest = Manifest.load(artifacts)
    base_model = str(manifest.base_model_dir(artifacts).resolve())

    tokenizer = Tokenizer(artifacts)
    train, report = load_jsonl(data_path(c.data, "train"), tokenizer, c.max_seq_len, c.on_bad_data)
    messages = [report.summary()] + report.skipped[:5]
    evaluation = []
    if c.eval_data or c.data.startswith(BUILTIN) and not c.eval_split:
        eval_file = Path(c.eval_data) if c.eval_data else data_path(c.data, "valid")
        evaluation, eval_report = load_jsonl(eval_file, tokenizer, c.max_seq_len, c.on_bad_data)
        messages.append("eval: " + eval_report.summary())
    elif c.eval_split:
        order = np.random.default_rng(c.seed).permutation(len(train))
        n_eval = max(1, int(len(train) * c.eval_split))
        evaluation = [train[i] for i in sorted(order[:n_eval])]
        train = [train[i] for i in sorted(order[n_eval:])]
        messages.append(f"eval: {len(evaluation)} examples held out of the training data")
    if c.pack:
        n = len(train)
        train = pack(train, c.max_seq_len)
        messages.append(f"packed {n} examples into {len(train)} sequences")

    backend_name, backend = make_backend(c, artifacts, manifest)
    run_dir = prepare_run_dir(c, artifacts, resuming=resume_from is not None)
    log = JsonlLog(run_dir / "log.jsonl", append=resume_from is not None)
    trainer = Trainer(c, manifest, backend, train, evaluation, tokenizer.pad_id, run_dir, base_model)
    if c.init_adapter and not resume_from:
        backend.set_weights(load_adapter(Path(c.init_adapter), manifest))
        messages.append(f"initialised LoRA weights from {c.init_adapter}")
    if resume_from:
        trainer.restore(resume_from)
        messages.append(f"resumed from {resume_from} at step {trainer.position.step}")
    (run_dir / "config.json").write_text(json.dumps(c.to_dict(), indent=2) + "\n")

    interactive = c.progress and sys.stderr.isatty()
    bar = ProgressBar(trainer.total_steps, trainer.position.step, enabled=interactive)
    trainer.callbacks = [log, bar]
    if not interactive:  # logs and CI: about twenty plain lines instead of a bar
        every = max(1, trainer.total_steps // 20)
        trainer.callbacks.append(lambda r: print(format_step(r), flush=True)
                                 if r["kind"] == "train" and (r["step"] % every == 0 or r["step"] == r["total_steps"]) else None)
    print(f"ortlora-train: {manifest.counts['trainable']:,} LoRA parameters, {trainer.total_steps} steps "
          f"({trainer.steps_per_epoch} per epoch), backend {backend_name} on {c.ep}, run {run_dir}")
    for line in messages:
        print("  " + line)
    try:
        summary = trainer.train()
    finally:
        bar.close()
        log.close()
    if getattr(backend, "placement", None):
        summary["nodes_per_provider"] = backend.placement
        print("nodes run per execution provider: " + ", ".join(f"{ep} {n}" for ep, n in backend.placement.items()))
    if c.plot and plot_losses(run_dir / "log.jsonl", run_dir / "loss.png"):
        summary["loss_curve"] = str(run_dir / "loss.png")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    eval_text = f", eval loss {summary['eval_loss']:.4f} (perplexity {summary['eval_perplexity']:.2f})" if summary["eval_loss"] is not None else ""
    print(f"done: {summary['steps']} steps, {summary['trained_tokens']:,} trained tokens in {summary['wall_seconds']:.1f} s "
          f"({summary['tokens_per_s']:,.0f} tok/s), train loss {summary['train_loss']:.4f}{eval_text}, "
          f"peak memory {summary['peak_rss_mb']:.0f} MB")
    print(f"adapter: {summary['checkpoint']}  (PeftModel.from_pretrained(base, that directory))")
    return 0
