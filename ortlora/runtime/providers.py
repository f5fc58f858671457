"""Execution providers: --ep names, the options training needs, and sessions that run on the provider asked for.

ONNX Runtime's Python ``InferenceSession`` retries on the CPU provider alone when the provider it was
given fails to take a graph, printing an "EP Error ... Falling back" banner; the run then trains on the
CPU under the accelerator's name. Sessions made here do not retry on their own: a provider that cannot
run the graph is one line naming it and what it refused, and the CPU takes over only where the user
allows it (--allow-fallback). The CPU provider always stays in the list behind the accelerator, for the
nodes the accelerator does not take (ONNX Runtime's own partitioning).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from ortlora.errors import OrtloraError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
CPU = PROVIDERS["cpu"]

# Provider options for training graphs. Gradients must be fp32 on every provider: OpenVINO's provider
# defaults its GPU device to FP16 (its CPU device to FP32), so the precision is pinned either way.
PROVIDER_OPTIONS = {
    "openvino": {"device_type": "CPU", "precision": "FP32"},
}
# The option that carries the session's thread count to a provider that keeps its own threads
# (OpenVINO ignores intra_op_num_threads: 4-layer 0.5B cut, 1 thread 1,440 ms a step, 2 threads 745 ms).
THREADS_OPTION = {"openvino": "num_of_threads"}


def short_name(provider: str) -> str:
    """``CPUExecutionProvider`` -> ``cpu``, as --ep spells it."""
    return {v: k for k, v in PROVIDERS.items()}.get(provider, provider)


def check_provider(ep: str) -> str:
    """Map --ep to an ORT provider name, or raise naming the providers this onnxruntime has."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    names = ", ".join(short_name(p) for p in available)
    if ep not in PROVIDERS:
        raise OrtloraError(f"unknown execution provider {ep!r}; this onnxruntime has: {names}")
    if PROVIDERS[ep] not in available:
        hint = (" (install onnxruntime-gpu, or onnxruntime-training for the training API, in place of the CPU package)"
                if ep == "cuda" else "")
        raise OrtloraError(f"execution provider {ep} is not available{hint}; this onnxruntime has: {names}")
    return PROVIDERS[ep]


def session_providers(ep: str, threads: int = 0, extra: dict | None = None) -> tuple[list[str], list[dict]]:
    """Providers and their options for an InferenceSession on --ep: the accelerator, then the CPU. ``extra``:
    options of the accelerator's on top of ours (precision.py's)."""
    provider = check_provider(ep)
    if provider == CPU:
        return [CPU], [{}]
    options = {**PROVIDER_OPTIONS.get(ep, {}), **(extra or {})}
    if threads > 0 and ep in THREADS_OPTION:
        options[THREADS_OPTION[ep]] = str(threads)
    return [provider, CPU], [options, {}]


@functools.cache
def _strict_session_class():
    import onnxruntime as ort

    class StrictSession(ort.InferenceSession):
        """An InferenceSession that raises where ONNX Runtime would retry on the CPU provider alone."""

        def _create_inference_session(self, *args, **kwargs):
            self._enable_fallback = False
            return super()._create_inference_session(*args, **kwargs)

    return StrictSession


NODE_IN_ERROR = re.compile(r"Node\((\w+)\): ([^>'\"]+)>?'?:?")  # OpenVINO's ONNX reader: <Node(OpType): name>


def refused_node(message: str) -> tuple[str, str]:
    """The node a provider's error names (``ScatterND /model/.../portable_8``) and what it says of it;
    ("", the message's end) when it names none."""
    match = NODE_IN_ERROR.search(message)
    if not match:  # the last sentences that are not C++ (ONNX Runtime's messages end with the cause)
        plain = [part for part in re.split(r"(?<=\.)\s+", message) if "::" not in part and part]
        return "", " ".join(plain[-2:])[-200:] or message[-200:]
    reason = message[match.end():].split(" Check '")[0].strip()
    return " ".join(match.groups()), reason[:200]


def create_session(path: Path, options, ep: str, allow_fallback: bool = False, provider_options: dict | None = None):
    """An InferenceSession of ``path`` on --ep, the CPU provider behind it for what it does not take.

    A provider that refuses the graph is one line naming it and the node it refused, unless
    ``allow_fallback``: then the session runs on the CPU provider, and ``get_providers()`` says so.
    ``provider_options``: the accelerator's options on top of ours.
    """
    import onnxruntime

    from ortlora.runtime.backend import loading, ort_message

    # ONNX Runtime's own log lines (a provider's warnings, its errors before it raises) are not for
    # users: what fails comes back as an exception, said here in one line.
    onnxruntime.set_default_logger_severity(4)
    options.log_severity_level = 4
    providers, provider_options = session_providers(ep, options.intra_op_num_threads, provider_options)
    session_class = _strict_session_class()
    if providers == [CPU]:
        with loading(path):
            return session_class(str(path), options, providers=providers)
    try:
        session = session_class(str(path), options, providers=providers, provider_options=provider_options)
        refusal = "" if providers[0] in session.get_providers() else "ONNX Runtime left it out of the session"
    except Exception as e:  # noqa: BLE001 -- told apart below: the file's fault or the provider's
        refusal, session = ort_message(e), None
    if not refusal:
        return session
    with loading(path):  # the CPU alone fails too: the file is at fault, and says so
        cpu_session = session_class(str(path), options, providers=[CPU])
    if allow_fallback:
        return cpu_session
    node, reason = refused_node(refusal)
    raise OrtloraError(f"execution provider {ep} cannot run {path.name}: " + (f"it refused node {node} ({reason})"
                       if node else reason) + "; train with --ep cpu, or pass --allow-fallback to let the CPU run it")
