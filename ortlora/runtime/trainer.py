"""The training loop: micro-batches -> accumulated gradients -> AdamW step -> log, eval, checkpoint."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
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
from ortlora.runtime.report import peak_rss_mb
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


def all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in arrays.values())


def plan_steps(n_examples: int, config: TrainConfig) -> tuple[int, int, int]:
    """Micro-batches per epoch, optimizer steps per epoch and optimizer steps in all."""
    if n_examples == 0:
        raise OrtloraError("no training examples are left (is --eval-split taking them all?)")
    batches_per_epoch = math.ceil(n_examples / config.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // config.grad_accum)
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
        self.schedule = Schedule(config.schedule, config.lr, self.total_steps, config.warmup_steps, config.min_lr)
        self.optimizer = AdamW(AdamWConfig(config.beta1, config.beta2, config.adam_eps, config.weight_decay, config.max_grad_norm))
        self.position = Position()
        self.last_loss = float("nan")
        self.skipped_steps = 0
        self.stop_requested: str | None = None  # set (by a signal handler) to stop at the next step boundary
        self._saved: dict[int, Path] = {}  # step -> checkpoint written by this run

    # -- state ---------------------------------------------------------------------------------
    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint: weights, AdamW moments, schedule and data position."""
        weights = ckpt.load_adapter(directory, self.manifest)
        optimizer_state, state = ckpt.load_resume_state(directory, self.manifest)
        self.backend.set_weights(weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.position = Position(**state["position"])

    def snapshot(self) -> Snapshot:
        # Copies: ORT's training API hands out weights that may share memory with its own buffers.
        return Snapshot({k: v.copy() for k, v in self.backend.weights().items()},
                        {k: v.copy() for k, v in self.optimizer.state_dict().items()},
                        Position(**vars(self.position)), self.last_loss)

    def save(self, snapshot: Snapshot | None = None) -> Path:
        """Write a checkpoint of the current state, or of ``snapshot``; a step this run saved already is
        the same state (positions only move forward), so its checkpoint is not written again."""
        s = snapshot or Snapshot(self.backend.weights(), self.optimizer.state_dict(), self.position, self.last_loss)
        if s.position.step in self._saved:
            return self._saved[s.position.step]
        lr = self.schedule(max(s.position.step - 1, 0))
        state = {"position": vars(s.position), "config": self.config.with_absolute_paths().to_dict(),
                 "skipped_steps": self.skipped_steps}
        metadata = {"epoch": s.position.epoch, "loss": s.loss, "lr": lr}
        path = ckpt.save_checkpoint(self.run_dir, s.position.step, self.manifest, self.base_model,
                                    s.weights, s.optimizer, state, metadata)
        self._saved[s.position.step] = path
        return path

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

    def evaluate(self) -> float | None:
        if not self.eval_examples:
            return None
        total, weight = 0.0, 0
        size = self.config.batch_size
        starts = range(0, len(self.eval_examples), size)
        if self.config.eval_batches:
            starts = starts[: self.config.eval_batches]
        for start in starts:
            batch = collate(self.eval_examples[start : start + size], self.pad_id)
            n = trained_tokens(batch)
            total += self.backend.eval_loss(batch) * n  # a batch's loss is its mean over trained tokens
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
            grads, loss, tokens = {}, 0.0, 0
            for _ in range(c.grad_accum):
                # Each micro-batch's loss and gradients are means over its trained tokens: weighted by those
                # tokens, k micro-batches of b examples make the same step as one batch of k * b.
                # Every example has a trained token (data.py), so n > 0.
                batch, following = next(micro_batches)
                n = trained_tokens(batch)
                self.backend.zero_grad()
                loss += self.backend.train_step(batch) * n
                grads = {k: grads.get(k, 0.0) + g * n for k, g in self.backend.gradients().items()}
                tokens += n
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
            elapsed = time.perf_counter() - start
            if self.position.step % c.log_every == 0 or self.position.step == self.total_steps:
                self._emit({
                    "kind": "train", "step": self.position.step, "total_steps": self.total_steps,
                    "epoch": self.position.epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                    "tokens": tokens, "step_seconds": time.perf_counter() - step_start,
                    "tokens_per_s": tokens_seen / elapsed, "elapsed": elapsed,
                    "peak_rss_mb": round(peak_rss_mb(), 1),  # the process's high-water mark so far
                })
            if c.eval_every and self.position.step % c.eval_every == 0 and self.position.step < self.total_steps:
                eval_loss = self.evaluate()
            if c.save_every and self.position.step % c.save_every == 0 and self.position.step < self.total_steps:
                self.save()
            if self.stop_requested and self.position.step < self.total_steps:
                raise TrainingStopped(self.save(), self.position.step, self.total_steps)
        wall = time.perf_counter() - start
        eval_loss = self.evaluate()
        saved = self.save()
        return {
            "steps": self.position.step,
            "skipped_steps": self.skipped_steps,
            "trained_tokens": tokens_seen,
            "wall_seconds": round(wall, 3),
            "tokens_per_s": round(tokens_seen / wall, 1) if wall > 0 else None,
            "train_loss": self.last_loss,
            "eval_loss": eval_loss,
            "eval_perplexity": math.exp(min(eval_loss, 50)) if eval_loss is not None else None,
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "checkpoint": str(saved),
        }

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
