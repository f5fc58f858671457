"""Other Python environments the tests run code in: the newest plain onnxruntime (.venv-ort),
onnxruntime-openvino (.venv-ov), onnxruntime-genai (.venv-genai), llama.cpp (.venv-llama), mlx-lm (.venv-mlx) and
the plugin providers onnxruntime-ggml (.venv-ggml), onnxruntime-ep-openvino (.venv-ep-ov) and onnxruntime-ep-webgpu
on Mesa's lavapipe (.venv-webgpu).
Each is skipped where it is absent, except in CI, which creates them all."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
ENVIRONMENTS = {  # name -> (its folder, the variable that names another interpreter, what it holds)
    "plain-ort": (".venv-ort", "ORTLORA_PLAIN_ORT_PYTHON", "the plain onnxruntime package"),
    "openvino": (".venv-ov", "ORTLORA_OPENVINO_PYTHON", "onnxruntime-openvino"),
    "genai": (".venv-genai", "ORTLORA_GENAI_PYTHON", "onnxruntime-genai"),
    "llama": (".venv-llama", "ORTLORA_LLAMA_PYTHON", "llama-cpp-python (llama.cpp built from source)"),
    "mlx": (".venv-mlx", "ORTLORA_MLX_PYTHON", "mlx-lm on mlx's CPU build"),
    "ggml": (".venv-ggml", "ORTLORA_GGML_PYTHON", "the plugin provider onnxruntime-ggml on the plain onnxruntime"),
    "ep-openvino": (".venv-ep-ov", "ORTLORA_EP_OPENVINO_PYTHON",
                    "the plugin provider onnxruntime-ep-openvino on the plain onnxruntime"),
    "webgpu": (".venv-webgpu", "ORTLORA_WEBGPU_PYTHON",
               "the plugin provider onnxruntime-ep-webgpu on the plain onnxruntime (>= 1.31), Mesa's lavapipe for Vulkan"),
}


def python_of(name: str) -> Path | None:
    """The interpreter of environment ``name``, or None where it does not exist."""
    folder, variable, _ = ENVIRONMENTS[name]
    given = os.environ.get(variable)
    path = Path(given) if given else ROOT / folder / "bin" / "python"
    return path if path.is_file() else None


def needs(name: str):
    """Skip a test where environment ``name`` is absent; never in CI, which must create it."""
    folder, _, holds = ENVIRONMENTS[name]
    return pytest.mark.skipif(python_of(name) is None and not os.environ.get("CI"),
                              reason=f"no {folder} with {holds}: create it as .ci/run does")


def run_in(name: str, script: str) -> dict:
    """Run ``script`` with environment ``name``'s interpreter; it prints one JSON line last, which is returned."""
    python = python_of(name)
    assert python, f"CI must create {ENVIRONMENTS[name][0]} (see .ci/run)"
    result = subprocess.run([str(python), "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
