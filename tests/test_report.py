"""What people plot: the numbers in every log record, and --report-to tensorboard's event files read back
and compared with the JSON Lines log, across a resume that rewrites steps."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from ortlora.runtime import cli as train_cli

tensorboardX = pytest.importorskip("tensorboardX")
from tensorboardX.proto import event_pb2  # noqa: E402

FAST = ["--no-progress", "--no-plot", "--batch-size", "4"]
# The JSONL field behind each TensorBoard tag (the tags are the interface people's dashboards use).
TAGS = {"train/loss": ("train", "loss"), "train/learning_rate": ("train", "lr"), "train/grad_norm": ("train", "grad_norm"),
        "train/tokens_per_s": ("train", "tokens_per_s"), "train/trained_tokens": ("train", "trained_tokens"),
        "train/peak_rss_mb": ("train", "peak_rss_mb"), "eval/loss": ("eval", "eval_loss"),
        "eval/perplexity": ("eval", "eval_perplexity")}


def train(*args: str) -> int:
    return train_cli.main([*args, *FAST])


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def read_events(path: Path) -> list:
    """A TFRecord file: each record is its length (uint64), a CRC of it, the bytes (an Event), their CRC."""
    events, data = [], path.read_bytes()
    at = 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
        at += 12 + length + 4
    assert at == len(data), f"{path} ends inside a record"
    return events


def scalars(run: Path) -> tuple[dict[str, list[tuple[int, float]]], int]:
    """Scalars by tag as TensorBoard shows them: files in the order written, and a SessionLog START at step s
    (a restarted run's purge_step) dropping what earlier files logged at step s and after. Also the number of
    scalar events before that purge."""
    paths = sorted((run / "tensorboard").iterdir())  # TensorBoard reads a directory's files in name order
    files = [read_events(p) for p in paths]
    assert [e[0].wall_time for e in files] == sorted(e[0].wall_time for e in files)  # the order written
    found, raw = {}, 0
    for events in files:
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                found = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in found.items()}
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value.simple_value))
                raw += 1
    return found, raw


def expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """The JSONL log's values as TensorBoard stores them (32-bit floats)."""
    return {tag: [(r["step"], float(np.float32(r[key]))) for r in records(run, kind)] for tag, (kind, key) in TAGS.items()}


def test_log_records_and_tensorboard_scalars_agree_across_a_resume(artifacts, tmp_path):
    run = tmp_path / "run"
    common = ["--max-steps", "6", "--eval-every", "2", "--save-every", "2", "--report-to", "tensorboard"]
    assert train("--artifacts", str(artifacts), "--out", str(run), *common) == 0
    log = records(run, "train")
    for r in log:  # what people plot, in every train record
        assert {"loss", "lr", "grad_norm", "tokens", "trained_tokens", "tokens_per_s", "peak_rss_mb"} <= r.keys()
    assert [r["trained_tokens"] for r in log] == list(np.cumsum([r["tokens"] for r in log]))
    found, raw = scalars(run)
    assert found == expected(run) and raw == 6 * 6 + 3 * 2  # six train tags a step, two eval tags at 2, 4 and 6

    # A second branch from step 4 at another learning rate: steps 5 and 6 are logged again, differently.
    first_branch = {r["step"]: r["loss"] for r in log}
    assert train("--resume", str(run / "checkpoint-4"), "--max-steps", "6", "--lr", "1e-2") == 0
    log = records(run, "train")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and log[5]["loss"] != first_branch[6]
    assert [r["trained_tokens"] for r in log] == list(np.cumsum([r["tokens"] for r in log]))  # counted on from step 4
    assert len(list((run / "tensorboard").iterdir())) == 2  # one event file per process
    found, raw = scalars(run)
    assert raw == 2 * (6 * 6 + 3 * 2) - (4 * 6 + 2 * 2)  # the second process logged steps 5 and 6 (and eval 6)
    assert found == expected(run)  # the first branch's steps 5 and 6 dropped, each step once

    # --overwrite starts the event files over with the rest of the run.
    assert train("--artifacts", str(artifacts), "--out", str(run), "--overwrite", "--max-steps", "2",
                 "--report-to", "tensorboard") == 0
    found, _ = scalars(run)
    assert len(list((run / "tensorboard").iterdir())) == 1 and found == expected(run)
    assert [s for s, _ in found["train/loss"]] == [1, 2]


def test_without_tensorboardx_report_to_tensorboard_says_what_to_install(artifacts, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed: importing it raises ImportError
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--report-to", "tensorboard") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "ortlora[tensorboard]"' in err
    assert not run.exists()  # refused before any work
    with pytest.raises(SystemExit):  # argparse's one-line usage error
        train("--artifacts", str(artifacts), "--out", str(run), "--report-to", "wandb")
    assert "argument --report-to: invalid choice: 'wandb'" in capsys.readouterr().err
