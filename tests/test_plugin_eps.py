"""Plugin execution providers (ONNX Runtime's EP ABI): packages of their own, registered and selected by device.

Each plugin needs the plain onnxruntime (1.23 or later), so each lives in an environment of its own and runs
here as a subprocess, as onnxruntime-openvino does in test_openvino.py: .venv-ggml (onnxruntime-ggml 0.2.0 on
onnxruntime 1.30) and .venv-ep-ov (onnxruntime-ep-openvino 1.8.1 on onnxruntime 1.30). What was seen with them
(docs/providers.md, "Plugin providers"):
- ggml registers a CPU device and takes the whole inference graph. It lacks NonZero and LogSoftmax, which the
  portable training and evaluation graphs use, so a build also writes them without (dense_loss.py), and ggml
  takes those whole, with the CPU provider's loss and gradients. Where a build has none (label smoothing) it
  takes none of the graphs; its partial=1 option claims the rest as one group, which ONNX Runtime 1.30 rejects,
  so --ep ggml is refused in one line. It takes none of the generation graph (Tile, OneHot).
- the OpenVINO plugin offers a CPU device on an Intel Xeon and none on an AMD EPYC: each case is checked where
  it is the machine's.
- the WebGPU plugin (onnxruntime-ep-webgpu 0.4.0, Dawn on Vulkan) offers no device without a GPU; --ep webgpu:cpu
  sets its ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER, and Dawn then runs on Mesa's lavapipe (25.0; not 22.3). It needs
  onnxruntime 1.31 or later (.venv-webgpu) to report its nodes.
Without the environments, the rules are checked here against a stand-in plugin that offers no device.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ortlora.errors import OrtloraError
from ortlora.manifest import Manifest
from ortlora.runtime import cli as train_cli
from ortlora.runtime import config as cfg
from ortlora.runtime import providers
from tests.conftest import _build
from tests.environments import ENVIRONMENTS, needs, run_in
from tests.reference import rel_err
from tests.test_openvino import one_case, step_on_each, summary_of, trains_and_resumes_as_the_training_api
from tests.test_portable import TOL, train


def refusal(capsys, *argv) -> str:
    """The one line a refused ortlora-train run writes."""
    assert train_cli.main([*argv, "--no-progress", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, says", [
    (["--ep-option", "partial"], "--ep-option 'partial' must be KEY=VALUE"),
    (["--ep-option", "=1"], "--ep-option '=1' must be KEY=VALUE"),
    (["--ep-option", "a=1", "--ep-option", "a=2"], "--ep-option gives a twice ('1' and '2'); keep one"),
    (["--ep", "ggml:tpu"], "NAME:KIND for a plugin's device, KIND one of gpu, npu, cpu"),
    (["--ep", "cpu", "--ep-option", "partial=1"], "--ep-option partial=1 passes options to --ep's provider, and --ep is cpu"),
    (["--ep", "ggml", "--backend", "ort-training", "--ep-option", "partial=1"], "uses ORT's training API: pass --backend"),
    (["--ep", "nosuch", "--backend", "ort-session"], "unknown execution provider 'nosuch' (a plugin provider is a package of its own: pip install onnxruntime-ep-nosuch); this onnxruntime has: cpu"),
])
def test_provider_options_and_names_are_checked(argv, says, artifacts, tmp_path, capsys):
    assert says in refusal(capsys, "--artifacts", str(artifacts), "--out", str(tmp_path / "run"), *argv)
    assert not (tmp_path / "run").exists()


def test_ep_options_in_a_toml_file_are_strings_by_name(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('ep = "ggml"\nep_options = { partial = 1, device = "cpu" }\n')
    assert cfg.load_toml(path).ep_options == {"partial": "1", "device": "cpu"}
    path.write_text('ep = "ggml"\nep_options = { partial = true }\n')
    with pytest.raises(OrtloraError, match="ep_options: partial must be a string or a number, got True"):
        cfg.load_toml(path)


@pytest.fixture
def deviceless_plugin(monkeypatch):
    """An installed plugin package for openvino that registers and offers no device (the OpenVINO plugin on an
    AMD CPU), on an onnxruntime stood in for with the plugin API."""
    import onnxruntime

    module = types.ModuleType("fake_ep_openvino")
    module.get_library_path = lambda: "/nonexistent/libfake.so"
    module.get_ep_names = lambda: ["OpenVINOExecutionProvider"]
    monkeypatch.setitem(sys.modules, "fake_ep_openvino", module)
    plugin = providers.Plugin("openvino", "onnxruntime-ep-openvino", "1.8.1", "fake_ep_openvino")
    monkeypatch.setattr(providers, "plugins", lambda: {"openvino": plugin})
    registered = []
    monkeypatch.setattr(onnxruntime, "register_execution_provider_library", lambda n, p: registered.append(n),
                        raising=False)
    cpu = types.SimpleNamespace(ep_name="CPUExecutionProvider",
                                device=types.SimpleNamespace(type=types.SimpleNamespace(name="CPU")))
    monkeypatch.setattr(onnxruntime, "get_ep_devices", lambda: [cpu], raising=False)
    monkeypatch.setattr(providers, "_REGISTERED", set())
    return registered


def test_a_plugin_without_a_device_says_so_in_one_line(deviceless_plugin, artifacts, tmp_path, capsys):
    err = refusal(capsys, "--artifacts", str(artifacts), "--out", str(tmp_path / "run"), "--ep", "openvino",
                  "--backend", "ort-session")
    assert ("execution provider openvino: onnxruntime-ep-openvino 1.8.1 is installed and registered, but offers no "
            "device on this machine (ONNX Runtime's get_ep_devices() lists CPUExecutionProvider only); train with "
            "--ep cpu") in err
    assert deviceless_plugin == ["OpenVINOExecutionProvider"] and not (tmp_path / "run").exists()


def test_a_plugin_without_a_device_gives_way_to_the_cpu_only_when_allowed(deviceless_plugin, artifacts, tmp_path,
                                                                           capsys):
    assert train(artifacts, tmp_path / "run", "--ep", "openvino", "--backend", "ort-session", "--max-steps", "1",
                 "--allow-fallback") == 0
    out = capsys.readouterr().out
    assert "backend ort-session on cpu in fp32," in out
    assert "openvino cannot run the training graph; the CPU provider runs it (--allow-fallback)" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["execution_providers"] == ["CPUExecutionProvider"] and summary["ep_options"] == {}


def test_the_cpu_taking_over_runs_the_default_graph_not_the_providers_own(deviceless_plugin, tiny_model,
                                                                          tmp_path_factory, tmp_path, capsys):
    """An int4 base's OpenVINO graph reshapes uint4 blocks, which the CPU provider of onnxruntime 1.19 cannot load:
    where OpenVINO cannot run (here: no device) and --allow-fallback lets the CPU take over, it runs the default
    graph, with the loss of a run on the CPU provider."""
    artifacts = _build(tmp_path_factory, tiny_model, "int4-base", base_precision="int4", block_size=16)
    assert "portable_training_openvino_model" in Manifest.load(artifacts).files
    common = ("--backend", "ort-session", "--max-steps", "2")
    assert train(artifacts, tmp_path / "fell-back", "--ep", "openvino", "--allow-fallback", *common) == 0
    assert "the CPU provider runs it (--allow-fallback)" in capsys.readouterr().out
    assert train(artifacts, tmp_path / "cpu", *common) == 0
    losses = [json.loads((tmp_path / run / "summary.json").read_text())["train_loss"] for run in ("fell-back", "cpu")]
    assert losses[0] == losses[1]


def test_a_cpu_taking_over_a_bf16_run_records_fp32(deviceless_plugin, artifacts, tmp_path, capsys):
    """--precision bf16 through OpenVINO's hint: where the CPU provider takes over, the run computes in fp32 and
    says so in its header, summary.json and checkpoints, never under a bf16 label."""
    from ortlora.runtime.precision import cpu_bf16

    if not cpu_bf16()[0]:
        pytest.skip("this CPU has no bf16 instructions: --precision bf16 is fp32 from the start (test_precision.py)")
    assert train(artifacts, tmp_path / "run", "--ep", "openvino", "--backend", "ort-session", "--max-steps", "1",
                 "--precision", "bf16", "--allow-fallback") == 0
    out = capsys.readouterr().out
    assert "on cpu in fp32," in out, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["precision"] == "fp32" and "--allow-fallback" in summary["precision_route"], summary


# -- onnxruntime-ggml 0.2.0 ------------------------------------------------------------------------


@needs("ggml")
def test_ggml_registers_a_device_beside_the_cpu_provider():
    report = run_in("ggml", """
        import json, onnxruntime
        from ortlora.runtime.providers import plugins, resolve
        target = resolve("ggml")
        print(json.dumps({"plugins": sorted(plugins()), "devices": [d.ep_name for d in onnxruntime.get_ep_devices()],
                          "provider": target.provider, "route": target.route, "onnxruntime": onnxruntime.__version__}))
    """)
    assert report["plugins"] == ["ggml"]
    assert report["devices"] == ["CPUExecutionProvider", "ggml"], report
    assert report["provider"] == "ggml" and report["route"] == "plugin onnxruntime-ggml 0.2.0 on its CPU device"


@needs("ggml")
def test_ggml_takes_the_inference_graph_with_the_cpu_providers_logits(artifacts):
    """Where ggml takes a graph, it computes what the CPU provider does: in fp32 with ortlora's weights=f32
    (seen: 1.9e-6), not with its default f16 matrices (2.8e-3), which --ep-option weights=f16 brings back."""
    report = run_in("ggml", f"""
        import json, numpy as np, onnxruntime as ort
        from pathlib import Path
        from ortlora.runtime.providers import create_session
        path = Path(r"{artifacts}") / "inference_model.onnx"
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 100, (2, 24)).astype(np.int64)
        feeds = {{"input_ids": ids, "attention_mask": np.ones_like(ids)}}
        out = {{}}
        for name, ep, options in (("cpu", "cpu", None), ("f32", "ggml", None), ("f16", "ggml", {{"weights": "f16"}})):
            session = create_session(path, ort.SessionOptions(), ep, ep_options=options)
            out[name] = session.run(["logits"], feeds)[0]
            if ep == "ggml":
                assigned = session.get_provider_graph_assignment_info()
                out[name + "_nodes"] = {{s.ep_name: len(s.get_nodes()) for s in assigned}}
                out[name + "_options"] = session.ep_options
        err = {{k: float(np.abs(out[k] - out["cpu"]).max() / np.abs(out["cpu"]).max()) for k in ("f32", "f16")}}
        print(json.dumps({{"err": err, **{{k: v for k, v in out.items() if not isinstance(v, np.ndarray)}}}}))
    """)
    assert list(report["f32_nodes"]) == ["ggml"] and report["f32_nodes"]["ggml"] > 100, report
    assert report["f32_options"]["weights"] == "f32" and report["f16_options"]["weights"] == "f16"
    assert report["err"]["f32"] < 1e-5 < 1e-4 < report["err"]["f16"], report


@needs("ggml")
def test_ggml_takes_the_graphs_without_nonzero_whole_with_the_cpu_providers_loss_and_gradients(artifacts, tmp_path):
    manifest = Manifest.load(artifacts)
    one_case(manifest, tmp_path / "in.npz")
    report = step_on_each("ggml", artifacts, tmp_path, eps=("ggml", "cpu"))
    assert report["ggml"]["placement"] == {"ggml": 1}, report  # one subgraph: nothing left to the CPU provider
    assert report["ggml"]["route"] == "plugin onnxruntime-ggml 0.2.0 on its CPU device"
    assert report["ggml"]["options"]["weights"] == "f32", report
    ggml, cpu = np.load(tmp_path / "ggml.npz"), np.load(tmp_path / "cpu.npz")  # cpu: the default graphs
    assert sorted(ggml.files) == sorted(cpu.files)
    for name in cpu.files:  # seen: loss 1.3e-7, gradients 5.2e-6 at most
        assert rel_err(ggml[name], cpu[name]) < TOL, name
    # Which nodes ggml claimed, as ONNX Runtime assigned them: every node of both graphs.
    claimed = run_in("ggml", f"""
        import json, onnxruntime as ort
        from pathlib import Path
        from ortlora.runtime.providers import create_session
        out = {{}}
        for role in ("portable_training_ggml.onnx", "portable_eval_ggml.onnx"):
            session = create_session(Path(r"{artifacts}") / role, ort.SessionOptions(), "ggml")
            out[role] = {{s.ep_name: len(s.get_nodes()) for s in session.get_provider_graph_assignment_info()}}
        print(json.dumps(out))
    """)
    for role, nodes in claimed.items():  # seen: 706 and 337 nodes (after ONNX Runtime's own graph optimizations)
        assert list(nodes) == ["ggml"] and nodes["ggml"] > 300, (role, claimed)


@needs("ggml")
def test_training_on_ggml_matches_the_training_api(artifacts, tmp_path):
    """6 steps with --ep ggml, and 3 resumed, give the training API's LoRA weights."""
    runs = trains_and_resumes_as_the_training_api("ggml", artifacts, tmp_path, "--ep", "ggml")
    summary = summary_of(runs / "run")
    assert summary["nodes_per_provider"] == {"ggml": 1} and summary["execution_providers"][0] == "ggml", summary
    assert summary["ep_route"] == "plugin onnxruntime-ggml 0.2.0 on its CPU device"
    assert summary_of(runs / "resumed")["nodes_per_provider"] == {"ggml": 1}


@needs("ggml")
@pytest.mark.skipif(not Path("/usr/share/vulkan/icd.d/lvp_icd.json").exists() and not os.environ.get("CI"),
                    reason="no Mesa lavapipe (mesa-vulkan-drivers): install it as .ci/run does")
def test_ggml_on_vulkan_computes_in_fp32(artifacts, tmp_path):
    """ggml's Vulkan backend (--ep-option device=gpu), here on lavapipe, which ggml uses only where
    GGML_VK_VISIBLE_DEVICES names it (its type is CPU). On a device with f16 it multiplies in f16 unless
    GGML_VK_DISABLE_F16 is set; ortlora sets it (providers.PLUGIN_ENVIRONMENT). The run without it shows that the
    Vulkan kernels ran: ggml's CPU kernels are fp32 either way."""
    one_case(Manifest.load(artifacts), tmp_path / "in.npz")
    errors = {}
    for variant, keep in (("ortlora's", True), ("f16", False)):
        errors[variant] = run_in("ggml", f"""
            import json, os, numpy as np
            from pathlib import Path
            os.environ["GGML_VK_VISIBLE_DEVICES"] = "0"
            from ortlora.manifest import Manifest
            from ortlora.runtime import providers
            from ortlora.runtime.session_backend import OrtSessionBackend
            if not {keep}:
                providers.PLUGIN_ENVIRONMENT["ggml"].pop("GGML_VK_DISABLE_F16", None)
            data = np.load(r"{tmp_path / 'in.npz'}")
            artifacts = Path(r"{artifacts}")
            result = {{}}
            for ep, options in (("cpu", None), ("ggml", {{"device": "gpu"}})):
                backend = OrtSessionBackend(artifacts, Manifest.load(artifacts), ep=ep, ep_options=options)
                backend.set_weights({{k[2:]: data[k] for k in data.files if k.startswith("w:")}})
                loss = backend.train_step({{k[2:]: data[k] for k in data.files if k.startswith("b:")}})
                result[ep] = {{"loss": loss, "grads": backend.gradients(), "placement": backend.placement}}
            cpu, ggml = result["cpu"], result["ggml"]
            assert ggml["placement"] == {{"ggml": 1}}, ggml["placement"]
            print(json.dumps({{"loss": abs(ggml["loss"] - cpu["loss"]) / abs(cpu["loss"]),
                              "grads": max(float(np.abs(ggml["grads"][n] - g).max() / np.abs(g).max())
                                           for n, g in cpu["grads"].items())}}))
        """)
    assert errors["ortlora's"]["loss"] < TOL and errors["ortlora's"]["grads"] < TOL, errors  # seen: 2.7e-7, 3.8e-6
    assert errors["f16"]["grads"] > 1e-3, errors  # seen: 5.9e-3


@needs("ggml")
def test_training_on_ggml_without_its_graphs_is_refused_in_one_line_and_falls_back_only_when_allowed(
        artifacts_all_linear, tmp_path):
    """A build with label smoothing has no graphs without NonZero (dense_loss.py): ggml takes none of the default."""
    artifacts = artifacts_all_linear
    report = run_in("ggml", f"""
        import contextlib, io, json
        from ortlora.runtime.cli import main
        common = ["--artifacts", r"{artifacts}", "--no-progress", "--no-plot", "--max-steps", "2", "--ep", "ggml"]
        said = {{}}
        for name, extra in (("default", []), ("partial", ["--ep-option", "partial=1"]),
                            ("fallback", ["--ep-option", "partial=1", "--allow-fallback"])):
            err, out = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main([*common, "--out", r"{tmp_path}/" + name, *extra])
            said[name] = {{"code": code, "err": err.getvalue(), "out": out.getvalue()}}
        print(json.dumps(said))
    """)
    for case in ("default", "partial"):
        assert report[case]["code"] == 2, report[case]
        error = [line for line in report[case]["err"].splitlines() if line.startswith("error:")]
        assert len(error) == 1 and error[0].startswith(
            "error: execution provider ggml cannot run portable_training.onnx: it took none of its "), report[case]
        assert "--allow-fallback" in error[0] and not (tmp_path / case).exists()
    fallback = report["fallback"]
    assert fallback["code"] == 0 and "backend ort-session on cpu in fp32," in fallback["out"]
    assert "ggml cannot run the training graph; the CPU provider runs it (--allow-fallback)" in fallback["out"]
    assert json.loads((tmp_path / "fallback" / "config.json").read_text())["ep_options"] == {"partial": "1"}
    summary = json.loads((tmp_path / "fallback" / "summary.json").read_text())
    assert list(summary["nodes_per_provider"]) == ["CPUExecutionProvider"] and summary["ep_options"] == {}


@needs("ggml")
def test_generation_on_ggml_is_refused_in_one_line_that_says_what_to_generate_with(artifacts):
    """ggml takes none of the generation graph (Tile, OneHot); ortlora-generate has no fallback, so its line
    points at --ep cpu, not at training's --allow-fallback."""
    report = run_in("ggml", f"""
        import json
        from ortlora.errors import OrtloraError
        from ortlora.runtime.generate import Generator
        try:
            Generator(r"{artifacts}", ep="ggml")
            said = None
        except OrtloraError as e:
            said = str(e)
        print(json.dumps({{"said": said}}))
    """)
    said = report["said"]
    assert said and said.startswith("execution provider ggml cannot run decoder_model.onnx: ") and "\n" not in said
    assert said.endswith("; generate with --ep cpu") and "--allow-fallback" not in said, said


# -- onnxruntime-ep-openvino 1.8.1 ---------------------------------------------------------------

OPENVINO_DEVICES = """
    import json, onnxruntime
    from ortlora.errors import OrtloraError
    from ortlora.runtime.providers import resolve
    compiled = onnxruntime.get_available_providers()  # before registration, which adds the plugin's names
    try:
        said = resolve("openvino").route
    except OrtloraError as e:
        said = "error: " + str(e)
    print(json.dumps({"said": said, "devices": [d.ep_name for d in onnxruntime.get_ep_devices()],
                      "compiled": compiled}))
"""


@needs("ep-openvino")
def test_the_openvino_plugin_offers_a_cpu_device_or_says_it_offers_none():
    """On an Intel CPU the plugin offers OpenVINO's CPU device (and AUTO); on an AMD EPYC it offered none."""
    report = run_in("ep-openvino", OPENVINO_DEVICES)
    assert "OpenVINOExecutionProvider" not in report["compiled"]  # the plugin, not onnxruntime-openvino
    if "OpenVINOExecutionProvider" in report["devices"]:
        assert report["said"] == "plugin onnxruntime-ep-openvino 1.8.1 on its CPU device", report
    else:
        assert report["said"].startswith("error: execution provider openvino: onnxruntime-ep-openvino 1.8.1 is "
                                         "installed and registered, but offers no device on this machine"), report


@pytest.fixture
def openvino_plugin_device():
    if "OpenVINOExecutionProvider" not in run_in("ep-openvino", OPENVINO_DEVICES)["devices"]:
        pytest.skip("the OpenVINO plugin offers no device on this CPU (as on an AMD EPYC); the refusal is tested above")


@needs("ep-openvino")
def test_the_openvino_plugin_gives_the_cpu_providers_loss_and_gradients(artifacts, tmp_path, openvino_plugin_device):
    one_case(Manifest.load(artifacts), tmp_path / "in.npz")
    report = step_on_each("ep-openvino", artifacts, tmp_path)
    assert report["openvino"]["placement"] == {"OpenVINOExecutionProvider": 1}, report
    # Without OpenVINO's f32 hint the plugin computed in bf16 on an AMX Xeon (loss 1.8e-3 off): ortlora passes it.
    assert json.loads(report["openvino"]["options"]["load_config"]) == {"CPU": {"INFERENCE_PRECISION_HINT": "f32"}}
    openvino, cpu = np.load(tmp_path / "openvino.npz"), np.load(tmp_path / "cpu.npz")
    for name in cpu.files:  # seen: 2.6e-6 at most
        assert rel_err(openvino[name], cpu[name]) < TOL, name


@needs("ep-openvino")
def test_training_on_the_openvino_plugin_matches_the_training_api(artifacts, tmp_path, openvino_plugin_device):
    """6 steps with --ep openvino through the plugin, and 3 resumed, give the training API's LoRA weights."""
    runs = trains_and_resumes_as_the_training_api("ep-openvino", artifacts, tmp_path, "--ep", "openvino",
                                                  "--ep-option", "num_streams=1")
    summary = summary_of(runs / "run")
    assert summary["nodes_per_provider"] == {"OpenVINOExecutionProvider": 1}
    assert summary["ep_route"] == "plugin onnxruntime-ep-openvino 1.8.1 on its CPU device"
    assert summary["ep_options"]["num_streams"] == "1" and summary["ep_options"]["precision"] == "FP32"
    assert json.loads((runs / "run" / "config.json").read_text())["ep_options"] == {"num_streams": "1"}
    assert json.loads((runs / "resumed" / "config.json").read_text())["ep_options"] == {"num_streams": "1"}


@needs("ep-openvino")
def test_a_bf16_base_on_the_openvino_plugin_is_refused_in_one_line(tiny_model, tmp_path_factory, tmp_path,
                                                                   openvino_plugin_device):
    """OpenVINO 2026.4 computes one of a square matrix's two products transposed in a bf16 base's graphs (gradients
    1.4 off, no error): the plugin is refused for them, and --allow-fallback trains on the CPU provider."""
    artifacts = _build(tmp_path_factory, tiny_model, "bf16-base", base_precision="bf16")
    report = run_in("ep-openvino", f"""
        import contextlib, io, json
        from ortlora.runtime.cli import main
        args = ["--artifacts", r"{artifacts}", "--max-steps", "2", "--no-progress", "--no-plot", "--ep", "openvino"]
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            refused = main([*args, "--out", r"{tmp_path / 'refused'}"])
        fell_back = main([*args, "--out", r"{tmp_path / 'cpu'}", "--allow-fallback"])
        print(json.dumps({{"refused": refused, "said": err.getvalue(), "fell_back": fell_back}}))
    """)
    assert report["refused"] == 2 and report["said"].count("\n") == 1, report
    assert "cannot train a bf16 base" in report["said"] and "--allow-fallback" in report["said"], report
    assert not (tmp_path / "refused" / "checkpoint-2").exists()
    assert report["fell_back"] == 0
    summary = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    assert summary["execution_providers"] == ["CPUExecutionProvider"], summary


# -- onnxruntime-ep-webgpu 0.4.0 -------------------------------------------------------------------

SOFTWARE_ADAPTER = "ORT_WEBGPU_EP_ALLOW_SOFTWARE_ADAPTER"


@pytest.fixture
def webgpu_without_a_gpu(monkeypatch):
    """A stand-in for onnxruntime-ep-webgpu on a machine without a GPU: it offers a CPU device only when the software
    adapter variable was "1" as its library registered (onnxruntime-ep-webgpu 0.4.0 reads it there)."""
    import onnxruntime

    module = types.ModuleType("fake_ep_webgpu")
    module.get_library_path = lambda: "/nonexistent/libonnxruntime_providers_webgpu.so"
    module.get_ep_names = lambda: ["WebGpuExecutionProvider"]
    monkeypatch.setitem(sys.modules, "fake_ep_webgpu", module)
    plugin = providers.Plugin("webgpu", "onnxruntime-ep-webgpu", "0.4.0", "fake_ep_webgpu")
    monkeypatch.setattr(providers, "plugins", lambda: {"webgpu": plugin})
    monkeypatch.delenv(SOFTWARE_ADAPTER, raising=False)
    devices = []

    def device(ep_name):
        return types.SimpleNamespace(ep_name=ep_name, device=types.SimpleNamespace(type=types.SimpleNamespace(name="CPU")))

    def register(name, path):
        if os.environ.get(SOFTWARE_ADAPTER) == "1":
            devices.append(device(name))

    monkeypatch.setattr(onnxruntime, "register_execution_provider_library", register, raising=False)
    monkeypatch.setattr(onnxruntime, "get_ep_devices", lambda: [device("CPUExecutionProvider"), *devices],
                        raising=False)
    monkeypatch.setattr(providers, "_REGISTERED", set())
    return devices


def test_webgpu_without_a_gpu_points_at_its_software_device(webgpu_without_a_gpu):
    with pytest.raises(providers.NoDevice) as said:
        providers.resolve("webgpu")
    assert str(said.value) == (
        "execution provider webgpu: onnxruntime-ep-webgpu 0.4.0 is installed and registered, but offers no device on "
        "this machine (ONNX Runtime's get_ep_devices() lists CPUExecutionProvider only); train with --ep cpu, or "
        "--ep webgpu:cpu for a software Vulkan device such as Mesa's lavapipe, slow")
    assert SOFTWARE_ADAPTER not in os.environ  # --ep webgpu alone never runs on a software adapter


def test_webgpu_cpu_sets_the_software_adapter_variable_before_registering(webgpu_without_a_gpu, monkeypatch):
    monkeypatch.setenv(SOFTWARE_ADAPTER, "0")  # what the user had; --ep webgpu:cpu asks for the CPU device
    target = providers.resolve("webgpu:cpu")
    assert os.environ[SOFTWARE_ADAPTER] == "1" and len(webgpu_without_a_gpu) == 1
    assert target.provider == "WebGpuExecutionProvider" and target.devices == tuple(webgpu_without_a_gpu)
    assert target.route == "plugin onnxruntime-ep-webgpu 0.4.0 on its CPU device"


@pytest.mark.parametrize("version, says", [
    ("1.30.0", "onnxruntime 1.30.0 does not report the nodes onnxruntime-ep-webgpu runs (1.31 does), so ortlora "
               "cannot tell whether it took any: install onnxruntime>=1.31 beside it"),
    ("1.31.1", "it took none of its 188 nodes (ONNX Runtime would run them all on the CPU provider)"),
])
def test_webgpu_on_an_onnxruntime_that_does_not_record_its_nodes_says_so(version, says, monkeypatch):
    """onnxruntime 1.30.0 lists none of WebGPU's nodes in its graph assignment info (only the CPU provider's 188 of
    the tiny training graph; 1.31.1 also WebGPU's 510): ortlora must not call that "took none"."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", version)
    plugin = providers.Plugin("webgpu", "onnxruntime-ep-webgpu", "0.4.0", "onnxruntime_ep_webgpu")
    assert providers._took_none(providers.Target("webgpu", "WebGpuExecutionProvider", plugin), 188) == says


# .venv-webgpu: onnxruntime >= 1.31 and onnxruntime-ep-webgpu 0.4.0, with Mesa's lavapipe 25 where there is no GPU.
# tests/environments.py names it once .ci/run creates it; until then these are skipped.
needs_webgpu = needs("webgpu") if "webgpu" in ENVIRONMENTS else pytest.mark.skip(
    reason="tests/environments.py has no webgpu environment (.venv-webgpu) yet")

WEBGPU_DEVICE = """
    import json, onnxruntime
    from ortlora.runtime.providers import NoDevice, resolve
    try:
        ep = "webgpu" if resolve("webgpu").devices else None  # a GPU
    except NoDevice:
        ep = "webgpu:cpu"  # Dawn on a software Vulkan device (lavapipe)
    print(json.dumps({"ep": ep, "onnxruntime": onnxruntime.__version__}))
"""


@pytest.fixture(scope="module")
def webgpu_ep():
    """--ep webgpu where the machine has a GPU, else webgpu:cpu."""
    return run_in("webgpu", WEBGPU_DEVICE)["ep"]


@needs_webgpu
def test_webgpu_gives_the_cpu_providers_loss_and_gradients(artifacts, tmp_path, webgpu_ep):
    one_case(Manifest.load(artifacts), tmp_path / "in.npz")
    report = step_on_each("webgpu", artifacts, tmp_path, eps=(webgpu_ep, "cpu"))
    placement = report[webgpu_ep]["placement"]
    # Seen on lavapipe (tiny build): WebGPU 537 nodes, the CPU provider 188 (shape arithmetic on int64, the label
    # gather's NonZero, the loss's LogSoftmax).
    assert set(placement) == {"WebGpuExecutionProvider", "CPUExecutionProvider"}, report
    assert placement["WebGpuExecutionProvider"] > 2 * placement["CPUExecutionProvider"], report
    assert report[webgpu_ep]["route"].startswith("plugin onnxruntime-ep-webgpu 0.4.0 on its "), report
    webgpu, cpu = np.load(tmp_path / f"{webgpu_ep}.npz"), np.load(tmp_path / "cpu.npz")
    assert sorted(webgpu.files) == sorted(cpu.files)
    for name in cpu.files:  # seen on lavapipe: loss 1.3e-7, gradients 2.0e-6 at most
        assert rel_err(webgpu[name], cpu[name]) < TOL, name


@needs_webgpu
def test_training_on_webgpu_matches_the_training_api(artifacts, tmp_path, webgpu_ep):
    """6 steps with --ep webgpu(:cpu), and 3 resumed, give the training API's LoRA weights."""
    runs = trains_and_resumes_as_the_training_api("webgpu", artifacts, tmp_path, "--ep", webgpu_ep)
    summary = summary_of(runs / "run")
    assert summary["nodes_per_provider"]["WebGpuExecutionProvider"] > 0, summary["nodes_per_provider"]
    assert summary["ep_route"].startswith("plugin onnxruntime-ep-webgpu 0.4.0 on its ")


@needs_webgpu
def test_generation_on_webgpu_equals_the_cpu_provider(artifacts, webgpu_ep):
    """The key/value-cache decoder on WebGPU: logits (empty cache and a real one) and greedy tokens as the CPU's."""
    report = run_in("webgpu", f"""
        import json
        import numpy as np
        from pathlib import Path
        from ortlora.runtime.generate import Generator, Sampling
        cpu, gpu = (Generator(Path(r"{artifacts}"), ep=ep) for ep in ("cpu", "{webgpu_ep}"))
        ids = cpu.prompt("Once upon a time there was")
        a, cache = cpu.logits(ids[:-2])
        b, _ = gpu.logits(ids[:-2])
        diffs = [float(np.abs(a - b).max())]
        a, _ = cpu.logits(ids[-2:], cache)
        b, _ = gpu.logits(ids[-2:], cache)
        diffs.append(float(np.abs(a - b).max()))
        tokens = [g.generate(ids, Sampling(max_new_tokens=12)).tokens for g in (cpu, gpu)]
        print(json.dumps({{"diffs": diffs, "same_tokens": tokens[0] == tokens[1]}}))
    """)
    assert max(report["diffs"]) < 1e-4, report  # seen on lavapipe: 6.8e-7 (relative)
    assert report["same_tokens"]


# -- scripts/gpu_check.py: its pure parts (the script itself needs a GPU; docs/providers.md) --------

def gpu_check():
    import importlib.util

    from tests.environments import ROOT

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_finds_its_wheels_and_reads_nvidia_smi():
    check = gpu_check()
    wheels = ["onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_27_x86_64.whl", "onnxruntime-1.30.0-cp311-none.whl",
              "onnxruntime_ep_webgpu-0.4.0-py3-none-manylinux_2_28_x86_64.whl", "README.txt"]
    assert check.wheel_of(wheels, "onnxruntime-gpu").startswith("onnxruntime_gpu-1.31.1")
    assert check.wheel_of(wheels, "onnxruntime").startswith("onnxruntime-1.30.0")
    assert check.wheel_of(wheels, "peft") is None
    assert check.missing_wheels(wheels) == ["onnxruntime-training-cpu"]
    older = [w.replace("gpu-1.31.1", "gpu-1.30.0") for w in wheels]  # 1.30 does not report a plugin's nodes
    assert check.missing_wheels(older) == ["onnxruntime-gpu>=1.31", "onnxruntime-training-cpu"]
    assert check.missing_wheels([*wheels[1:], "onnxruntime_training_cpu-1.19.2-cp312-cp312-manylinux_2_28_x86_64.whl"]) \
        == ["onnxruntime-gpu>=1.31"]
    assert check.gpu_memory_mb("1234, 5000\n99, 7\n1234, 12.5\n", 1234) == 5012.5
    assert check.gpu_memory_mb("No running processes found\n", 1234) == 0.0


def test_gpu_check_puts_the_cuda_libraries_of_the_nvidia_packages_on_the_library_path(tmp_path):
    check = gpu_check()
    for library in ("cu13/lib/libcublasLt.so.13", "cudnn/lib/libcudnn.so.9", "nccl/include/nccl.h", "cu13/bin/ptxas"):
        (tmp_path / "nvidia" / library).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "nvidia" / library).touch()
    (tmp_path / "nvidia" / "cusparselt" / "lib").mkdir(parents=True)  # no library in it
    assert check.library_dirs([tmp_path / "nvidia", tmp_path / "absent"]) == [
        str(tmp_path / "nvidia" / "cu13" / "lib"), str(tmp_path / "nvidia" / "cudnn" / "lib")]
    refused = check.summary("cuda", {"error": "execution provider cuda cannot run portable_training.onnx: ..."})
    assert refused.startswith("cuda        refused: execution provider cuda")
    ran = check.summary("webgpu", {"2x128": {"median_ms": 51.2}, "8x512": {"median_ms": 410.7}, "peak_gpu_mb": 5120,
                                   "vs_cpu": {"loss_rel": 2e-7, "grad_rel": 3e-6}})
    assert ran == "webgpu      2x128 51 ms, 8x512 411 ms; GPU peak 5120 MB; vs CPU loss 2.0e-07, gradients 3.0e-06"


def test_gpu_check_workers_run_here_on_the_cpu(artifacts, tmp_path, monkeypatch):
    """The workers the GPU run starts, on this machine's CPU at small sizes: what they call of ortlora, PyTorch and
    PEFT exists and returns what the report reads."""
    from ortlora.manifest import Manifest

    check = gpu_check()
    monkeypatch.setattr(check, "SIZES", ((1, 16), (2, 8)))
    report = check.ort_worker("cpu", artifacts, tmp_path / "cpu.npz", steps=1, timed=True)
    assert report["providers"] == ["CPUExecutionProvider"] and report["nodes"]["CPUExecutionProvider"] > 0
    assert report["1x16"]["steps"] == 1 and report["2x8"]["median_ms"] > 0
    with np.load(tmp_path / "cpu.npz") as saved:
        names = {p.onnx_name for p in Manifest.load(artifacts).parameters}
        assert set(saved.files) == {"loss", *names} and np.isfinite(saved["loss"])
        assert all(np.abs(saved[name]).max() > 0 for name in names)  # seeded weights: every gradient nonzero
    torch_report = check.torch_worker(artifacts, autocast=True, steps=1, device="cpu")
    assert torch_report["system"] == "torch-bf16" and torch_report["2x8"]["steps"] == 1


def test_gpu_check_compares_with_the_cpu_provider():
    check = gpu_check()
    reference = {"loss": np.float32(2.0), "a": np.array([1.0, -4.0]), "b": np.array([0.5, 0.5])}
    got = {"loss": np.float32(2.002), "a": np.array([1.0, -4.004]), "b": np.array([0.5, 0.6])}
    result = check.compare(got, reference)
    assert result["worst_grad"] == "b" and result["grad_rel"] == pytest.approx(0.2)
    assert result["loss_rel"] == pytest.approx(1e-3, rel=1e-3)
    assert check.timing([0.3, 0.1, 0.2]) == {"median_ms": pytest.approx(200), "best_ms": pytest.approx(100), "steps": 3}
