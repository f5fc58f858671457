"""scripts/soak.py end to end: one killed training run, build and export (seed 1: a merged export), checked
and finished. The soak itself, 50 trials, is run by hand (docs); this keeps the script working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")  # the soak builds the tiny artifacts with ortlora-build

ROOT = Path(__file__).resolve().parents[1]


def test_soak_three_trials(tmp_path):
    cmd = [sys.executable, str(ROOT / "scripts" / "soak.py"), "--trials", "3", "--seed", "1", "--steps", "30",
           "--work", str(tmp_path / "soak")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("[")] == ["build", "export", "train"]
    summary = {line[2:28].strip(): line[28:] for line in lines if line.startswith("  ")}
    assert summary["trials"] == "build 1, export 1, train 1 (export: merged 1)"
    assert summary["incomplete outputs"].startswith("0 ") and summary["lost outputs"].startswith("0 ")
    assert summary["max diff vs reference"].startswith("0.0 ") and summary["failures"] == "0"
    assert not (tmp_path / "soak").exists()  # removed on success without --keep
