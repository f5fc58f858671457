"""Training backends: what the trainer needs from a training step, and ORT's training API behind it.

A backend computes the loss of a batch and accumulates the gradients of the LoRA weights; the
optimizer (ours, in numpy) reads weights and gradients by name and writes the weights back.
The portable backend (session_backend.py: a plain InferenceSession running the standard-ONNX
training graph) implements the same small protocol.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from ortlora.errors import REBUILD, OrtloraError, listing
from ortlora.manifest import Manifest
from ortlora.onnx_files import check_external_data
from ortlora.runtime.frozen import map_frozen_weights, share_with
from ortlora.runtime.precision import Precision, apply_precision
from ortlora.runtime.providers import check_provider
from ortlora.weights import shape_problems

Batch = dict[str, np.ndarray]  # input_ids, attention_mask, labels: int64 [batch, seq]

def has_training_api() -> bool:
    """Whether the installed onnxruntime is a training build (onnxruntime-training[-cpu] 1.19.2)."""
    from onnxruntime.capi import _pybind_state as C

    return hasattr(C, "Module") and hasattr(C, "load_checkpoint")


def onnx_file(artifacts: Path, name: str) -> Path:
    """An ONNX file of the artifacts, about to be handed to ONNX Runtime: its external data must lie inside them."""
    path = Path(artifacts) / name
    check_external_data(path, artifacts)
    return path


def check_lora_inputs(session, manifest: Manifest, path: Path, required: bool = True) -> None:
    """The LoRA weights a session takes must be the manifest's, of its shapes (``required``: every one of them an
    input): fed by name, a weight the graph does not take, or of another shape, would fail at the first run."""
    inputs = {i.name: tuple(i.shape) for i in (*session.get_inputs(), *session.get_overridable_initializers())}
    problems = [f"{p.onnx_name} is no input" for p in manifest.parameters if required and p.onnx_name not in inputs]
    problems += [f"{p.onnx_name} is {list(inputs[p.onnx_name])}, the manifest says {list(p.shape)}"
                 for p in manifest.parameters if p.onnx_name in inputs and inputs[p.onnx_name] != p.shape
                 and all(type(d) is int for d in inputs[p.onnx_name])]  # (a named dimension takes any size)
    if problems:
        raise OrtloraError(f"{path} does not match the manifest: {listing(problems)}; {REBUILD}")


def _ort_errors() -> tuple[type[Exception], ...]:
    """What ONNX Runtime raises: its own classes (Fail, InvalidProtobuf, NoSuchFile, EPFail, ...) derive
    from Exception alone, and the training bindings raise RuntimeError."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (RuntimeError, *(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)))


def ort_message(error: Exception) -> str:
    """ONNX Runtime's message without its status code, source locations and C++ signatures."""
    text = " ".join(str(error).split())
    text = re.sub(r"^.*\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"Load model from \S+ failed:", "", text)
    return re.sub(r"(?:/\S*/)?\w+\.(?:cc|h|cpp):\d+ \S+?(?:\(.*?\))? ", " ", text).strip().rstrip(".")


@contextlib.contextmanager
def loading(*paths: Path):
    """Around ONNX Runtime loading ``paths``: what it raises becomes one line naming them. A failing
    execution provider is said to be one; anything else is the files'."""
    try:
        yield
    except _ort_errors() as e:
        names = " and ".join(str(p) for p in paths)
        if type(e).__name__ == "EPFail":
            raise OrtloraError(f"the execution provider failed while loading {names}: {ort_message(e)}") from None
        raise OrtloraError(f"ONNX Runtime cannot load {names}: {ort_message(e)}; {REBUILD}") from None


class TrainingBackend(Protocol):
    def train_step(self, batch: Batch) -> float:
        """Loss of the batch; adds the gradients of the LoRA weights to the accumulated ones."""

    def eval_loss(self, batch: Batch) -> float:
        """Loss of the batch without dropout and without touching gradients."""

    def weights(self) -> dict[str, np.ndarray]:
        """Current LoRA weights by ONNX name (copies)."""

    def set_weights(self, weights: dict[str, np.ndarray]) -> None: ...

    def gradients(self) -> dict[str, np.ndarray]:
        """Accumulated gradients since the last ``zero_grad``, by ONNX name (copies)."""

    def zero_grad(self) -> None: ...


class OrtTrainingBackend:
    """ORT's on-device training API (training + eval graphs from generate_artifacts).

    Uses the compiled bindings directly: ``onnxruntime.training.api`` imports torch, this does not.
    """

    def __init__(self, artifacts: Path, manifest: Manifest, ep: str = "cpu", threads: int | None = None,
                 precision: Precision = Precision()):
        from onnxruntime.capi import _pybind_state as C
        from onnxruntime.capi.onnxruntime_inference_collection import OrtValue

        if ep not in ("cpu", "cuda"):
            raise OrtloraError(
                f"ORT's training API runs on cpu and cuda only, not {ep}; "
                "use --backend ort-session (the portable training graph) for other providers"
            )
        if not has_training_api():
            import onnxruntime

            raise OrtloraError(f"--backend ort-training needs onnxruntime-training(-cpu) 1.19.2, and this onnxruntime "
                               f"{onnxruntime.__version__} has no training API; use --backend ort-session")
        check_provider(ep)
        self._C, self._OrtValue = C, OrtValue
        options = C.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.precision = precision
        apply_precision(options, precision)
        # The training and eval sessions share one mapping of the frozen weights (runtime/frozen.py).
        self._frozen = share_with(options, map_frozen_weights(artifacts, manifest))
        device_type = C.OrtDevice.cuda() if ep == "cuda" else C.OrtDevice.cpu()
        self._device = C.OrtDevice(device_type, C.OrtDevice.default_memory(), 0)
        checkpoint = artifacts / manifest.files["checkpoint"]
        with loading(checkpoint):
            self._state = C.load_checkpoint(str(checkpoint))
        # The checkpoint's trainable weights are the adapter ORT trains and we save: they must be the manifest's.
        params = [self._state.get_parameter(name) for name in self._state.parameter_names()]
        problems = shape_problems({p.name: tuple(p.data.shape()) for p in params if p.requires_grad},
                                  {p.onnx_name: p.shape for p in manifest.parameters})
        if problems:
            raise OrtloraError(f"{checkpoint} does not match the manifest: {listing(problems)}; {REBUILD}")
        training, evaluation = (onnx_file(artifacts, manifest.files[r]) for r in ("training_model", "eval_model"))
        with loading(training, evaluation):
            self._module = C.Module(str(training), self._state, str(evaluation), self._device, options)
        self.names = [p.onnx_name for p in manifest.parameters]
        self._params = {name: self._state.get_parameter(name) for name in self.names}
        self._inputs = manifest.io["training"]["inputs"]
        self._module.lazy_reset_grad()

    def _run(self, batch: Batch, training: bool) -> float:
        fetches = self._C.OrtValueVector()
        feeds = [np.ascontiguousarray(batch[name], dtype=np.int64) for name in self._inputs]
        if training:
            self._module.train_step(feeds, fetches)
        else:
            self._module.eval_step(feeds, fetches)
        return float(fetches[0].numpy())

    def train_step(self, batch: Batch) -> float:
        return self._run(batch, training=True)

    def eval_loss(self, batch: Batch) -> float:
        return self._run(batch, training=False)

    def weights(self) -> dict[str, np.ndarray]:
        # numpy() of a parameter's OrtValue is a view of ORT's buffer, which set_weights and the next step rewrite.
        return {name: param.data.numpy().copy() for name, param in self._params.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        for name, value in weights.items():
            ort_value = self._OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value, dtype=np.float32))
            self._params[name].copy_from(self._state, ort_value._ortvalue)

    def gradients(self) -> dict[str, np.ndarray]:
        # Views too: zero_grad and the next step rewrite the gradient buffers.
        return {name: param.grad.numpy().copy() for name, param in self._params.items()}

    def zero_grad(self) -> None:
        self._module.lazy_reset_grad()
