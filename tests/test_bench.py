"""scripts/bench.py end to end on the tiny model: build, every system, the table and the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_bench_builds_and_measures_every_system(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--build", "tiny", "--artifacts", str(tmp_path / "tiny"),
         "--steps", "2", "--warmup", "1", "--threads", "1", "--data", "masked", "--json", str(out),
         "--systems", "ort-training,ort-session,torch,torch-bf16", "--accuracy", str(tmp_path / "accuracy")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["build"]["seconds"] > 0 and report["build"]["peak_rss_mb"] > 0
    for system in ("ort-training", "ort-session", "torch", "torch-bf16"):
        r = report["results"][system]
        assert "error" not in r, (system, r)
        assert len(r["step_s"]) == 2 and r["peak_rss_mb"] > 0 and r["loss"] > 0
        assert system in result.stdout
    # The same seeded batches, base weights and AdamW: the backends' last losses agree, and torch's
    # (its own random LoRA A, the same zero B) is close.
    loss = {s: report["results"][s]["loss"] for s in ("ort-training", "ort-session", "torch")}
    assert abs(loss["ort-training"] - loss["ort-session"]) < 1e-4 * loss["torch"], loss
    assert abs(loss["ort-training"] - loss["torch"]) < 1e-2 * loss["torch"], loss
    assert "bf16 autocast" in report["results"]["torch-bf16"]["version"]
    assert abs(report["results"]["torch-bf16"]["loss"] - loss["torch"]) < 2e-2 * loss["torch"]  # bf16, not another model
    assert "build (ortlora-build q_proj,v_proj, r=8; once per model)" in result.stdout
    assert "matmul FLOPs a step" in result.stdout
    # --accuracy: each system's loss and gradients at the same non-zero LoRA weights against PyTorch + PEFT in fp32.
    errors = report["accuracy"]
    assert set(errors) == {"ort-training", "ort-session", "torch-bf16"}
    for system in ("ort-training", "ort-session"):
        assert errors[system]["loss"] < 1e-5 and errors[system]["largest"] < 1e-4, errors  # seen: 4e-6 at most
    assert errors["torch-bf16"]["median"] > 1e-3, errors  # bf16 products ran (seen: 5e-2)
    assert "accuracy on the first 4 batches" in result.stdout
