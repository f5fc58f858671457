"""A run gets the execution provider it asked for, or is told in one line; the CPU takes over only when allowed."""

from __future__ import annotations

import onnxruntime
import pytest

from ortlora.runtime import cli as train_cli
from ortlora.runtime.providers import refused_node


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
