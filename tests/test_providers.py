"""A run gets the execution provider it asked for, or is told in one line; the CPU takes over only when allowed."""

from __future__ import annotations

import onnxruntime
import pytest

from ortlora.runtime import cli as train_cli
from ortlora.runtime import providers
from ortlora.runtime.providers import left_out_reason, refused_node


@pytest.fixture
def phantom_openvino(monkeypatch):
    """onnxruntime claims the OpenVINO provider, which it cannot create: ONNX Runtime then leaves it out
    of the session (and would, by itself, go on with the CPU alone)."""
    available = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [*available, "OpenVINOExecutionProvider"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ONNX Runtime's own "not in available provider names"
        yield


def run(artifacts, out, *extra) -> int:
    return train_cli.main(["--artifacts", str(artifacts), "--out", str(out), "--ep", "openvino", "--max-steps", "2",
                           "--no-progress", "--no-plot", *extra])


def test_a_provider_that_cannot_run_the_graph_stops_the_run_in_one_line(artifacts, tmp_path, capsys, phantom_openvino):
    assert run(artifacts, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: execution provider openvino cannot run portable_training.onnx") and err.count("\n") == 1
    assert "--ep cpu" in err and "--allow-fallback" in err
    # what ONNX Runtime said of it (here its Python side's warning), not only that it was left out
    assert "'OpenVINOExecutionProvider' is not in available provider names" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_the_cpu_takes_over_only_when_allowed_and_the_header_says_so(artifacts, tmp_path, capsys, phantom_openvino):
    assert run(artifacts, tmp_path / "run", "--allow-fallback") == 0
    out = capsys.readouterr().out
    assert "backend ort-session on cpu in fp32," in out
    assert "openvino cannot run the training graph; the CPU provider runs it (--allow-fallback)" in out


def test_the_refused_node_is_named():
    message = ("While validating ONNX node '<Node(ScatterND): /model/layers.1/GatherGrad_1/portable_8>': "
               "Unsupported value of attribute: `reduction`")
    assert refused_node(message) == ("ScatterND /model/layers.1/GatherGrad_1/portable_8",
                                     "Unsupported value of attribute: `reduction`")
    assert refused_node("something else went wrong") == ("", "something else went wrong")
    webgpu = ("Exception during initialization: )>::<lambda(wgpu::RequestAdapterStatus, wgpu::Adapter)> status == "
              "wgpu::RequestAdapterStatus::Success was false. Failed to get a WebGPU adapter: No supported adapters")
    assert refused_node(webgpu) == ("", "Failed to get a WebGPU adapter: No supported adapters")


# onnxruntime-gpu 1.31.1 (CUDA 13) leaving CUDA out of a session where the CUDA libraries are not found: what its log
# said (log_severity_level 2; the first line stands for one per LoRA weight, colours as ONNX Runtime writes them).
CUDA_LEFT_OUT_LOG = (
    "\x1b[0;93m2026-12-07 07:26:24.228 [W:onnxruntime:, graph.cc:1462 Graph] Initializer "
    "model.layers.0.self_attn.q_proj.lora_A.weight appears in graph inputs and will not be treated as constant "
    "value/weight.\x1b[m\n"
    "\x1b[1;31m2026-12-07 07:26:24.271 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "/env/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open "
    "shared object file: No such file or directory\x1b[m\n"
    "\x1b[0;93m2026-12-07 07:26:24.271 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*. "
    "Please install all dependencies as mentioned in the GPU requirements page, make sure they're in the PATH, and "
    "that your GPU is supported.\x1b[m\n")


def test_why_a_compiled_in_provider_was_left_out_is_read_from_onnx_runtimes_log():
    assert left_out_reason(CUDA_LEFT_OUT_LOG, "CUDAExecutionProvider") == (
        "its library libonnxruntime_providers_cuda.so did not load: libcublasLt.so.13: cannot open shared object "
        "file: No such file or directory")
    warnings_only = "\n".join(line for line in CUDA_LEFT_OUT_LOG.splitlines() if "[E:" not in line)
    assert left_out_reason(warnings_only, "CUDAExecutionProvider").startswith("Failed to create CUDAExecutionProvider")
    unrelated = CUDA_LEFT_OUT_LOG.splitlines()[0]  # a warning of the graph's, none of the provider's
    assert left_out_reason(unrelated, "CUDAExecutionProvider") == ""


def test_onnx_runtimes_log_is_caught_from_file_descriptor_2(tmp_path):
    import os

    with open(tmp_path / "log", "w+") as log:
        with providers._stderr_into(log):
            os.write(2, b"[E:onnxruntime:Default, x.cc:1 f] written by C++\n")
        log.seek(0)
        assert log.read() == "[E:onnxruntime:Default, x.cc:1 f] written by C++\n"
    os.write(2, b"")  # file descriptor 2 is the terminal's again, still open


def test_cuda_has_its_libraries_preloaded_once(monkeypatch, capsys):
    """onnxruntime-gpu finds the CUDA and cuDNN of the nvidia-* packages beside it only through preload_dlls()."""
    calls = []

    def preload_dlls(**kwargs):
        calls.append(kwargs)
        print("Failed to load libcudnn.so.9")  # what onnxruntime prints of a library it cannot load

    available = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    monkeypatch.setattr(onnxruntime, "preload_dlls", preload_dlls, raising=False)
    providers._preload_cuda_libraries.cache_clear()
    try:
        assert providers.resolve("cpu").provider == "CPUExecutionProvider" and calls == []
        assert providers.resolve("cuda").provider == "CUDAExecutionProvider"
        assert providers.resolve("cuda").provider == "CUDAExecutionProvider"
        assert calls == [{"msvc": False}]
        assert capsys.readouterr().out == ""
    finally:
        providers._preload_cuda_libraries.cache_clear()
