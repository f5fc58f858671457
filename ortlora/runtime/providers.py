"""Execution providers: --ep names, the options training needs, and sessions that run on the provider asked for.

ONNX Runtime's Python ``InferenceSession`` retries on the CPU provider alone when the provider it was
given fails to take a graph, printing an "EP Error ... Falling back" banner; the run then trains on the
CPU under the accelerator's name. Sessions made here do not retry on their own: a provider that cannot
run the graph is one line naming it and what it refused, and the CPU takes over only where the user
allows it (--allow-fallback). The CPU provider always stays in the list behind the accelerator, for the
nodes the accelerator does not take (ONNX Runtime's own partitioning).

Plugin providers (ONNX Runtime's execution-provider ABI, onnxruntime >= 1.23) come as packages of their own:
``onnxruntime-ep-NAME`` (webgpu, openvino, nv-tensorrt-rtx, mlx) and ``onnxruntime-ggml``. ``--ep NAME`` finds
the installed package, registers its library (``onnxruntime.register_execution_provider_library``) and
selects its device from ``onnxruntime.get_ep_devices()`` (``SessionOptions.add_provider_for_devices``);
``--ep NAME:gpu`` (or cpu, npu) picks the device where a plugin offers several; ``--ep webgpu:cpu`` also lets the
WebGPU plugin offer a CPU device where there is no GPU (Dawn on a software Vulkan driver such as Mesa's lavapipe).
A provider compiled into the installed onnxruntime (onnxruntime-openvino's OpenVINO) is preferred to a plugin of
the same name. A plugin that takes none of the graph's nodes is refused as a provider that fails is: ONNX Runtime
would run the whole graph on the CPU provider under the plugin's name.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
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
    # onnxruntime-ggml 0.2.0 keeps matrices as f16 by default: the tiny build's logits came out 2.8e-3 (relative)
    # from the CPU provider's, 1.9e-6 with weights=f32.
    "ggml": {"weights": "f32"},
}
# The option that carries the session's thread count to a provider that keeps its own threads
# (OpenVINO ignores intra_op_num_threads: 4-layer 0.5B cut, 1 thread 1,440 ms a step, 2 threads 745 ms).
THREADS_OPTION = {"openvino": "num_of_threads", "ggml": "threads"}
PLUGIN_PACKAGE = re.compile(r"onnxruntime[-_.](?:ep[-_.](.+)|(ggml))", re.IGNORECASE)
DEVICE_KINDS = ("gpu", "npu", "cpu")  # OrtHardwareDeviceType; without --ep NAME:KIND, the first a plugin offers
EP_SPELLING = re.compile(r"[a-z0-9][a-z0-9._-]*")
OPTION_KEY = re.compile(r"[A-Za-z0-9_.:-]+")
# Variables a plugin reads, set before it registers unless the user has set them. onnxruntime-ggml logs at info by
# default, and its own log lines are no more for users than ONNX Runtime's. Its Vulkan backend (--ep-option
# device=gpu, or auto where a GPU is found) multiplies in f16 on a device that has f16, weights=f32 or not: on Mesa's
# lavapipe, tiny model, one step, LoRA gradients 5.9e-3 (relative) off the CPU provider's; with
# GGML_VK_DISABLE_F16 set, 3.8e-6 and the loss 2.7e-7. Training graphs are fp32 on every provider.
PLUGIN_ENVIRONMENT = {"ggml": {"ORT_GGML_LOG": "error", "GGML_VK_DISABLE_F16": "1"}}
# Plugins that offer a CPU device only when a variable is set before registration, asked for with --ep NAME:cpu.
# onnxruntime-ep-webgpu 0.4.0 offers no device without a GPU; with the variable it offers one on the CPU, and Dawn
# then takes a software Vulkan adapter (Mesa's lavapipe 25.0; lavapipe 22.3 lacks
# shaderSampledImageArrayDynamicIndexing, and Dawn finds "No supported adapters"): far slower than the CPU provider.
PLUGIN_SOFTWARE_DEVICE = {"webgpu": ("ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER", "1", "a software Vulkan device such as "
                                     "Mesa's lavapipe, slow")}
# Plugins whose nodes ONNX Runtime's graph assignment info leaves out before a version (WebGPU's kernels, not a
# compiled subgraph: onnxruntime 1.30.0 listed only the CPU provider's 188 nodes of the tiny training graph,
# 1.31.1 also WebGPU's 510). There "took none" cannot be told from "not recorded".
NODES_RECORDED_SINCE = {"webgpu": (1, 31)}
# Compiled-in providers whose library links CUDA and cuDNN. onnxruntime-gpu (1.21+) finds them in the nvidia-*
# packages beside it (pip install onnxruntime-gpu[cuda,cudnn], or PyTorch's) only when told to, with
# onnxruntime.preload_dlls(), which PyTorch's import otherwise does: onnxruntime-gpu 1.31.1 with the CUDA 13 packages
# beside it, no preload: "libcublasLt.so.13: cannot open shared object file".
NEEDS_CUDA_LIBRARIES = ("cuda", "tensorrt")


def short_name(provider: str) -> str:
    """``CPUExecutionProvider`` -> ``cpu``, as --ep spells it."""
    return {v: k for k, v in PROVIDERS.items()}.get(provider, provider)


class NoDevice(OrtloraError):
    """A plugin provider that is installed and registers, but offers no device (of the kind asked) here."""


@dataclass(frozen=True)
class Plugin:
    """An installed plugin provider package; ``name`` is what --ep calls it."""
    name: str
    package: str
    version: str
    module: str


@dataclass(frozen=True)
class Target:
    """What --ep selects: a provider compiled into onnxruntime, or a plugin's provider on its devices."""
    name: str  # as --ep names it, without the device
    provider: str  # ONNX Runtime's name for it (get_providers(), profiles)
    plugin: Plugin | None = None
    devices: tuple = ()  # the plugin's OrtEpDevice entries it runs on

    @property
    def route(self) -> str:
        """How it runs, for the run's header and summary: '' for a compiled-in provider."""
        if not self.plugin:
            return ""
        kinds = sorted({_kind(d) for d in self.devices})
        return f"plugin {self.plugin.package} {self.plugin.version} on its {'/'.join(k.upper() for k in kinds)} device"


def parse_ep(ep: str) -> tuple[str, str | None]:
    """--ep NAME or NAME:KIND (a plugin's device of that kind: cpu, gpu, npu)."""
    name, _, kind = ep.partition(":")
    if not EP_SPELLING.fullmatch(name) or ":" in ep and kind not in DEVICE_KINDS:
        raise OrtloraError(f"--ep {ep!r} must be a provider's name (cpu, cuda, openvino, ggml, ...) or NAME:KIND for a "
                           f"plugin's device, KIND one of {', '.join(DEVICE_KINDS)}")
    return name, kind or None


def parse_ep_options(pairs: list[str] | None, flag: str = "--ep-option") -> dict[str, str] | None:
    """``KEY=VALUE`` strings -> options for --ep's provider (None when none); a malformed or repeated pair is one
    line. A value may hold '=' (OpenVINO's load_config is JSON)."""
    if not pairs:
        return None
    options: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not OPTION_KEY.fullmatch(key):
            raise OrtloraError(f"{flag} {pair!r} must be KEY=VALUE (KEY of letters, digits and _.:-), as in "
                               f"{flag} weights=f16")
        if key in options:
            raise OrtloraError(f"{flag} gives {key} twice ({options[key]!r} and {value!r}); keep one")
        options[key] = value
    return options


@functools.cache
def plugins() -> dict[str, Plugin]:
    """Installed plugin provider packages, by --ep name (onnxruntime-ep-webgpu: webgpu; onnxruntime-ggml: ggml)."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        package = dist.metadata["Name"] or ""
        match = PLUGIN_PACKAGE.fullmatch(package)
        if match:
            name = (match.group(1) or match.group(2)).lower().replace("_", "-").replace(".", "-")
            module = ((dist.read_text("top_level.txt") or "").split() or [package.replace("-", "_").replace(".", "_")])[0]
            found[name] = Plugin(name, package, dist.version, module)
    return found


def _kind(device) -> str:
    return device.device.type.name.lower()


_REGISTERED: set[str] = set()


def _plugin_target(plugin: Plugin, ep: str, kind: str | None) -> Target:
    """Register ``plugin``'s library (once per process) and select its devices."""
    import onnxruntime

    what = f"{plugin.package} {plugin.version}"
    if not hasattr(onnxruntime, "register_execution_provider_library"):
        raise OrtloraError(f"execution provider {plugin.name} comes from the plugin package {what}, and plugins need "
                           f"onnxruntime 1.23 or later (this is {onnxruntime.__version__}, "
                           f"{'a training build' if hasattr(onnxruntime, 'training') else 'too old'}): install the "
                           "plain onnxruntime in its place, or train with --ep cpu")
    try:
        module = importlib.import_module(plugin.module)
        library = module.get_library_path() if hasattr(module, "get_library_path") else module.library_path()
        names = list(module.get_ep_names() if hasattr(module, "get_ep_names") else
                     [getattr(module, "EP_NAME", None) or module.get_ep_name()])
    except Exception as e:  # noqa: BLE001 -- a broken install, said in one line
        raise OrtloraError(f"execution provider {plugin.name}: {what} is installed but could not be loaded "
                           f"({type(e).__name__}: {str(e)[:200]}); reinstall it, or train with --ep cpu") from None
    if names[0] not in _REGISTERED:
        for variable, value in PLUGIN_ENVIRONMENT.get(plugin.name, {}).items():
            os.environ.setdefault(variable, value)
        if kind == "cpu" and plugin.name in PLUGIN_SOFTWARE_DEVICE:  # read when the library registers
            variable, value, _ = PLUGIN_SOFTWARE_DEVICE[plugin.name]
            os.environ[variable] = value
        try:
            onnxruntime.register_execution_provider_library(names[0], library)
        except Exception as e:  # noqa: BLE001
            if "already registered" not in str(e):  # by the plugin's own helper, in this process
                from ortlora.runtime.backend import ort_message

                raise OrtloraError(f"execution provider {plugin.name}: ONNX Runtime {onnxruntime.__version__} could "
                                   f"not register {what}'s library: {ort_message(e)}") from None
        _REGISTERED.add(names[0])
    listed = onnxruntime.get_ep_devices()
    offered = [d for d in listed if d.ep_name in names]
    if kind:
        chosen = [d for d in offered if _kind(d) == kind]
    else:
        kinds = {_kind(d) for d in offered}
        kind = next((k for k in DEVICE_KINDS if k in kinds), None)
        chosen = [d for d in offered if _kind(d) == kind]
    if not chosen:
        others = ", ".join(sorted({d.ep_name for d in listed if d.ep_name not in names})) or "none"
        has = ", ".join(sorted({_kind(d) for d in offered}))
        software = PLUGIN_SOFTWARE_DEVICE.get(plugin.name)
        raise NoDevice(f"execution provider {ep}: {what} is installed and registered, but offers "
                       + (f"no {kind} device on this machine (only {has})" if offered else
                          f"no device on this machine (ONNX Runtime's get_ep_devices() lists {others} only)")
                       + "; train with --ep cpu" + (f", or --ep {plugin.name}:{sorted({_kind(d) for d in offered})[0]}"
                                                   if offered else
                                                   f", or --ep {plugin.name}:cpu for {software[2]}"
                                                   if software and kind != "cpu" else ""))
    provider = chosen[0].ep_name
    return Target(plugin.name, provider, plugin, tuple(d for d in chosen if d.ep_name == provider))


@functools.cache
def _preload_cuda_libraries() -> None:
    """onnxruntime.preload_dlls() once per process, quietly: a library it cannot load is said, once, if ONNX Runtime
    then leaves the provider out of a session (_why_left_out)."""
    import onnxruntime

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), contextlib.suppress(Exception):
        warnings.simplefilter("ignore")
        onnxruntime.preload_dlls(msvc=False)


def resolve(ep: str) -> Target:
    """What --ep selects here, or one line saying why it cannot be had."""
    import onnxruntime

    name, kind = parse_ep(ep)
    compiled = [p for p in onnxruntime.get_available_providers() if p not in _REGISTERED]  # registered plugins show
    if name in PROVIDERS and PROVIDERS[name] in compiled and (kind is None or name == "cpu" and kind == "cpu"):
        if name in NEEDS_CUDA_LIBRARIES and hasattr(onnxruntime, "preload_dlls"):
            _preload_cuda_libraries()
        return Target(name, PROVIDERS[name])
    found = plugins()
    if name in found:
        return _plugin_target(found[name], ep, kind)
    names = ", ".join(short_name(p) for p in compiled) + \
        "".join(f"; installed plugins: {', '.join(f'{p} ({found[p].package})' for p in sorted(found))}" if found else "")
    if kind and name in PROVIDERS and PROVIDERS[name] in compiled:
        raise OrtloraError(f"--ep {ep}: {name} is compiled into this onnxruntime, not a plugin, and picks its device by "
                           f"its own options: pass --ep {name}")
    if name not in PROVIDERS:
        raise OrtloraError(f"unknown execution provider {name!r} (a plugin provider is a package of its own: pip "
                           f"install onnxruntime-ep-{name}); this onnxruntime has: {names}")
    hint = (" (install onnxruntime-gpu, or onnxruntime-training for the training API, in place of the CPU package)"
            if name == "cuda" else f" (nor is a plugin package for it installed: onnxruntime-ep-{name})"
            if name in ("webgpu", "openvino") else "")
    raise OrtloraError(f"execution provider {name} is not available{hint}; this onnxruntime has: {names}")


def check_provider(ep: str) -> str:
    """Map --ep to an ORT provider name, or raise naming the providers there are."""
    return resolve(ep).provider


def options_for(target: Target, threads: int = 0, extra: dict | None = None, user: dict | None = None,
                compressed_weights: bool = False) -> dict[str, str]:
    """The accelerator's options: ours for training (fp32), the thread count, ``extra`` (precision.py's), then the
    user's (--ep-option), each over the one before. ``compressed_weights``: the graph multiplies by int8 / int4
    matrices (openvino_quantized.py), which OpenVINO must not pair with 8-bit activations."""
    options = dict(PROVIDER_OPTIONS.get(target.name, {}))
    if target.plugin and target.name == "openvino":
        # The plugin's device is chosen by device, not device_type. onnxruntime-ep-openvino 1.8.1 computed in bf16
        # on an Intel Xeon with AMX with precision FP32 (loss 1.8e-3 off the CPU provider's); OpenVINO's own f32
        # hint gave the CPU provider's loss to the digit.
        options.pop("device_type")
        kind = _kind(target.devices[0]).upper()
        options["load_config"] = json.dumps({kind: {"INFERENCE_PRECISION_HINT": "f32"}})
    if threads > 0 and target.name in THREADS_OPTION:
        options[THREADS_OPTION[target.name]] = str(threads)
    options.update(extra or {})
    if compressed_weights and target.name == "openvino":
        options["load_config"] = _without_dynamic_quantization(options.get("load_config"), options.get("device_type", "CPU"))
    return {**options, **(user or {})}


def _without_dynamic_quantization(load_config: str | None, device: str) -> str:
    """OpenVINO's load_config with DYNAMIC_QUANTIZATION_GROUP_SIZE 0 for each device it configures (``device`` where
    it configures none). OpenVINO's CPU plugin quantizes the activations of a product by a compressed matrix to
    8 bits in groups by default, also under its f32 precision hint: loss and gradients then come out about 5e-3
    off (4-layer cut of the 0.5B shape, int4 base), and 4e-6 with it off."""
    config = json.loads(load_config) if load_config else {device: {}}
    for properties in config.values():
        properties.setdefault("DYNAMIC_QUANTIZATION_GROUP_SIZE", "0")
    return json.dumps(config)


def session_providers(ep: str, threads: int = 0, extra: dict | None = None) -> tuple[list[str], list[dict]]:
    """Providers and their options for an InferenceSession on a compiled-in --ep: the accelerator, then the CPU.
    ``extra``: options of the accelerator's on top of ours (precision.py's)."""
    target = resolve(ep)
    if target.provider == CPU:
        return [CPU], [{}]
    return [target.provider, CPU], [options_for(target, threads, extra), {}]


@functools.cache
def _strict_session_class():
    import onnxruntime as ort

    class StrictSession(ort.InferenceSession):
        """An InferenceSession that raises where ONNX Runtime would retry on the CPU provider alone."""

        def _create_inference_session(self, *args, **kwargs):
            self._enable_fallback = False
            return super()._create_inference_session(*args, **kwargs)

    return StrictSession


def _nodes_taken(session, provider: str) -> tuple[int, int]:
    """Nodes ``provider`` was given, of all the graph's (session.record_ep_graph_assignment_info)."""
    assigned = session.get_provider_graph_assignment_info()
    total = sum(len(sub.get_nodes()) for sub in assigned)
    return sum(len(sub.get_nodes()) for sub in assigned if sub.ep_name == provider), total


def _took_none(target: Target, total: int) -> str:
    """Why a plugin that ONNX Runtime lists no node of is refused: it took none, or this onnxruntime does not say."""
    import onnxruntime

    since = NODES_RECORDED_SINCE.get(target.name)
    if since and tuple(int(n) for n in re.findall(r"\d+", onnxruntime.__version__)[:2]) < since:
        wanted = ".".join(map(str, since))
        return (f"onnxruntime {onnxruntime.__version__} does not report the nodes {target.plugin.package} runs "
                f"({wanted} does), so ortlora cannot tell whether it took any: install onnxruntime>={wanted} beside it")
    return f"it took none of its {total} nodes (ONNX Runtime would run them all on the CPU provider)"


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


ORT_LOG_LINE = re.compile(r"\[([EW]):onnxruntime:[^\]]*\]\s*(.*)")
LIBRARY_FAILED = re.compile(r"Failed to load library (\S+) with error: (.*)")


def left_out_reason(log: str, provider: str) -> str:
    """Why ONNX Runtime left the compiled-in ``provider`` out of a session, from its log: its first error, else its
    first warning that names the provider; e.g. "its library libonnxruntime_providers_cuda.so did not load:
    libcublasLt.so.13: cannot open shared object file"; "" when the log says nothing of it."""
    lines = [(m.group(1), m.group(2)) for m in map(ORT_LOG_LINE.search, re.sub(r"\x1b\[[0-9;]*m", "", log).splitlines())
             if m]
    said = [text for level, text in lines if level == "E"] or [text for level, text in lines if provider in text]
    if not said:
        return ""
    failed = LIBRARY_FAILED.search(said[0])
    if failed:
        return f"its library {Path(failed.group(1)).name} did not load: {failed.group(2).strip()}"
    from ortlora.runtime.backend import ort_message

    return ort_message(RuntimeError(said[0]))[:300]


@contextlib.contextmanager
def _stderr_into(file):
    """File descriptor 2 (where ONNX Runtime's C++ logger writes) into ``file`` for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _why_left_out(path: Path, options, target: Target, given: dict) -> str:
    """Make the session again with ONNX Runtime's log on, caught, and say what it logged or warned of the provider (a
    library that did not load, a device it could not open, a name it does not have). Only on the way to a refusal:
    it loads the graph once more."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(2)
    options.log_severity_level = 2
    try:
        with tempfile.TemporaryFile("w+") as log, warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            with _stderr_into(log), contextlib.suppress(Exception):
                _strict_session_class()(str(path), options, providers=[target.provider, CPU],
                                        provider_options=[given, {}])
            log.seek(0)
            warning = " ".join(" ".join(str(w.message) for w in warned).split())[:300]
            reason = left_out_reason(log.read(), target.provider) or warning
    finally:
        onnxruntime.set_default_logger_severity(4)
        options.log_severity_level = 4
    if target.name in NEEDS_CUDA_LIBRARIES and "did not load" in reason and "libcuda.so" not in reason:
        reason += (" (onnxruntime-gpu finds CUDA and cuDNN in the nvidia-* packages beside it, pip install "
                   "'onnxruntime-gpu[cuda,cudnn]', or on LD_LIBRARY_PATH)")
    return reason or "ONNX Runtime left it out of the session"


TRAINING_ADVICE = "train with --ep cpu, or pass --allow-fallback to let the CPU run it"


def create_session(path: Path, options, ep: str, allow_fallback: bool = False, provider_options: dict | None = None,
                   ep_options: dict | None = None, advice: str = TRAINING_ADVICE, compressed_weights: bool = False,
                   fallback: Path | None = None):
    """An InferenceSession of ``path`` on --ep, the CPU provider behind it for what it does not take.

    A provider that refuses the graph (or, a plugin, takes none of it, or offers no device) is one line naming it
    and what it refused, unless ``allow_fallback``: then the session runs on the CPU provider, and
    ``get_providers()`` says so. ``provider_options``: ours on top of the defaults (precision.py's);
    ``ep_options``: the user's (--ep-option), on top of all. The session carries ``target`` (what was selected,
    None after a fallback), ``fell_back`` and ``ep_options`` (what the accelerator was given). ``advice`` ends the
    one-line refusal: what the user can do instead. ``compressed_weights``: see options_for. ``fallback``: the
    graph the CPU provider runs instead where ``path`` is the provider's own (loaded with full optimization).
    """
    import onnxruntime

    from ortlora.runtime.backend import loading, ort_message

    # ONNX Runtime's own log lines (a provider's warnings, its errors before it raises) are not for
    # users: what fails comes back as an exception, said here in one line.
    onnxruntime.set_default_logger_severity(4)
    options.log_severity_level = 4
    session_class = _strict_session_class()
    try:
        target = resolve(ep)
    except NoDevice:
        if not allow_fallback:
            raise
        target = None
    if target is not None and target.provider == CPU:
        with loading(path):
            return _tagged(session_class(str(path), options, providers=[CPU]), target, {})
    given = {} if target is None else options_for(target, options.intra_op_num_threads, provider_options, ep_options,
                                                 compressed_weights)
    refusal, session, left_out = "ONNX Runtime offers it no device here", None, False
    if target is not None:
        try:
            if target.plugin:
                options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
                options.add_provider_for_devices(list(target.devices), given)
                session = session_class(str(path), options)
                taken, total = _nodes_taken(session, target.provider)
                refusal = "" if taken else _took_none(target, total)
            else:
                with warnings.catch_warnings():  # "not in available provider names": said by _why_left_out
                    warnings.simplefilter("ignore", UserWarning)
                    session = session_class(str(path), options, providers=[target.provider, CPU],
                                            provider_options=[given, {}])
                left_out = target.provider not in session.get_providers()
                refusal = "left out" if left_out else ""
        except Exception as e:  # noqa: BLE001 -- told apart below: the file's fault or the provider's
            refusal, session = ort_message(e), None
    if not refusal:
        return _tagged(session, target, given)
    if fallback is not None:
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    cpu_path = fallback or path
    with loading(cpu_path), warnings.catch_warnings():  # the CPU alone fails too: the file is at fault, and says so
        warnings.simplefilter("ignore", UserWarning)  # "providers given, and the options have a plugin's": ours win
        cpu_session = session_class(str(cpu_path), options, providers=[CPU])
    if allow_fallback:
        return _tagged(cpu_session, None, {}, fell_back=True)
    if left_out:
        reason = _why_left_out(path, options, target, given)
        raise OrtloraError(f"execution provider {ep} cannot run {path.name}: {reason}; {advice}")
    node, reason = refused_node(refusal)
    raise OrtloraError(f"execution provider {ep} cannot run {path.name}: " + (f"it refused node {node} ({reason})"
                       if node else reason) + f"; {advice}")


def _tagged(session, target: Target | None, given: dict, fell_back: bool = False):
    session.target, session.fell_back, session.ep_options = target, fell_back, given
    return session
