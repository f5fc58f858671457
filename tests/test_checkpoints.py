"""The best checkpoint, early stopping and --keep-last: what each run keeps, RUN/best wherever a checkpoint is
named, and a resume (or a kill during a removal) that ends as the uninterrupted run does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from ortlora.handoff import cli as export_cli
from ortlora.manifest import Manifest
from ortlora.runtime import cli as train_cli
from ortlora.runtime import generate_cli
from ortlora.runtime import trainer as trainer_module
from ortlora.runtime.checkpoint import find_checkpoint, load_adapter
from ortlora.runtime.trainer import Trainer

FAST = ["--no-progress", "--no-plot", "--batch-size", "4"]
# On the tiny model at this learning rate the eval loss falls until step 30, then rises: with patience 3 the
# run stops at step 36 of 40 (evaluations at 32, 34, 36 do not beat 30's). Evaluating and saving every 2 steps
# writes a checkpoint at every evaluation, so --keep-last 2 has older ones to remove, the best among them.
# The tests work the stop, the best and the kept checkpoints out of the eval log; these figures only say why
# the settings make an early stop happen.
STOPS = ["--max-steps", "40", "--eval-every", "2", "--save-every", "2", "--lr", "0.1", "--schedule", "constant",
         "--early-stop-patience", "3", "--keep-last", "2"]


def train(*args: str) -> int:
    return train_cli.main([*args, *FAST])


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def checkpoints(run: Path) -> list[str]:
    return sorted((p.name for p in run.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def expected_from_log(run: Path, patience: int, keep: int, save_every: int) -> tuple[int, int, list[str]]:
    """The stop step, the best step and the checkpoints left, worked out from the eval records alone."""
    best, waiting, saved = None, 0, []
    for r in records(run, "eval"):
        step, loss = r["step"], r["eval_loss"]
        if best is None or loss < best[1]:
            best, waiting = (step, loss), 0
            saved.append(step)  # every new best is saved
        else:
            waiting += 1
        if step % save_every == 0:
            saved.append(step)
        if waiting >= patience:
            break
    stop = step
    saved = sorted(set(saved) | {stop})
    kept = sorted(set(saved[-keep:]) | {best[0]})
    return stop, best[0], [f"checkpoint-{s}" for s in kept]


def test_early_stop_keeps_the_best_and_the_newest(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), *STOPS) == 0
    summary = json.loads((run / "summary.json").read_text())
    stop, best, kept = expected_from_log(run, patience=3, keep=2, save_every=2)
    assert summary["stopped_early"] and stop < 40  # the run did stop early, at the step the eval losses say
    assert summary["steps"] == stop and max(r["step"] for r in records(run, "train")) == stop
    assert "3 evaluations (--early-stop-patience 3)" in summary["stop_reason"]
    assert summary["best_step"] == best and summary["best_checkpoint"] == str(run / f"checkpoint-{best}")
    assert summary["best_eval_loss"] == min(r["eval_loss"] for r in records(run, "eval"))
    assert best not in (stop, stop - 2)  # the best is older than the two newest, and still there
    assert checkpoints(run) == kept == summary["checkpoints"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".checkpoint-")]  # no half-removed leftovers
    assert summary["checkpoint"] == str(run / f"checkpoint-{stop}") and find_checkpoint(run).name == f"checkpoint-{stop}"

    # RUN/best wherever a checkpoint is named: the checkpoint whose weights scored the best eval loss.
    assert find_checkpoint(run / "best") == run / f"checkpoint-{best}"
    with safe_open(str(run / f"checkpoint-{best}" / "adapter_model.safetensors"), "np") as f:
        assert f.metadata()["step"] == str(best)
    capsys.readouterr()
    out = tmp_path / "exported"
    assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(run / "best"), "--to", "peft",
                            "--out", str(out)]) == 0
    assert json.loads((out / "ortlora-export.json").read_text())["adapter"] == str((run / f"checkpoint-{best}").resolve())
    assert generate_cli.main(["--artifacts", str(artifacts), "--adapter", str(run / "best"), "--prompt", "Hi",
                              "--max-new-tokens", "2"]) == 0
    started = tmp_path / "from-best"  # --init-adapter RUN/best: a new run starts from the best weights
    assert train("--artifacts", str(artifacts), "--out", str(started), "--init-adapter", str(run / "best"),
                 "--max-steps", "1", "--lr", "1e-9") == 0
    manifest = Manifest.load(artifacts)
    after, best_weights = (load_adapter(d, manifest) for d in (started / "checkpoint-1", run / f"checkpoint-{best}"))
    assert all(np.allclose(after[k], best_weights[k], rtol=0, atol=1e-7) for k in after)

    # An early-stopped run is finished: resuming it does nothing unless the patience grows.
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".ortlora-run.lock"}
    assert train("--resume", str(run)) == 0
    assert "stopped early at step" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".ortlora-run.lock"} == before

    # A best checkpoint removed by hand is named, in one line.
    for p in sorted((run / f"checkpoint-{best}").iterdir()):
        p.unlink()
    (run / f"checkpoint-{best}").rmdir()
    capsys.readouterr()
    assert generate_cli.main(["--artifacts", str(artifacts), "--adapter", str(run / "best"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"best checkpoint, checkpoint-{best} (eval loss" in err and "is gone" in err


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C during step ``step``: the trainer saves after it and stops, as the signal handler makes it."""
    emit = Trainer._emit

    def emit_and_interrupt(self, record):
        emit(self, record)
        if record["kind"] == "train" and record["step"] == step:
            self.stop_requested = "SIGINT"

    monkeypatch.setattr(Trainer, "_emit", emit_and_interrupt)


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = (json.loads((run / "summary.json").read_text()) for run in (a, b))
    for key in ("steps", "stopped_early", "stop_reason", "best_step", "checkpoints", "run_trained_tokens"):
        assert sa[key] == sb[key], key
    assert sa["best_eval_loss"] == pytest.approx(sb["best_eval_loss"], rel=1e-6)
    assert checkpoints(a) == checkpoints(b)
    assert find_checkpoint(a / "best").name == find_checkpoint(b / "best").name
    for kind, key in (("eval", "eval_loss"), ("train", "loss")):
        assert [r["step"] for r in records(a, kind)] == [r["step"] for r in records(b, kind)]
        assert [r[key] for r in records(a, kind)] == pytest.approx([r[key] for r in records(b, kind)], rel=1e-6)


def test_an_interrupted_run_resumes_to_the_same_best_stop_and_checkpoints(artifacts, tmp_path, monkeypatch):
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    assert train("--artifacts", str(artifacts), "--out", str(full), *STOPS) == 0
    best = json.loads((full / "summary.json").read_text())["best_step"]
    with monkeypatch.context() as m:
        # The step after the best, with evaluations without improvement still to come before the stop.
        interrupt_at(m, best + 1)
        assert train("--artifacts", str(artifacts), "--out", str(interrupted), *STOPS) == 130
    assert f"checkpoint-{best + 1}" in checkpoints(interrupted)
    assert find_checkpoint(interrupted / "best").name == f"checkpoint-{best}"
    assert train("--resume", str(interrupted)) == 0
    assert_same_run(full, interrupted)  # the interrupted step's checkpoint, an extra one, went the way of --keep-last too


def test_a_kill_during_a_removal_keeps_the_newest_and_the_best(artifacts, tmp_path, monkeypatch):
    """--keep-last removes only after the newer checkpoint is in place; a kill in the middle of the removals
    leaves the newest and the best loadable, and the resume finishes what the kill left."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert train("--artifacts", str(artifacts), "--out", str(full), *STOPS) == 0

    class Killed(BaseException):
        pass

    remove, removals = trainer_module.remove_checkpoint, []

    def remove_then_die(checkpoint: Path) -> bool:
        run = checkpoint.parent
        # Before any removal the newest checkpoint, which names the best, is complete, and neither is removed.
        newest, best = find_checkpoint(run), find_checkpoint(run / "best")
        assert checkpoint not in (newest, best) and (newest / "trainer_state.json").is_file()
        removals.append(checkpoint.name)
        if len(removals) == 6:
            raise Killed  # as SIGKILL would stop it: nothing after this runs
        return remove(checkpoint)

    monkeypatch.setattr(trainer_module, "remove_checkpoint", remove_then_die)
    with pytest.raises(Killed):
        train("--artifacts", str(artifacts), "--out", str(killed), *STOPS)
    monkeypatch.setattr(trainer_module, "remove_checkpoint", remove)
    left = checkpoints(killed)
    assert removals[-1] in left  # cut short: still there, beside the newest and the best
    assert load_adapter(find_checkpoint(killed), Manifest.load(artifacts))
    assert load_adapter(find_checkpoint(killed / "best"), Manifest.load(artifacts))
    assert train("--resume", str(killed)) == 0
    assert_same_run(full, killed)


def test_best_needs_an_evaluation(artifacts, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(8)))
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--data", str(data), "--max-steps", "2") == 0
    assert json.loads((run / "summary.json").read_text())["best_checkpoint"] is None
    capsys.readouterr()
    assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(run / "best"), "--to", "peft",
                            "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no best checkpoint yet: no evaluation has run in it" in err
    assert not (tmp_path / "out").exists()

    # Early stopping counts evaluations during training: it needs them, and evaluation data.
    assert train("--artifacts", str(artifacts), "--out", str(tmp_path / "r2"), "--early-stop-patience", "2") == 2
    assert "pass --eval-every N too" in capsys.readouterr().err
    assert train("--artifacts", str(artifacts), "--out", str(tmp_path / "r3"), "--data", str(data),
                 "--early-stop-patience", "2", "--eval-every", "1") == 2
    assert "needs evaluation data" in capsys.readouterr().err
    assert train("--artifacts", str(artifacts), "--out", str(tmp_path / "r4"), "--keep-last", "-1") == 2
    assert "--keep-last must be 0 or more" in capsys.readouterr().err
