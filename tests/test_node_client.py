"""A non-Python ONNX Runtime app: clients/node (onnxruntime-node) trains a step with the portable
graph and runs the merged ONNX model; both are compared with Python's numbers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from ortlora.handoff import cli as export_cli
from ortlora.manifest import Manifest
from ortlora.runtime.backend import OrtTrainingBackend
from tests.reference import random_weights, rel_err
from tests.test_build import make_batch

CLIENT = Path(__file__).parents[1] / "clients" / "node"
installed = shutil.which("node") and (CLIENT / "node_modules" / "onnxruntime-node").is_dir()
pytestmark = pytest.mark.skipif(  # never skipped in CI, which installs the client
    not installed and not os.environ.get("CI"),
    reason="the Node client is not installed: cd clients/node && npm install --ignore-scripts")


def node(tmp_path: Path, command: str, path: Path, request: dict) -> dict:
    (tmp_path / "request.json").write_text(json.dumps(request))
    result = subprocess.run(["node", str(CLIENT / "ortlora_client.mjs"), command, str(path), str(tmp_path / "request.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_node_training_step_equals_python(artifacts, tmp_path):
    manifest = Manifest.load(artifacts)
    weights = random_weights(manifest, seed=11)
    batch = make_batch(512, "ignored", seed=5)
    request = {k: v.tolist() for k, v in batch.items()}
    request["weights"] = {n: {"shape": list(w.shape), "data": w.ravel().tolist()} for n, w in weights.items()}
    answer = node(tmp_path, "train-step", artifacts, request)

    api = OrtTrainingBackend(artifacts, manifest)
    api.set_weights(weights)
    assert answer["loss"] == pytest.approx(api.train_step(batch), rel=1e-4)
    for name, grad in api.gradients().items():
        theirs = np.asarray(answer["grads"][name]["data"], np.float32).reshape(answer["grads"][name]["shape"])
        assert rel_err(theirs, grad) < 1e-4, name


def test_node_runs_the_merged_onnx_model(artifacts, trained_adapter, tmp_path):
    out = tmp_path / "onnx"
    assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(trained_adapter), "--to", "onnx", "--out", str(out)]) == 0
    batch = make_batch(512, "padding", seed=6)
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    answer = node(tmp_path, "logits", out / "model.onnx", {k: v.tolist() for k, v in feeds.items()})
    theirs = np.asarray(answer["logits"]["data"], np.float32).reshape(answer["logits"]["shape"])
    ours = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
