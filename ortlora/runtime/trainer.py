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
        self.batches_per_epoch = math.ceil(len(train) / config.batch_size)
        self.steps_per_epoch = max(1, self.batches_per_epoch // config.grad_accum)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.schedule = Schedule(config.schedule, config.lr, self.total_steps, config.warmup_steps, config.min_lr)
        self.optimizer = AdamW(AdamWConfig(config.beta1, config.beta2, config.adam_eps, config.weight_decay, config.max_grad_norm))
        self.position = Position()
        self.last_loss = float("nan")
        self.skipped_steps = 0

    # -- state ---------------------------------------------------------------------------------
    def restore(self, directory: Path) -> None:
        """Continue from a checkpoint: weights, AdamW moments, schedule and data position."""
        weights = ckpt.load_adapter(directory, self.manifest)
        optimizer_state, state = ckpt.load_resume_state(directory)
        self.backend.set_weights(weights)
        self.optimizer.load_state_dict(optimizer_state)
        self.position = Position(**state["position"])

    def save(self, loss: float) -> Path:
        lr = self.schedule(max(self.position.step - 1, 0))
        state = {"position": vars(self.position), "config": self.config.to_dict(), "skipped_steps": self.skipped_steps}
        metadata = {"epoch": self.position.epoch, "loss": loss, "lr": lr}
        return ckpt.save_checkpoint(self.run_dir, self.position.step, self.manifest, self.base_model,
                                    self.backend.weights(), self.optimizer.state_dict(), state, metadata)

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
        last_saved = None
        while self.position.step < self.total_steps:
            step_start = time.perf_counter()
            lr = self.schedule(self.position.step)
            self.backend.zero_grad()
            losses, tokens = [], 0
            for _ in range(c.grad_accum):
                batch, following = next(micro_batches)
                losses.append(self.backend.train_step(batch))
                tokens += trained_tokens(batch)
            grads = self.backend.gradients()
            if c.grad_accum > 1:
                grads = {k: g / c.grad_accum for k, g in grads.items()}  # mean of micro-batch means
            loss = float(np.mean(losses))
            if not math.isfinite(loss) or not all(np.isfinite(g).all() for g in grads.values()):
                self._bad_step(loss)
                self.position = Position(self.position.step + 1, *following)
                continue
            weights = self.backend.weights()
            grad_norm = self.optimizer.step(weights, grads, lr)
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
                })
            if c.eval_every and self.position.step % c.eval_every == 0 and self.position.step < self.total_steps:
                eval_loss = self.evaluate()
            if c.save_every and self.position.step % c.save_every == 0 and self.position.step < self.total_steps:
                last_saved = self.save(loss)
        wall = time.perf_counter() - start
        eval_loss = self.evaluate()
        last_saved = self.save(self.last_loss)
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
            "checkpoint": str(last_saved),
        }

    def _bad_step(self, loss: float) -> None:
        step = self.position.step + 1
        if self.config.on_nan == "skip":
            self.skipped_steps += 1
            self._emit({"kind": "message", "text": f"step {step}: loss is {loss}, step skipped (--on-nan skip)"})
            return
        saved = self.save(self.last_loss)  # the weights are still those of the last good step
        raise OrtloraError(f"step {step}: the loss became {loss}; stopped, the last good weights are in {saved} "
                           "(lower --lr, or pass --on-nan skip)")
