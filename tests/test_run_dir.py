"""Run directories that tell the truth: the latest checkpoint is the one written last, one run at a
time, a finished run stays as it is, Ctrl-C saves, and NaN never reaches a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ortlora.handoff import cli as export_cli
from ortlora.manifest import Manifest
from ortlora.runtime import cli as train_cli
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.checkpoint import find_checkpoint, load_adapter
from ortlora.runtime.data import collate, load_jsonl
from ortlora.runtime.run_dir import RunDir
from ortlora.runtime.tokenizer import Tokenizer

FAST = ["--no-progress", "--no-plot", "--batch-size", "4"]


def train(*args: str) -> int:
    return train_cli.main([*args, *FAST])


def strict_json(path: Path):
    """JSON as the standard has it: NaN and Infinity are refused."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_overwrite_starts_over_and_the_latest_checkpoint_is_the_last_written(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "12", "--save-every", "3") == 0
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "4", "--overwrite") == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4"]
    assert find_checkpoint(run).name == "checkpoint-4"
    assert (run / "checkpoint-4").stat().st_mode & 0o777 == run.stat().st_mode & 0o777  # not a temp dir's 0700
    assert strict_json(run / "summary.json")["checkpoint"].endswith("checkpoint-4")
    out = tmp_path / "adapter"
    capsys.readouterr()
    assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(run), "--to", "peft", "--out", str(out)]) == 0
    assert "from " + str(run / "checkpoint-4") in capsys.readouterr().out


def test_resuming_an_earlier_checkpoint_abandons_the_later_ones(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "12", "--save-every", "3") == 0
    capsys.readouterr()
    assert train("--resume", str(run / "checkpoint-3"), "--max-steps", "5") == 0
    assert "checkpoint-6 to checkpoint-12 in" in capsys.readouterr().out
    assert find_checkpoint(run).name == "checkpoint-5"  # not the abandoned branch's checkpoint-12
    steps = [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]  # the abandoned branch's records are gone from the log


def test_a_finished_run_is_left_as_it_is_and_a_longer_one_continues(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "3") == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert train("--resume", str(run)) == 0
    assert "has done all 3 steps of its run; nothing to do" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert train("--resume", str(run), "--max-steps", "5") == 0
    assert strict_json(run / "summary.json")["steps"] == 5 and find_checkpoint(run).name == "checkpoint-5"


def test_one_run_at_a_time_in_a_run_directory(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    holder = RunDir(run)  # as a training process holds it
    try:
        assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "1", "--overwrite") == 2
        err = capsys.readouterr().err
        assert f"is in use by another ortlora-train (process {os.getpid()})" in err and err.count("\n") == 1
    finally:
        holder.close()
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "1", "--overwrite") == 0


def test_a_torn_log_line_does_not_stop_a_resume(artifacts, tmp_path):
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "2") == 0
    with (run / "log.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')  # a killed writer's half line
    assert train_cli.main(["--resume", str(run), "--max-steps", "3", "--no-progress", "--plot"]) == 0  # reads the log
    assert (run / "loss.png").is_file()


def test_ctrl_c_saves_at_the_next_step_and_the_resume_is_exact(artifacts, tmp_path):
    settings = ["--artifacts", str(artifacts), "--max-steps", "1500", "--no-progress", "--no-plot", "--batch-size", "2",
                "--schedule", "constant"]
    run = tmp_path / "run"
    process = subprocess.Popen([str(Path(sys.executable).parent / "ortlora-train"), *settings, "--out", str(run)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((run / "log.jsonl").is_file() and (run / "log.jsonl").stat().st_size) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert f"continue with: ortlora-train --resume {run}" in err and "Traceback" not in err
    stopped = find_checkpoint(run)
    step = int(stopped.name.split("-")[1])
    assert 0 < step < 1500
    assert train_cli.main(["--resume", str(run)]) == 0
    reference = tmp_path / "reference"
    assert train_cli.main([*settings, "--out", str(reference)]) == 0
    manifest = Manifest.load(artifacts)
    resumed, whole = (load_adapter(find_checkpoint(r), manifest) for r in (run, reference))
    for name in whole:
        np.testing.assert_array_equal(resumed[name], whole[name])


def test_a_diverging_run_saves_weights_that_still_give_a_finite_loss(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    code = train("--artifacts", str(artifacts), "--out", str(run), "--lr", "1e3", "--max-grad-norm", "0",
                 "--schedule", "constant", "--max-steps", "60")
    err = capsys.readouterr().err
    assert code == 2 and "the last weights with a finite loss" in err
    manifest = Manifest.load(artifacts)
    saved = find_checkpoint(run)
    backend = OrtTrainingBackend(artifacts, manifest)
    backend.set_weights(load_adapter(saved, manifest))
    examples, _ = load_jsonl(train_cli.data_path("builtin:chat", "train"), Tokenizer(artifacts), 512)
    assert np.isfinite(backend.eval_loss(collate(examples[:4], 0)))
    assert np.isfinite(strict_json(saved / "trainer_state.json")["position"]["step"])
    assert train("--resume", str(run), "--lr", "1e-4", "--max-steps", str(int(saved.name.split("-")[1]) + 2)) == 0
    assert np.isfinite(strict_json(run / "summary.json")["train_loss"])


@pytest.mark.parametrize("option, value, says", [
    ("--lr", "nan", "--lr must be positive and finite"),
    ("--lr", "inf", "--lr must be positive and finite"),
    ("--beta1", "1", "--beta1 must be in [0, 1)"),
    ("--beta2", "2", "--beta2 must be in [0, 1)"),
    ("--weight-decay", "-0.1", "--weight-decay must be 0 or more"),
    ("--warmup-steps", "-1", "--warmup-steps must be 0 or more"),
    ("--threads", "-1", "--threads must be positive"),
    ("--save-every", "-5", "--save-every must be 0 or more"),
    ("--max-grad-norm", "-1", "--max-grad-norm must be 0 or more"),
    ("--adam-eps", "0", "--adam-eps must be positive"),
    ("--eval-split", "nan", "--eval-split must be in [0, 1)"),
    ("--min-lr", "1", "--min-lr (1.0) must not exceed --lr"),
    ("--max-seq-len", "100000", "longer than the model's context (max_position_embeddings 512)"),
])
def test_settings_out_of_range_are_one_line(artifacts, tmp_path, capsys, option, value, says):
    assert train("--artifacts", str(artifacts), "--out", str(tmp_path / "run"), option, value) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_an_eval_split_that_leaves_no_training_data_is_refused(artifacts, tmp_path, capsys):
    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "a single example"}\n')
    assert train("--artifacts", str(artifacts), "--out", str(tmp_path / "run"), "--data", str(data),
                 "--eval-split", "0.5") == 2
    assert "needs at least 2 training examples" in capsys.readouterr().err


def test_toml_paths_are_relative_to_the_file_and_saved_absolute(artifacts, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "run.toml").write_text(f'artifacts = "{os.path.relpath(artifacts, project / "configs")}"\n'
                                                  'out = "../runs/a"\nmax_steps = 2\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert train("--config", str(project / "configs" / "run.toml")) == 0
    saved = strict_json(project / "runs" / "a" / "config.json")
    assert saved["artifacts"] == str(artifacts) and saved["out"] == str(project / "runs" / "a")
    monkeypatch.chdir(tmp_path)
    assert train("--resume", str(project / "runs" / "a"), "--max-steps", "3") == 0


def test_the_first_line_names_the_artifacts_and_base_model(artifacts, tmp_path, capsys):
    assert train("--artifacts", str(artifacts), "--out", str(tmp_path / "run"), "--max-steps", "1") == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert str(artifacts) in first and str((artifacts / "base_model").resolve()) in first


def test_help_shows_each_default_once_and_abbreviations_are_refused(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: runs/NAME-TIME) (default" not in text
    assert "(default: 0.0002)" in text and "(default: runs/NAME-TIME)" in text
    for abbreviation in ("--epoch", "--max-step"):
        with pytest.raises(SystemExit):
            train_cli.main([abbreviation, "2"])
        assert "unrecognized arguments" in capsys.readouterr().err


def test_resume_refuses_an_optimizer_state_of_other_weights(artifacts, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "2") == 0
    path = run / "checkpoint-2" / "optimizer.safetensors"
    state = load_file(str(path))
    renamed = {k.replace("q_proj", "k_proj"): v for k, v in state.items()}  # AdamW would silently start over
    save_file(renamed, str(path))
    capsys.readouterr()
    # Into the same directory, the changed file is not the run's own any more (ownership.py): refused as such.
    assert train("--resume", str(run), "--max-steps", "3") == 2
    assert "checkpoint-2/optimizer.safetensors, which ortlora-train did not write" in capsys.readouterr().err
    assert train("--resume", str(run), "--max-steps", "3", "--out", str(tmp_path / "elsewhere")) == 2
    err = capsys.readouterr().err
    assert "optimizer.safetensors does not match the artifacts" in err and err.count("\n") == 1
    assert find_checkpoint(run).name == "checkpoint-2"


def test_a_checkpoint_renamed_in_before_the_record_was_updated_is_the_latest(artifacts, tmp_path):
    """A kill between a checkpoint's rename into place and the update of ortlora-run.json."""
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "6", "--save-every", "3") == 0
    seq = strict_json(run / "checkpoint-3" / "trainer_state.json")["seq"]
    (run / "ortlora-run.json").write_text(json.dumps({"latest": "checkpoint-3", "seq": seq}))
    assert find_checkpoint(run).name == "checkpoint-6"
    (run / "ortlora-run.json").write_text(json.dumps({"latest": None, "seq": 0}))  # before the first record
    assert find_checkpoint(run).name == "checkpoint-6"


def test_a_run_stopped_before_its_first_checkpoint_is_started_again_without_overwrite(artifacts, tmp_path, capsys,
                                                                                      monkeypatch):
    from ortlora.runtime import trainer as trainer_module

    run = tmp_path / "run"

    def one_step_then_die(self):  # killed before its first save, its first step logged
        self._emit({"kind": "train", "step": 1})
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "train", one_step_then_die)
        assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "2") == 1
    assert '"step": 1' in (run / "log.jsonl").read_text()
    assert train("--resume", str(run)) == 2
    assert "started again with the same --out, not resumed" in capsys.readouterr().err
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "2") == 0
    assert find_checkpoint(run).name == "checkpoint-2"
    assert [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if r["kind"] == "train"] == [1, 2]  # the killed attempt's log is gone
