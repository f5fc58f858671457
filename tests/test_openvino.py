"""The portable training graph under ONNX Runtime's OpenVINO execution provider.

onnxruntime-openvino replaces the onnxruntime module, so it lives in an environment of its own,
.venv-ov (README: "Intel hardware with OpenVINO"), and runs here as a subprocess, as the newest plain
onnxruntime does in test_portable.py. Its CPU device runs on any x86-64 machine. The reference is
the CPU provider of the same package, and ORT's training API in this environment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ortlora.manifest import Manifest
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.checkpoint import load_adapter
from tests.environments import ROOT, needs, python_of, run_in
from tests.reference import random_weights, rel_err
from tests.test_build import make_batch
from tests.test_portable import TOL, train


def one_case(manifest: Manifest, path) -> tuple[dict, dict]:
    """Random LoRA weights and a batch with masked labels, also saved to ``path`` (w:NAME, b:NAME) for the
    environment a test runs code in."""
    weights, batch = random_weights(manifest, seed=3), make_batch(512, "ignored", seed=6)
    np.savez(path, **{f"w:{k}": v for k, v in weights.items()}, **{f"b:{k}": v for k, v in batch.items()})
    return weights, batch


def step_on_each(environment: str, artifacts: Path, tmp_path: Path, eps=("openvino", "cpu")) -> dict:
    """One step of the portable graph on each of ``eps`` under ``environment``'s interpreter, on one_case's weights
    and batch (tmp_path / "in.npz"); loss, eval loss and gradients go to tmp_path / f"{ep}.npz". Returns, by ep,
    the nodes each provider ran, the route and the options the provider was given."""
    return run_in(environment, f"""
        import json, numpy as np
        from pathlib import Path
        from ortlora.manifest import Manifest
        from ortlora.runtime.session_backend import OrtSessionBackend
        data = np.load(r"{tmp_path / 'in.npz'}")
        artifacts = Path(r"{artifacts}")
        out = {{}}
        for ep in {tuple(eps)!r}:
            backend = OrtSessionBackend(artifacts, Manifest.load(artifacts), ep=ep)
            backend.set_weights({{k[2:]: data[k] for k in data.files if k.startswith("w:")}})
            batch = {{k[2:]: data[k] for k in data.files if k.startswith("b:")}}
            loss = backend.train_step(batch)
            np.savez(r"{tmp_path}" + f"/{{ep}}.npz", loss=loss, eval_loss=backend.eval_loss(batch), **backend.gradients())
            out[ep] = {{"placement": backend.placement, "route": backend.route, "options": backend.ep_options}}
        print(json.dumps(out))
    """)


@needs("openvino")
@pytest.mark.parametrize("fixture", ["artifacts", "artifacts_all_linear", "artifacts_untied"])
def test_openvino_gives_the_cpu_providers_loss_and_gradients(fixture, request, tmp_path):
    directory = request.getfixturevalue(fixture)
    manifest = Manifest.load(directory)
    weights, batch = one_case(manifest, tmp_path / "in.npz")
    report = step_on_each("openvino", directory, tmp_path)
    # The whole graph is one OpenVINO subgraph: nothing falls back to the CPU provider.
    assert report["openvino"]["placement"] == {"OpenVINOExecutionProvider": 1}, report
    openvino, cpu = np.load(tmp_path / "openvino.npz"), np.load(tmp_path / "cpu.npz")
    assert sorted(openvino.files) == sorted(cpu.files)
    for name in cpu.files:  # seen: 4e-6 at most (fp32; OpenVINO's CPU device computes in fp32)
        assert rel_err(openvino[name], cpu[name]) < TOL, name

    api = OrtTrainingBackend(directory, manifest)
    api.set_weights(weights)
    assert float(openvino["loss"]) == pytest.approx(api.train_step(batch), rel=TOL)
    for name, grad in api.gradients().items():
        assert rel_err(openvino[name], grad) < TOL, name


def trains_and_resumes_as_the_training_api(env: str, artifacts: Path, tmp_path: Path, *options: str) -> Path:
    """6 steps run in environment ``env`` with ``options`` (--ep and its own), saved every 3, and the last 3
    resumed from step 3, give the training API's LoRA weights (1e-4). Returns the folder holding both runs, "run"
    and "resumed", for what each provider records."""
    steps = ["--max-steps", "6", "--lr", "5e-3", "--grad-accum", "2"]
    common = ["--artifacts", str(artifacts), "--no-progress", "--no-plot", *steps]
    run_in(env, f"""
        import json
        from ortlora.runtime.cli import main
        assert main([*{common!r}, *{list(options)!r}, "--out", r"{tmp_path / 'run'}", "--save-every", "3"]) == 0
        assert main(["--resume", r"{tmp_path / 'run' / 'checkpoint-3'}", "--out", r"{tmp_path / 'resumed'}",
                     "--no-progress", "--no-plot"]) == 0
        print(json.dumps({{}}))
    """)
    assert train(artifacts, tmp_path / "api", "--backend", "ort-training", *steps) == 0
    manifest = Manifest.load(artifacts)
    reference = load_adapter(tmp_path / "api" / "checkpoint-6", manifest)
    for run in ("run", "resumed"):
        got = load_adapter(tmp_path / run / "checkpoint-6", manifest)
        assert max(rel_err(got[n], reference[n]) for n in reference) < 1e-4, run
    return tmp_path


def summary_of(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@needs("openvino")
def test_training_on_openvino_matches_the_training_api(artifacts, tmp_path):
    """6 steps with --ep openvino, and 3 steps resumed, give the training API's LoRA weights."""
    runs = trains_and_resumes_as_the_training_api("openvino", artifacts, tmp_path, "--ep", "openvino")
    assert summary_of(runs / "run")["nodes_per_provider"] == {"OpenVINOExecutionProvider": 1}


@needs("openvino")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps: Linux")
def test_openvino_runs_do_not_hold_the_frozen_file_beside_openvinos_copies(artifacts):
    """OpenVINO's CPU plugin keeps copies of its own of the frozen weights and reads all of frozen_weights.bin
    (through ortlora's mapping and one of its own per session) while it compiles and on a session's first run. The
    backend runs each OpenVINO session once on two tokens when it makes it, then releases the file's pages: a
    backend just made holds none of the file. Later steps map back what OpenVINO reads as stored (on this tiny
    model most of it; 11% at the 0.5B shape). The CPU provider reads the whole file on its first step (the
    measure's check)."""
    held = run_in("openvino", f"""
        import json, numpy as np
        from pathlib import Path
        from ortlora.manifest import Manifest
        from ortlora.runtime.session_backend import OrtSessionBackend
        from tests.memory import resident_bytes
        artifacts = Path(r"{artifacts}")
        ids = np.random.default_rng(0).integers(0, 100, (2, 16))
        batch = {{"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}}
        backend = OrtSessionBackend(artifacts, Manifest.load(artifacts), ep="openvino")
        held = {{"openvino": resident_bytes(artifacts / "frozen_weights.bin")}}
        del backend
        backend = OrtSessionBackend(artifacts, Manifest.load(artifacts), ep="cpu")
        backend.train_step(batch)
        held["cpu"] = resident_bytes(artifacts / "frozen_weights.bin")
        print(json.dumps(held))
    """)
    size = (artifacts / "frozen_weights.bin").stat().st_size
    assert held["cpu"] >= 0.9 * size, held
    assert held["openvino"] < 0.1 * size, held  # seen: 0; twice the file without the release (two mappings)


@needs("openvino")
def test_provider_coverage_reports_openvino(artifacts, tmp_path):
    python = python_of("openvino")
    assert python, "CI must create .venv-ov (see .ci/run)"
    out = tmp_path / "report.json"
    result = subprocess.run([str(python), "scripts/provider_coverage.py", "--artifacts", str(artifacts), "--steps", "2",
                             "--seq", "16", "--json", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    reports = json.loads(out.read_text())["reports"]
    assert set(reports) == {"CPUExecutionProvider", "OpenVINOExecutionProvider"}
    openvino = reports["OpenVINOExecutionProvider"]
    assert openvino["nodes"] == {"OpenVINOExecutionProvider": {"OpenVINO-EP-subgraph_1": 1}}
    assert openvino["vs_cpu"]["loss_rel"] < TOL and openvino["vs_cpu"]["grad_rel"] < TOL
    assert "OpenVINOExecutionProvider" in result.stdout


def test_provider_coverage_runs_the_cpu_provider(artifacts, tmp_path):
    """The tool itself, in this environment (onnxruntime-training): run mode with the CPU provider."""
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "scripts/provider_coverage.py", "--artifacts", str(artifacts),
                             "--providers", "cpu", "--steps", "1", "--seq", "16", "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())["reports"]["CPUExecutionProvider"]
    assert sum(report["nodes"]["CPUExecutionProvider"].values()) > 100
    assert report["best_step_s"] > 0 and report["peak_rss_mb"] > 0


@needs("openvino")
def test_generation_on_openvino_equals_the_cpu_provider(artifacts):
    """The key/value-cache decoder under OpenVINO: its logits (empty cache and a real one) and greedy tokens
    are the CPU provider's. Its position ids once came out all zeros there (an int64 Clip; decoder.py)."""
    report = run_in("openvino", f"""
        import json
        import numpy as np
        from pathlib import Path
        from ortlora.runtime.generate import Generator, Sampling
        cpu, ov = (Generator(Path(r"{artifacts}"), ep=ep) for ep in ("cpu", "openvino"))
        ids = cpu.prompt("Once upon a time there was")
        a, cache = cpu.logits(ids[:-2])  # the prompt less two tokens
        b, _ = ov.logits(ids[:-2])
        diffs = [float(np.abs(a - b).max())]
        a, _ = cpu.logits(ids[-2:], cache)  # two more tokens on the CPU's cache
        b, _ = ov.logits(ids[-2:], cache)
        diffs.append(float(np.abs(a - b).max()))
        tokens = [g.generate(ids, Sampling(max_new_tokens=12)).tokens for g in (cpu, ov)]
        print(json.dumps({{"diffs": diffs, "same_tokens": tokens[0] == tokens[1]}}))
    """)
    assert max(report["diffs"]) < 1e-4, report
    assert report["same_tokens"]
