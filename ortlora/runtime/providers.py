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

# Provider options for training graphs. OpenVINO's CPU plugin computes in bf16 on CPUs that have it
# unless told otherwise: gradients must be fp32, as they are on every other provider.
PROVIDER_OPTIONS = {
    "openvino": {"device_type": "CPU", "precision": "FP32"},
}


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


def session_providers(ep: str) -> tuple[list[str], list[dict]]:
    """Providers and their options for an InferenceSession on --ep: the accelerator, then the CPU."""
    provider = check_provider(ep)
    if provider == CPU:
        return [CPU], [{}]
    return [provider, CPU], [dict(PROVIDER_OPTIONS.get(ep, {})), {}]


@functools.cache
def _strict_session_class():
    import onnxruntime as ort

    class StrictSession(ort.InferenceSession):
        """An InferenceSession that raises where ONNX Runtime would retry on the CPU provider alone."""

        def _create_inference_session(self, *args, **kwargs):
            self._enable_fallback = False
            return super()._create_inference_session(*args, **kwargs)

    return StrictSession


def refused_node(message: str) -> str:
    """The node a provider's error names (``ScatterND /model/.../portable_8``), or "" when it names none."""
    match = re.search(r"Node\((\w+)\): ([^>'\"]+)", message) or re.search(r"node (\S+) \((\w+)\)", message)
    return " ".join(match.groups()) if match else ""


def create_session(path: Path, options, ep: str, allow_fallback: bool = False):
    """An InferenceSession of ``path`` on --ep, the CPU provider behind it for what it does not take.

    A provider that refuses the graph is one line naming it and the node it refused, unless
    ``allow_fallback``: then the session runs on the CPU provider, and ``get_providers()`` says so.
    """
    from ortlora.runtime.backend import loading, ort_message

    providers, provider_options = session_providers(ep)
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
    node = refused_node(refusal)
    raise OrtloraError(f"execution provider {ep} cannot run {path.name}" + (f" (it refused node {node})" if node else "")
                       + f": {refusal[:300]}; train with --ep cpu, or pass --allow-fallback to let the CPU run it")
