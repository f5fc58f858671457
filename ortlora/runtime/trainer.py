"""The training loop: micro-batches -> accumulated gradients -> AdamW step -> log, eval, checkpoint.

Around the checkpoints, as transformers' Trainer does: every new best eval loss is saved as a checkpoint
(RUN/best, run_dir.py), --early-stop-patience N stops after N evaluations in a row without a strictly
lower eval loss (EarlyStoppingCallback with no threshold), and --keep-last N removes older checkpoints of
the run once a newer one is in place, never the best. All of it is in each checkpoint's trainer_state.json
(``best``, ``evals_without_improvement``, ``checkpoints``), so a resume continues it exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from ortlora.errors import OrtloraError
from ortlora.manifest import Manifest
from ortlora.runtime import checkpoint as ckpt
from ortlora.runtime.backend import TrainingBackend
from ortlora.runtime.config import TrainConfig
from ortlora.runtime.data import Example, batches_in_epoch, collate, trained_tokens
from ortlora.runtime.optim import AdamW, AdamWConfig
from ortlora.runtime.precision import Precision
from ortlora.runtime.report import peak_rss_mb
from ortlora.runtime.run_dir import remove_checkpoint
from ortlora.runtime.schedules import Schedule


@dataclass
class Position:
    """Where training stands: optimizer steps done and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next micro-batch within the epoch


@dataclass
class Snapshot:
    """Everything a checkpoint holds, copied: the last state whose weights gave a finite loss."""

    weights: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    position: Position
    loss: float


class TrainingStopped(Exception):
    """A stop was requested (Ctrl-C, SIGTERM): the run saved ``checkpoint`` at a step boundary."""

    def __init__(self, checkpoint: Path, step: int, total: int):
        super().__init__(f"stopped at step {step} of {total}")
        self.checkpoint, self.step, self.total = checkpoint, step, total


@dataclass
class RunState:
    """What a checkpoint holds besides weights and position: the best eval so far, evaluations since it
    improved, this run's checkpoints (steps, oldest first, before --keep-last's removal) and tokens trained."""

    best: dict | None = None  # {"step": int, "eval_loss": float}
    evals_without_improvement: int = 0
    checkpoints: list[int] = field(default_factory=list)
    trained_tokens: int = 0

    @classmethod
    def from_state(cls, state: dict, where: Path) -> "RunState":
        """From a trainer_state.json; checkpoints of earlier versions have none of it (defaults)."""
        values = {name: state.get(name, getattr(cls(), name)) for name in ("best", "evals_without_improvement",
                                                                          "checkpoints", "trained_tokens")}
        best = values["best"]
        counts_ok = all(type(values[k]) is int and values[k] >= 0 for k in ("evals_without_improvement", "trained_tokens"))
        best_ok = best is None or (isinstance(best, dict) and type(best.get("step")) is int and best["step"] >= 0
                                   and isinstance(best.get("eval_loss"), (int, float)) and not isinstance(best["eval_loss"], bool))
        steps_ok = isinstance(values["checkpoints"], list) and all(type(v) is int and v >= 0 for v in values["checkpoints"])
        if not (counts_ok and best_ok and steps_ok):
            raise OrtloraError(f"{where} is damaged: best, evals_without_improvement, checkpoints or trained_tokens "
                               "is not what ortlora-train writes; resume from another checkpoint")
        return cls(**values)

    def stopped_early(self, patience: int) -> bool:
        return bool(patience) and self.evals_without_improvement >= patience


def all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in arrays.values())


def accumulate(backend: TrainingBackend, batches: list[dict[str, np.ndarray]]) -> tuple[float, dict[str, np.ndarray], int]:
    """sum(n * loss), sum(n * gradient) by name and sum(n) over ``batches``, n being each one's trained tokens.

    Each micro-batch's loss and gradients are means over its trained tokens: weighted by those tokens, k
    micro-batches of b examples make the same step as one batch of k * b. Every example has a trained token
    (data.py), so n > 0."""
    loss, grads, tokens = 0.0, {}, 0
    for batch in batches:
        n = trained_tokens(batch)
        backend.zero_grad()
        loss += backend.train_step(batch) * n
        grads = {k: grads.get(k, 0.0) + g * n for k, g in backend.gradients().items()}
        tokens += n
    return loss, grads, tokens


def keep_last(run_dir: Path, run: RunState, n: int) -> tuple[list[int], list[str]]:
    """--keep-last N: remove the run's checkpoints but the N newest and the best, each only when proven
    ortlora's. Returns the steps of the checkpoints left, and the names of those kept for holding other files."""
    if not n:
        return run.checkpoints, []
    keep = set(run.checkpoints[-n:]) | ({run.best["step"]} if run.best is not None else set())
    refused = []
    for step in run.checkpoints:
        if step not in keep and not remove_checkpoint(run_dir / f"checkpoint-{step}"):
            keep.add(step)
            refused.append(f"checkpoint-{step}")
    return [step for step in run.checkpoints if step in keep], refused


def plan_steps(n_examples: int, config: TrainConfig) -> tuple[int, int, int]:
    """Micro-batches per epoch, optimizer steps per epoch and optimizer steps in all. A step reads --grad-accum
    micro-batches on each of --workers workers."""
    if n_examples == 0:
        raise OrtloraError("no training examples are left (is --eval-split taking them all?)")
    batches_per_epoch = math.ceil(n_examples / config.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // (config.grad_accum * config.workers))
    return batches_per_epoch, steps_per_epoch, config.max_steps or config.epochs * steps_per_epoch


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        manifest: Manifest,
        backend: TrainingBackend,
        train: list[Example],
        evaluation: list[Example],
        pad_id: int,
        run_dir: Path,
        base_model: str,
        callbacks: list[Callable[[dict], None]] = (),
    ):
        self.config, self.manifest, self.backend = config, manifest, backend
        self.train_examples, self.eval_examples, self.pad_id = train, evaluation, pad_id
        self.run_dir, self.base_model, self.callbacks = run_dir, base_model, list(callbacks)
        self.batches_per_epoch, self.steps_per_epoch, self.total_steps = plan_steps(len(train), config)
        self.micro_batches_per_step = config.grad_accum * config.workers
        self.schedule = Schedule(config.schedule, config.lr, self.total_steps, config.warmup_steps, config.min_lr)
        self.optimizer = AdamW(AdamWConfig(config.beta1, config.beta2, config.adam_eps, config.weight_decay, config.max_grad_norm))
        self.position = Position()
        self.last_loss = float("nan")
        self.skipped_steps = 0
        self.stop_requested: str | None = None  # set (by a signal handler) to stop at the next step boundary
        self._saved: dict[int, Path] = {}  # step -> checkpoint written by this run
        self.run = RunState()
        self.stop_reason: str | None = None  # why training ended before its last step (early stopping)
        self.summary: dict | None = None  # the run's end, kept in its last checkpoint for a resume to finish it
        self.precision = Precision()  # what the backend computes in (precision.py), recorded in each checkpoint

    # -- state ---------------------------------------------------------------------------------
    def restore(self, directory: Path, weights: dict[str, np.ndarray] | None = None) -> list[str]:
        """Continue from a checkpoint: weights (``weights``, when read already), AdamW moments, schedule and data
        position, the best eval, patience and --keep-last's list. Returns lines that tell the user what changed."""
        weights = ckpt.load_adapter(directory, self.manifest) if weights is None else weights
        optimizer_state, state = ckpt.load_resume_state(directory, self.manifest)
        self.backend.set_weights(weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.position = Position(**state["position"])
        self.run = RunState.from_state(state, directory / ckpt.TRAINER_STATE)
        said = []
        best = self.run.best
        if best is not None and not (self.run_dir / f"checkpoint-{best['step']}").is_dir():
            # Removed by --keep-last in a branch that this resume (from an earlier checkpoint) abandons.
            said.append(f"the best checkpoint recorded at {directory.name}, checkpoint-{best['step']} (eval loss "
                        f"{best['eval_loss']:.4f}), is gone from {self.run_dir}; the best is tracked again from here")
            self.run.best, self.run.evals_without_improvement = None, 0
        self._rotate()  # finish a removal that a kill interrupted
        return said

    def snapshot(self) -> Snapshot:
        return Snapshot(self.backend.weights(),  # copies (Backend.weights)
                        {k: v.copy() for k, v in self.optimizer.state_dict().items()},
                        Position(**vars(self.position)), self.last_loss)

    def save(self, snapshot: Snapshot | None = None) -> Path:
        """Write a checkpoint of the current state, or of ``snapshot``; a step this run saved already is
        the same state (positions only move forward), so its checkpoint is not written again."""
        s = snapshot or Snapshot(self.backend.weights(), self.optimizer.state_dict(), self.position, self.last_loss)
        if s.position.step in self._saved and self.summary is None:
            return self._saved[s.position.step]
        lr = self.schedule(max(s.position.step - 1, 0))
        self.run.checkpoints = sorted(set(self.run.checkpoints) | {s.position.step})
        state = {"position": vars(s.position), "config": self.config.with_absolute_paths().to_dict(),
                 "skipped_steps": self.skipped_steps, **vars(self.run),
                 **({"summary": self.summary} if self.summary is not None else {})}
        metadata = {"epoch": s.position.epoch, "loss": s.loss, "lr": lr, "precision": self.precision.runs}
        path = ckpt.save_checkpoint(self.run_dir, s.position.step, self.manifest, self.base_model,
                                    s.weights, s.optimizer, state, metadata)
        self._saved[s.position.step] = path
        self._rotate()  # only now that the new checkpoint, which names the best, is in place
        return path

    def _rotate(self) -> None:
        """--keep-last N: remove this run's checkpoints but the N newest and the best."""
        kept, refused = keep_last(self.run_dir, self.run, self.config.keep_last)
        for step in set(self.run.checkpoints) - set(kept):
            self._saved.pop(step, None)
        self.run.checkpoints = kept
        for name in refused:
            self.note(f"--keep-last kept {name}: it holds files that ortlora-train did not write")

    def _track(self, eval_loss: float) -> bool:
        """Count an evaluation toward the best and the patience; True when it is a new best."""
        best = self.run.best
        if math.isfinite(eval_loss) and (best is None or eval_loss < best["eval_loss"]):
            self.run.best = {"step": self.position.step, "eval_loss": eval_loss}
            self.run.evals_without_improvement = 0
            return True
        self.run.evals_without_improvement += 1
        return False

    def early_stop_reason(self) -> str:
        best, n = self.run.best, self.run.evals_without_improvement
        since = f"the best, {best['eval_loss']:.4f} at step {best['step']}" if best else "a finite value"
        return (f"eval loss did not improve on {since}, for {n} evaluation{'s' if n > 1 else ''} "
                f"(--early-stop-patience {self.config.early_stop_patience})")

    def _roll_back(self, snapshot: Snapshot) -> None:
        self.backend.set_weights(snapshot.weights)
        self.optimizer.load_state_dict(snapshot.optimizer)

    # -- the loop ------------------------------------------------------------------------------
    def _micro_batches(self):
        """Micro-batches from the current position on, epoch after epoch, with their next position."""
        epoch, index = self.position.epoch, self.position.batch
        while True:
            for i, batch in enumerate(batches_in_epoch(self.train_examples, self.config.batch_size, epoch,
                                                       self.config.seed, self.config.shuffle, self.pad_id)):
                if i < index:
                    continue
                following = (epoch, i + 1) if i + 1 < self.batches_per_epoch else (epoch + 1, 0)
                yield batch, following
            epoch, index = epoch + 1, 0

    def _emit(self, record: dict) -> None:
        for callback in self.callbacks:
            callback(record)

    def note(self, text: str) -> None:
        """A message record in the log, at the step in progress."""
        self._emit({"kind": "message", "step": self.position.step + 1, "text": text})

    def evaluate(self) -> float | None:
        if not self.eval_examples:
            return None
        total, weight = 0.0, 0
        size = self.config.batch_size
        starts = range(0, len(self.eval_examples), size)
        if self.config.eval_batches:
            starts = starts[: self.config.eval_batches]
        batches = [collate(self.eval_examples[start : start + size], self.pad_id) for start in starts]
        # A data-parallel backend (distributed.py) evaluates the batches on all of its workers at once.
        losses = getattr(self.backend, "eval_losses", None) or (lambda bs: [self.backend.eval_loss(b) for b in bs])
        for batch, batch_loss in zip(batches, losses(batches)):
            n = trained_tokens(batch)
            total += batch_loss * n  # a batch's loss is its mean over trained tokens
            weight += n
        loss = total / weight
        self._emit({"kind": "eval", "step": self.position.step, "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))})
        return loss

    def train(self) -> dict:
        c = self.config
        micro_batches = self._micro_batches()
        start = time.perf_counter()
        tokens_seen = 0
        eval_loss = None
        good = None  # the last state whose weights gave a finite loss: a bad update is rolled back to it
        while self.position.step < self.total_steps:
            step_start = time.perf_counter()
            lr = self.schedule(self.position.step)
            batches = []
            for _ in range(self.micro_batches_per_step):
                batch, following = next(micro_batches)
                batches.append(batch)
            # A data-parallel backend (distributed.py) spreads the micro-batches over its workers.
            loss, grads, tokens = (getattr(self.backend, "accumulate", None) or partial(accumulate, self.backend))(batches)
            grads = {k: g / tokens for k, g in grads.items()}
            loss /= tokens
            if not math.isfinite(loss) or not all_finite(grads):
                # The weights that gave this loss came from the last update: go back to before it.
                self._bad_step(f"the loss became {loss}", good)
                self.position = Position(self.position.step + 1, *following)
                continue
            good = self.snapshot()
            weights = self.backend.weights()
            grad_norm = self.optimizer.step(weights, grads, lr)
            if not all_finite(weights):
                self._bad_step("the update made weights NaN or infinite", good)
                self.position = Position(self.position.step + 1, *following)
                continue
            self.backend.set_weights(weights)
            self.position = Position(self.position.step + 1, *following)
            self.last_loss = loss
            tokens_seen += tokens
            self.run.trained_tokens += tokens
            elapsed = time.perf_counter() - start
            if self.position.step % c.log_every == 0 or self.position.step == self.total_steps:
                self._emit({
                    "kind": "train", "step": self.position.step, "total_steps": self.total_steps,
                    "epoch": self.position.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": tokens, "trained_tokens": self.run.trained_tokens,
                    "step_seconds": time.perf_counter() - step_start,
                    "tokens_per_s": tokens_seen / elapsed, "elapsed": elapsed,
                    "peak_rss_mb": round(peak_rss_mb(), 1),  # the process's high-water mark so far
                })
            if c.eval_every and self.position.step % c.eval_every == 0 and self.position.step < self.total_steps:
                eval_loss = self.evaluate()
                if eval_loss is not None and self._track(eval_loss):
                    self.save()  # every new best is a checkpoint: RUN/best holds the weights that scored it
                elif self.run.stopped_early(c.early_stop_patience):
                    self.stop_reason = self.early_stop_reason()
                    self._emit({"kind": "message", "step": self.position.step,
                                "text": f"step {self.position.step}: stopping early: {self.stop_reason}"})
                    break
            if c.save_every and self.position.step % c.save_every == 0 and self.position.step < self.total_steps:
                self.save()
            if self.stop_requested and self.position.step < self.total_steps:
                raise TrainingStopped(self.save(), self.position.step, self.total_steps)
        wall = time.perf_counter() - start
        if self.stop_reason is None:  # an early stop has just evaluated this step
            eval_loss = self.evaluate()
            if eval_loss is not None:
                self._track(eval_loss)
        best = self.run.best
        final = self.run_dir / f"checkpoint-{self.position.step}"
        self.summary = {
            "steps": self.position.step,
            "total_steps": self.total_steps,
            "skipped_steps": self.skipped_steps,
            "trained_tokens": tokens_seen,
            "wall_seconds": round(wall, 3),
            "tokens_per_s": round(tokens_seen / wall, 1) if wall > 0 else None,
            "train_loss": self.last_loss,
            "eval_loss": eval_loss,
            "eval_perplexity": math.exp(min(eval_loss, 50)) if eval_loss is not None else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "checkpoint": str(final),
            "best_checkpoint": str(self.run_dir / f"checkpoint-{best['step']}") if best else None,
            "best_step": best["step"] if best else None,
            "best_eval_loss": best["eval_loss"] if best else None,
            "stopped_early": self.stop_reason is not None,
            "stop_reason": self.stop_reason,
            "run_trained_tokens": self.run.trained_tokens,
            "precision": self.precision.runs,
            "precision_route": self.precision.how,
        }
        saved = self.save()  # holds the summary: a resume after a kill from here on finishes the run's end
        return {**self.summary, "checkpoint": str(saved),
                "checkpoints": [f"checkpoint-{step}" for step in self.run.checkpoints]}

    def _bad_step(self, what: str, good: Snapshot | None) -> None:
        """A NaN or infinite loss, gradient or weight: go back to the last state known good (the one
        before the update that led here), then skip the step or stop with that state saved."""
        step = self.position.step + 1
        if good is not None:
            self._roll_back(good)
            self.last_loss = good.loss
        if self.config.on_nan == "skip":
            self.skipped_steps += 1
            back = f", weights of step {good.position.step} restored" if good else ""
            self._emit({"kind": "message", "step": step, "text": f"step {step}: {what}; step skipped{back} (--on-nan skip)"})
            return
        if good is None:  # the very first step: the weights are still the initial ones, nothing was learned
            raise OrtloraError(f"step {step}: {what} with the weights this run started from; stopped before any update "
                               "(check the data and the artifacts, lower --lr, or pass --on-nan skip)")
        saved = self.save(good)
        raise OrtloraError(f"step {step}: {what}; stopped; the last weights with a finite loss (step {good.position.step}) are in "
                           f"{saved} (lower --lr, or pass --on-nan skip)")
