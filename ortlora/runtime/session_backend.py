"""The portable backend: the standard-ONNX training graph in a plain InferenceSession.

Needs only the maintained ``onnxruntime`` package (any version that runs opset 17, on any Python it
has wheels for) and runs on whichever execution providers that package has: the build step's
``portable_training.onnx`` computes the loss and the gradient of every LoRA weight, which are
graph inputs. The CPU provider stays in the list as the fallback for nodes an accelerator does
not take. Gradients are written by ONNX Runtime straight into preallocated numpy buffers (IO
binding) and summed here across micro-batches, like ORT's training API does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ortlora.errors import REBUILD, OrtloraError, listing
from ortlora.manifest import Manifest
from ortlora.runtime.backend import Batch, check_lora_inputs, onnx_file
from ortlora.runtime.frozen import map_frozen_weights, release_pages, share_with
from ortlora.runtime.precision import Precision, apply_precision
from ortlora.runtime.providers import CPU, create_session, parse_ep, resolve
from ortlora.weights import read_expected

OWN_GRAPHS = ("openvino", "ggml", "cpu")  # --ep names whose portable graphs the manifest may list apart (ROLE_NAME_model)
# OpenVINO 2026.4 (onnxruntime-ep-openvino 1.8.1) on a bf16 base's graphs: ONNX Runtime folds each widened matrix into
# a float32 constant, read both as x W^T and dY W, and for a square one OpenVINO computes one of the two products
# transposed (LoRA gradients 1.35 to 1.47 off on the tiny and 4-layer 0.5B builds; docs/providers.md). The compiled-in
# onnxruntime-openvino 1.24.1 (OpenVINO 2025.4.1) gets these graphs right.
BF16_ON_THE_OPENVINO_PLUGIN = (
    "--ep openvino through the plugin onnxruntime-ep-openvino cannot train a bf16 base: OpenVINO 2026.4 computes one "
    "of a square matrix's two products transposed in its graphs, which gives wrong gradients without an error; use "
    "onnxruntime-openvino, a float32 or int8 / int4 base, or --ep cpu (or pass --allow-fallback to let the CPU run it)")


def _openvino_plugin(ep: str) -> bool:
    """Whether --ep openvino selects onnxruntime-ep-openvino's plugin (not onnxruntime-openvino's compiled-in one)."""
    try:
        return resolve(ep).plugin is not None
    except OrtloraError:  # no device: create_session says so in its own words
        return False


class OrtSessionBackend:
    def __init__(self, artifacts: Path, manifest: Manifest, ep: str = "cpu", threads: int | None = None,
                 allow_fallback: bool = False, precision: Precision = Precision(), ep_options: dict | None = None):
        import onnxruntime as ort

        files = manifest.files
        if "portable_training_model" not in files:
            raise OrtloraError(f"{artifacts} has no portable training graph (it was built by an older ortlora); "
                               f"rebuild it with ortlora-build")
        self._ort, self._artifacts, self._files, self._manifest = ort, artifacts, files, manifest
        self._ep, self._allow_fallback, self._threads, self.precision = ep, allow_fallback, threads, precision
        self._ep_options = ep_options  # the user's provider options (--ep-option), over ours
        self.names = [p.onnx_name for p in manifest.parameters]
        self._weights = _initial_weights(artifacts / files["initial_lora"], manifest)
        self._grads = {n: np.zeros_like(w) for n, w in self._weights.items()}
        self._step_grads = {n: np.zeros_like(w) for n, w in self._weights.items()}
        self._loss = np.zeros((), np.float32)
        self._inputs = ["input_ids", "attention_mask", "labels"]
        self._frozen = map_frozen_weights(artifacts, manifest)  # one mapping for both sessions
        self._frozen_file = artifacts / files["frozen_weights"] if "frozen_weights" in files else None
        self._frozen_values: list = []

        # Some providers have graphs of their own, with the same inputs and outputs: OpenVINO's for a bf16, int8 or int4
        # base (portable_graph.unordered_widening, openvino_quantized.py), ggml's without NonZero and LogSoftmax
        # (dense_loss.py), the CPU provider's training graph with the head's loss in a Loop (portable_graph.CPU_TRAINING).
        provider, base = parse_ep(ep)[0], manifest.model.get("base_precision")
        if provider == "openvino" and base == "bf16" and _openvino_plugin(ep):
            if not allow_fallback:
                raise OrtloraError(BF16_ON_THE_OPENVINO_PLUGIN)
            self._ep, provider = "cpu", "cpu"  # --allow-fallback: the CPU provider runs the default graphs
        # With --precision bf16, OpenVINO's that keep fp32 where autocast does (openvino_precision.py);
        # bf16-all leaves every node to OpenVINO.
        as_autocast = provider == "openvino" and precision.runs == "bf16" and precision.asked == "bf16"
        if as_autocast and "portable_training_openvino_bf16_model" not in files:
            self.precision = precision = dataclasses.replace(
                precision, how=f"{precision.how}; but these artifacts predate the graphs that keep fp32 there, so "
                               "OpenVINO rounds every node it chooses, as with bf16-all (rebuild them)")
        own = ([f"{provider}_bf16"] if as_autocast else []) + ([provider] if provider in OWN_GRAPHS else [])
        self._roles = {role: next((files[f"{role}_{kind}_model"] for kind in own if f"{role}_{kind}_model" in files),
                                  files[f"{role}_model"]) for role in ("portable_training", "portable_eval")}
        # An int8 / int4 base's graphs for OpenVINO multiply by compressed matrices (openvino_quantized.py): they reach
        # it as written, since ONNX Runtime's graph optimizations would turn each dequantization into a float32 copy.
        self._compressed = provider == "openvino" and base in ("int8", "int4") \
            and self._roles["portable_training"] != files["portable_training_model"]
        self._train = self._session("portable_training", profile=True)
        self.providers = self._train.get_providers()  # what runs, not what was asked for (--allow-fallback)
        # How it runs (a plugin's package and device; '' otherwise), whether the CPU took over, the options it got.
        target = self._train.target
        self.route, self.fell_back, self.ep_options = target.route if target else "", \
            self._train.fell_back or self._ep != ep, self._train.ep_options
        if self.fell_back and self.precision.provider_options:  # bf16 was the provider's (OpenVINO's hint)
            self.precision = Precision(self.precision.asked, "fp32",
                                       f"fp32 products: the CPU provider took over from {ep} (--allow-fallback)")
        self.placement: dict[str, int] | None = None  # provider -> nodes run, known after the first step
        self._eval = None  # created on first use: many runs evaluate only at the end
        self._binding = self._train.io_binding()
        loss, *grads = manifest.io["portable_training"]["outputs"]  # loss, then one gradient per parameter
        self._binding.bind_output(loss, "cpu", 0, np.float32, [], self._loss.ctypes.data)
        for name, output in zip(self.names, grads):
            buffer = self._step_grads[name]
            self._binding.bind_output(output, "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)

    def _session(self, role: str, profile: bool = False):
        """The session of ``role``'s graph on --ep; where the provider has a graph of its own and the CPU provider
        takes over (--allow-fallback), the CPU runs the default graph (an int4 base's OpenVINO graph it cannot load,
        ggml's that computes the ignored rows too)."""
        options = self._ort.SessionOptions()
        options.log_severity_level = 3
        # The frozen weights come from one mapping of frozen_weights.bin, with no pre-packed copies:
        # loads in about a second, and steps measured no slower (docs/performance.md).
        self._frozen_values += share_with(options, self._frozen)
        # ONNX Runtime's memory pattern plans one block per input shape for the whole graph; for the
        # training graph it came out far larger than the tensors alive at once (0.5B shape: peak
        # 4.76 GB with it, 3.43 GB without, steps no slower; docs/performance.md).
        options.enable_mem_pattern = False
        if self._threads:
            options.intra_op_num_threads = self._threads
        apply_precision(options, self.precision)
        if self._compressed:
            options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if profile:  # the first step's profile tells which provider ran each node
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"ortlora-profile-{os.getpid()}")
        path = onnx_file(self._artifacts, self._roles[role])
        default = onnx_file(self._artifacts, self._files[f"{role}_model"])
        session = create_session(path, options, self._ep, self._allow_fallback, self.precision.provider_options,
                                 self._ep_options, compressed_weights=self._compressed,
                                 fallback=None if default == path else default)
        check_lora_inputs(session, self._manifest, path)  # every LoRA weight is fed to it, by name and shape
        self._settle(session)
        return session

    def train_step(self, batch: Batch) -> float:
        feeds = {name: np.ascontiguousarray(batch[name], dtype=np.int64) for name in self._inputs}
        for name, value in (*feeds.items(), *self._weights.items()):
            self._binding.bind_cpu_input(name, value)
        self._train.run_with_iobinding(self._binding)
        if self.placement is None:
            self.placement = _placement(self._train.end_profiling())  # also ends profiling
        for name, grad in self._step_grads.items():
            self._grads[name] += grad
        return float(self._loss)

    def eval_loss(self, batch: Batch) -> float:
        if self._eval is None:
            self._eval = self._session("portable_eval")
        feeds = {name: np.ascontiguousarray(batch[name], dtype=np.int64) for name in self._inputs}
        (loss,) = self._eval.run(["loss"], {**feeds, **self._weights})
        return float(loss)

    def _settle(self, session) -> None:
        """A provider that keeps copies of its own of the frozen weights (OpenVINO's CPU plugin, a GPU) reads
        frozen_weights.bin while it compiles and on its first run (OpenVINO repacks for bf16 products then), and
        after that only what it reads as stored. So its session runs once on two tokens when it is made, and the
        file's pages are released after (frozen.release_pages): the process then holds neither the file beside the
        copies, nor, at the first real step, the file beside its activations (0.5B, OpenVINO with --precision bf16-all:
        peak 8.5 GB with neither, 6.6 GB with the release alone, 5.5 GB with both; docs/performance.md). The CPU
        provider reads the file every step: for it there is nothing to settle."""
        if self._frozen_file is None or session.get_providers()[0] == CPU:
            return
        tokens = np.zeros((1, 2), np.int64)  # token 0, labelled: any vocabulary has it
        session.run(None, {**{name: tokens for name in self._inputs}, **self._weights})
        release_pages(self._frozen_file)

    def weights(self) -> dict[str, np.ndarray]:
        return {name: value.copy() for name, value in self._weights.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        for name, value in weights.items():
            np.copyto(self._weights[name], value)  # in place: the same buffers are bound every step

    def gradients(self) -> dict[str, np.ndarray]:
        return {name: grad.copy() for name, grad in self._grads.items()}

    def zero_grad(self) -> None:
        for grad in self._grads.values():
            grad.fill(0.0)


def _initial_weights(path: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The LoRA weights the build started from, by ONNX name, checked against the manifest."""
    tensors, problems = read_expected(path, {p.onnx_name: p.shape for p in manifest.parameters})  # header first
    if problems:
        raise OrtloraError(f"{path} does not match the manifest: {listing(problems)}; {REBUILD}")
    return {p.onnx_name: np.ascontiguousarray(tensors[p.onnx_name], dtype=np.float32) for p in manifest.parameters}


def _placement(profile_path: str) -> dict[str, int]:
    """How many nodes each execution provider ran, from an ONNX Runtime profile (then deleted)."""
    path = Path(profile_path)
    try:
        events = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    nodes: dict[str, set[str]] = {}
    for event in events:
        provider = event.get("args", {}).get("provider")
        if event.get("cat") == "Node" and provider:
            nodes.setdefault(provider, set()).add(event["name"].removesuffix("_kernel_time"))
    return {provider: len(names) for provider, names in sorted(nodes.items(), key=lambda kv: -len(kv[1]))}
