"""Data-parallel training on Ray: ``ortlora-train --workers N`` (``pip install "ortlora[ray]"``).

    driver (the trainer)                         N Ray actors, each an ONNX Runtime session
    reads N x --grad-accum micro-batches  --->   on the same artifacts: worker i takes micro-batches
                                                 i, i + N, ... and returns sum(n * loss), sum(n * grad), sum(n)
    sums them, AdamW once, LoRA weights   <---   (n: a micro-batch's trained tokens)
    to every worker for the next step

So N workers with batch b make the step one process makes with batch b and gradient accumulation N (the sums
are the trainer's token-weighted accumulation, split), and the checkpoints are a single-process run's files:
either resumes the other. The LoRA weights go out once a step as one shared Ray object (2 MB at 0.5B, r=8).

A worker that dies (its process killed, its node lost) is replaced by a new actor, which loads the artifacts
and the current weights, and the step is computed again from the same micro-batches: the result is the one
the step would have had. After MAX_REPLACEMENTS in one step the run stops with an error; its checkpoints are
untouched. Ray is imported here alone; the single-process trainer never imports it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections import deque
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError
from ortlora.manifest import Manifest
from ortlora.runtime.config import TrainConfig, check_workers
from ortlora.runtime.trainer import accumulate

MAX_REPLACEMENTS = 3  # worker losses tolerated within one step


def import_ray():
    try:
        import ray
    except ImportError:
        raise OrtloraError('--workers needs Ray: pip install "ortlora[ray]"') from None
    return ray


def check_reachable(address: str) -> None:
    """--ray-address HOST:PORT or ray://HOST:PORT must answer: Ray itself retries an address where nothing
    listens for many minutes, printing warnings. "auto" (the cluster this machine belongs to) is Ray's to find."""
    if address == "auto":
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise OrtloraError(f"--ray-address takes auto, HOST:PORT or ray://HOST:PORT, not {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise OrtloraError(f"--ray-address {address}: nothing answers at {host}:{port} ({e.strerror or e}); start the "
                           "cluster's head there (ray start --head), or leave --ray-address out to use this machine") from None


def check_resources(config: TrainConfig, resources: dict, address: str | None) -> None:
    """Each worker takes one CPU (and one GPU with --ep cuda): workers beyond what the cluster has would wait
    for them forever, so they are refused before any worker starts."""
    cluster = f"the Ray cluster at {address}" if address else "this machine's Ray cluster"
    check_workers(config.workers, resources.get("CPU", 0), cluster)
    gpus = resources.get("GPU", 0)
    if config.ep == "cuda" and config.workers > gpus:
        fix = f"pass --workers {int(gpus)} or fewer" if gpus >= 1 else "train with --ep cpu"
        raise OrtloraError(f"--workers {config.workers} with --ep cuda needs {config.workers} GPUs (one per worker), "
                           f"and {cluster} has {gpus:g}; {fix}")


class Worker:
    """One data-parallel worker: a training backend on the artifacts (a Ray actor; see RayBackend)."""

    def __init__(self, config: TrainConfig, artifacts: str):
        from ortlora.runtime.cli import make_backend

        manifest = Manifest.load(Path(artifacts))
        self.name, self.backend = make_backend(dataclasses.replace(config, workers=1, ray_address=None),
                                               Path(artifacts), manifest)

    def pid(self) -> int:
        return os.getpid()

    def backend_name(self) -> str:
        return self.name

    def weights(self) -> dict[str, np.ndarray]:
        return self.backend.weights()

    def accumulate(self, weights: dict[str, np.ndarray], batches: list[dict[str, np.ndarray]]):
        """accumulate's sums over ``batches`` with ``weights``, and the seconds they took."""
        start = time.perf_counter()
        self.backend.set_weights(weights)
        return (*accumulate(self.backend, batches), time.perf_counter() - start)

    def eval_loss(self, weights: dict[str, np.ndarray], batch: dict[str, np.ndarray]) -> float:
        self.backend.set_weights(weights)
        return self.backend.eval_loss(batch)


class RayBackend:
    """A TrainingBackend whose steps run on ``config.workers`` Ray actors. The driver holds the LoRA weights (the
    trainer's AdamW updates them here); ``accumulate`` spreads a step's micro-batches over the workers."""

    def __init__(self, config: TrainConfig, artifacts: Path, on_message=print):
        ray = self.ray = import_ray()
        self.config, self.artifacts, self.on_message = config, str(Path(artifacts).resolve()), on_message
        if config.ray_address:
            check_reachable(config.ray_address)
        elif not ray.is_initialized():  # a cluster of this machine would have its CPUs: refused before it starts
            check_workers(config.workers, os.cpu_count() or 1, "this machine")
        if not ray.is_initialized():
            try:
                if config.ray_address:
                    ray.init(address=config.ray_address, log_to_driver=False)
                else:  # a local cluster of this machine: one CPU slot per core
                    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:  # e.g. auto with no cluster running here
                raise OrtloraError(f"Ray could not start or join a cluster ({_reason(e)})") from None
        check_resources(config, ray.cluster_resources(), config.ray_address)
        self._options = {"num_cpus": 1, "num_gpus": 1 if config.ep == "cuda" else 0, "max_restarts": 0}
        self.workers = [self._start() for _ in range(config.workers)]
        try:
            first = ray.get(self.workers[0].weights.remote())
        except ray.exceptions.RayError as e:
            raise OrtloraError(f"a Ray worker could not start: {_reason(e)}") from None
        self.names = list(first)  # the LoRA weights' ONNX names, as the other backends have them
        self.worker_backend = ray.get(self.workers[0].backend_name.remote())
        self._weights = {k: v.copy() for k, v in first.items()}
        self._shared = None  # the weights as one Ray object, made once per update
        self.replacements = 0
        # The latest steps' costs (scripts/bench_ray.py): seconds, slowest_worker (seconds), bytes_out, bytes_back.
        self.steps: deque[dict] = deque(maxlen=100)

    def _start(self):
        return self.ray.remote(Worker).options(**self._options).remote(self.config, self.artifacts)

    # -- TrainingBackend ---------------------------------------------------------------------------------------
    def weights(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._weights.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        self._weights.update({k: np.array(v, np.float32) for k, v in weights.items()})
        self._shared = None

    def eval_loss(self, batch: dict[str, np.ndarray]) -> float:
        return self.eval_losses([batch])[0]

    def eval_losses(self, batches: list[dict[str, np.ndarray]]) -> list[float]:
        """Each batch's loss, batch j on worker j mod N, all at once."""
        return self._on_workers(lambda workers: [workers[j % len(workers)].eval_loss.remote(self._put(), batch)
                                                 for j, batch in enumerate(batches)])

    def accumulate(self, batches: list[dict[str, np.ndarray]]) -> tuple[float, dict[str, np.ndarray], int]:
        """The token-weighted sums of ``accumulate`` over ``batches``, worker i taking batches i, i + N, ...;
        summed over the workers in their order."""
        def dispatch(workers):
            shares = [batches[i::len(workers)] for i in range(len(workers))]
            return [w.accumulate.remote(self._put(), share) for w, share in zip(workers, shares) if share]

        start = time.perf_counter()
        parts = self._on_workers(dispatch)
        loss, grads, tokens = 0.0, {}, 0
        for part_loss, part_grads, part_tokens, _ in parts:
            loss += part_loss
            grads = {k: grads.get(k, 0.0) + g for k, g in part_grads.items()}
            tokens += part_tokens
        # What a step costs beyond the slowest worker's compute: the weights out, the sums back, Ray's calls.
        weight_bytes = sum(v.nbytes for v in self._weights.values())
        self.steps.append({"seconds": time.perf_counter() - start, "slowest_worker": max(p[3] for p in parts),
                           "bytes_out": weight_bytes * len(parts) + sum(_nbytes(b) for b in batches),
                           "bytes_back": sum(sum(g.nbytes for g in p[1].values()) for p in parts)})
        return loss, grads, tokens

    # train_step / gradients / zero_grad: the trainer calls accumulate instead (see Trainer.train).

    def close(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)

    # -- workers -----------------------------------------------------------------------------------------------
    def _put(self):
        if self._shared is None:
            self._shared = self.ray.put(self._weights)
        return self._shared

    def pids(self) -> list[int]:
        return self.ray.get([w.pid.remote() for w in self.workers])

    def _on_workers(self, dispatch) -> list:
        """Run ``dispatch(workers)``'s calls and return their results; a worker lost on the way is replaced and
        every call is made again (the calls depend only on their arguments, so the results are the same)."""
        ray = self.ray
        for attempt in range(MAX_REPLACEMENTS + 1):
            calls = dispatch(self.workers)
            try:
                return ray.get(calls)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                if attempt == MAX_REPLACEMENTS:
                    raise OrtloraError(f"Ray workers were lost {attempt + 1} times in one step ({_reason(e)}); "
                                       "stopped; the run's checkpoints are as they were") from None
                self._replace_lost()
        raise AssertionError("unreachable")

    def _replace_lost(self) -> None:
        for i, worker in enumerate(self.workers):
            try:
                self.ray.get(worker.pid.remote(), timeout=60)
                continue  # alive
            except self.ray.exceptions.RayError:
                pass
            self.workers[i] = self._start()
            self.replacements += 1
            self.on_message(f"Ray worker {i} was lost; a new one took its place and the step was computed again")


def _nbytes(batch: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in batch.values())


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
