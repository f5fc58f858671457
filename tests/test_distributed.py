"""--workers N on Ray: the same steps as one process with gradient accumulation N, the same checkpoint files
(each resumes the other), and a worker killed during training replaced without changing the result."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from ortlora.runtime import cli as train_cli
from tests.reference import rel_err

ray = pytest.importorskip("ray")

COMMON = ["--no-progress", "--no-plot", "--batch-size", "4", "--lr", "1e-2", "--max-steps", "10",
          "--weight-decay", "0.01", "--data", "builtin:completions"]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    yield
    ray.shutdown()  # the CLI leaves the local cluster it started to its process's exit


def train(artifacts: Path, out: Path, *extra: str) -> None:
    assert train_cli.main(["--artifacts", str(artifacts), "--out", str(out), *COMMON, *extra]) == 0


def adapter(run: Path, step: int = 10) -> dict[str, np.ndarray]:
    return load_file(str(run / f"checkpoint-{step}" / "adapter_model.safetensors"))


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def assert_same_training(run: Path, reference: Path) -> None:
    ours, theirs = adapter(run), adapter(reference)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert rel_err(ours[name], theirs[name]) < 1e-5, name
    assert np.allclose(losses(run), losses(reference), rtol=1e-6)
    evals = [json.loads((r / "summary.json").read_text())["eval_loss"] for r in (run, reference)]
    assert evals[0] == pytest.approx(evals[1], rel=1e-6)  # evaluated on every worker at once, the same loss


@pytest.fixture(scope="module")
def reference(artifacts, tmp_path_factory) -> Path:
    """One process, gradient accumulation 2: what two workers must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(artifacts, run, "--grad-accum", "2", "--save-every", "5")
    return run


def test_two_workers_equal_gradient_accumulation(artifacts, reference, tmp_path):
    run = tmp_path / "run"
    train(artifacts, run, "--workers", "2", "--save-every", "5")
    assert_same_training(run, reference)
    assert any(rel_err(adapter(run)[k], adapter(reference, 5)[k]) > 1e-3 for k in adapter(run))  # it did train
    assert json.loads((run / "config.json").read_text())["workers"] == 2


def test_checkpoints_resume_across_worker_counts(artifacts, reference, tmp_path):
    """A two-worker run resumes in one process, and a one-process run on two workers: the same step 10."""
    single_then_ray = tmp_path / "a"
    assert train_cli.main(["--resume", str(reference / "checkpoint-5"), "--out", str(single_then_ray), "--workers", "2",
                           "--grad-accum", "1", "--no-progress", "--no-plot"]) == 0
    assert_same_training_at_10(single_then_ray, reference)

    ray_run = tmp_path / "ray"
    train(artifacts, ray_run, "--workers", "2", "--save-every", "5", "--max-steps", "10")
    ray_then_single = tmp_path / "b"
    assert train_cli.main(["--resume", str(ray_run / "checkpoint-5"), "--out", str(ray_then_single), "--workers", "1",
                           "--grad-accum", "2", "--no-progress", "--no-plot"]) == 0
    assert_same_training_at_10(ray_then_single, reference)


def assert_same_training_at_10(run: Path, reference: Path) -> None:
    ours, theirs = adapter(run), adapter(reference)
    for name in theirs:
        assert rel_err(ours[name], theirs[name]) < 1e-5, name


def worker_pids() -> list[int]:
    """Ray's worker processes of class Worker on this machine (Ray titles them ray::Worker...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::Worker"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return sorted(pids)


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray's worker processes through /proc")
def test_a_killed_worker_is_replaced_and_the_result_is_unchanged(artifacts, reference, tmp_path):
    run = tmp_path / "run"
    killed = []

    def kill_one_after_step_3():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            log = run / "log.jsonl"
            if log.exists() and any(json.loads(line).get("step", 0) >= 3 for line in log.read_text().splitlines()):
                pids = worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_one_after_step_3)
    watcher.start()
    train(artifacts, run, "--workers", "2", "--save-every", "5")
    watcher.join()
    assert killed
    notes = [r["text"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "message"]
    assert any("was lost; a new one took its place" in text for text in notes), notes
    assert_same_training(run, reference)


def test_bad_settings_are_one_line(artifacts, tmp_path, capsys):
    assert train_cli.main(["--artifacts", str(artifacts), "--out", str(tmp_path / "r"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    # An address where nothing listens: one line at once, not Ray's minutes of retries; nothing written.
    for address, message in (("127.0.0.1:1", "--ray-address 127.0.0.1:1: nothing answers at 127.0.0.1:1"),
                             ("headnode", "--ray-address takes auto, HOST:PORT or ray://HOST:PORT")):
        start = time.monotonic()
        assert train_cli.main(["--artifacts", str(artifacts), "--out", str(tmp_path / "r"), "--workers", "2",
                               "--ray-address", address]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and time.monotonic() - start < 30, err
        assert not (tmp_path / "r").exists()
