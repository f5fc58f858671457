"""Nothing of the user's is ever deleted or replaced: files planted in every kind of directory that a command
writes (a build, an export, a run and its checkpoints) survive every command and flag, and the refusal is one
line that never advises the flag that would destroy them (ownership.py states the rule)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ortlora.build import builder
from ortlora.build import cli as build_cli
from ortlora.handoff import cli as export_cli
from ortlora.ownership import FILES_RECORD, seal, signed
from ortlora.runtime import cli as train_cli
from ortlora.runtime import trainer as trainer_module
from ortlora.runtime.run_dir import RUN_STATE, remove_checkpoint

FAST = ["--no-progress", "--no-plot", "--batch-size", "4"]


def refused(capsys, code: int, *flags: str) -> str:
    """The one-line refusal of a command that touched nothing; it names none of ``flags``."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "did not write" in err, err
    for flag in flags:
        assert flag not in err, err
    return err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def planted(directory: Path, name: str, content: bytes = b"the user's own") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# -- ortlora-build and ortlora-export: --force replaces only a directory all of whose files are proven theirs --
def build(out: Path, *flags: str) -> int:
    return build_cli.main(["--tiny", "--out", str(out), *flags])


def export(artifacts: Path, adapter: Path, out: Path, *flags: str, to: str = "peft") -> int:
    return export_cli.main(["--artifacts", str(artifacts), "--adapter", str(adapter), "--to", to, "--out", str(out),
                            *flags])


@pytest.mark.parametrize("plant", ["notes.txt", "sub/notes.txt", "frozen_weights.bin", FILES_RECORD, "ortlora.json",
                                   "empty-folder/", "link"])
def test_build_force_never_removes_a_file_it_did_not_write(tmp_path, capsys, artifacts, plant):
    out = tmp_path / "built"
    shutil.copytree(artifacts, out)  # a genuine build
    if plant == "empty-folder/":
        (out / "empty-folder").mkdir()
    elif plant == "link":
        (out / "link").symlink_to(tmp_path)
    else:  # a new file, or one of the build's own files changed by the user
        planted(out, plant, b"changed by the user")
    before = snapshot(out)
    assert build(out, "--force") == 2
    refused(capsys, 2, "--force")
    assert snapshot(out) == before and (out / "link").is_symlink() == (plant == "link")
    assert not list(tmp_path.glob(".built.*"))


def test_export_force_never_removes_a_file_it_did_not_write(tmp_path, capsys, artifacts, trained_adapter):
    for to in ("peft", "mlx"):
        out = tmp_path / to
        assert export(artifacts, trained_adapter, out, to=to) == 0
        assert export(artifacts, trained_adapter, out, "--force", to=to) == 0  # all its own: replaced
        user = planted(out, "README.md")
        before = snapshot(out)
        assert export(artifacts, trained_adapter, out, "--force", to=to) == 2
        assert "README.md, which ortlora-export did not write" in refused(capsys, 2, "--force")
        assert snapshot(out) == before
        user.unlink()
        assert export(artifacts, trained_adapter, out, "--force", to=to) == 0


@pytest.mark.parametrize("marker", ["ortlora.json", "ortlora-export.json", FILES_RECORD, "ortlora.json/"])
def test_a_hand_made_record_proves_nothing(tmp_path, capsys, artifacts, trained_adapter, marker):
    out = tmp_path / "mine"
    planted(out, "thesis.tex")
    if marker.endswith("/"):
        (out / marker).mkdir()
    else:  # a record that looks like ortlora's and lists the user's file, without ortlora's checksum
        files = {"thesis.tex": {"size": 15, "sha256": "0" * 64}}
        planted(out, marker, json.dumps({"ortlora": "files", "files": files, "checksum": "0" * 64}).encode())
    before = snapshot(out)
    assert build(out, "--force") == 2
    refused(capsys, 2, "--force")
    assert export(artifacts, trained_adapter, out, "--force") == 2
    refused(capsys, 2, "--force")
    assert snapshot(out) == before


def test_a_file_added_while_the_build_runs_is_not_removed(tmp_path, capsys, artifacts, monkeypatch):
    out = tmp_path / "built"
    shutil.copytree(artifacts, out)
    build_into = builder._build_into

    def plant_then_build(*args, **kwargs):
        planted(out, "added-meanwhile.txt")
        return build_into(*args, **kwargs)

    monkeypatch.setattr(builder, "_build_into", plant_then_build)
    assert build(out, "--force") == 2
    refused(capsys, 2, "--force")
    assert (out / "added-meanwhile.txt").read_bytes() == b"the user's own" and (out / "ortlora.json").is_file()
    assert not list(tmp_path.glob(".built.*"))


# -- ortlora-train: a run directory holds only what its record proves ----------------------------------------
def train(artifacts: Path, out: Path, *flags: str) -> int:
    return train_cli.main(["--artifacts", str(artifacts), "--out", str(out), *FAST, *flags])


def hf_trainer_output(out: Path) -> None:
    """What transformers' Trainer leaves in its output_dir."""
    planted(out, "checkpoint-500/model.safetensors", b"weights")
    planted(out, "checkpoint-500/optimizer.pt", b"moments")
    planted(out, "checkpoint-500/trainer_state.json", json.dumps({"global_step": 500}).encode())
    planted(out, "config.json", b'{"model_type": "qwen2"}')


def test_a_hugging_face_trainer_directory_is_refused_without_advice_to_overwrite(tmp_path, capsys, artifacts):
    out = tmp_path / "hf"
    hf_trainer_output(out)
    before = snapshot(out)
    for flags in ([], ["--overwrite"]):
        assert train(artifacts, out, "--max-steps", "1", *flags) == 2
        assert "holds checkpoint-500 and config.json, which ortlora-train" in refused(capsys, 2, "--overwrite")
    assert snapshot(out) == before


def killed_before_first_checkpoint(artifacts: Path, out: Path, monkeypatch) -> None:
    """A first run that died before it saved anything: its record, config.json and log.jsonl are there."""
    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "train", lambda self: (_ for _ in ()).throw(RuntimeError("killed")))
        assert train(artifacts, out, "--max-steps", "2", "--report-to", "tensorboard") == 1
    assert (out / RUN_STATE).is_file() and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("plant", ["tensorboard/events.out.tfevents.mine", "checkpoint-3/adapter_model.safetensors",
                                   "config.json", "log.jsonl", "notes.txt", "summary.json"])
def test_a_run_killed_before_its_first_checkpoint_keeps_what_the_user_put_there(tmp_path, capsys, artifacts,
                                                                                 monkeypatch, plant):
    out = tmp_path / "run"
    killed_before_first_checkpoint(artifacts, out, monkeypatch)
    capsys.readouterr()
    planted(out, plant, b'{"kind": "the user\'s own"}\nnot a record\n')
    before = snapshot(out)
    for flags in ([], ["--overwrite"]):
        assert train(artifacts, out, "--max-steps", "1", *flags) == 2
        assert plant in refused(capsys, 2, "--overwrite")
    assert {k: v for k, v in snapshot(out).items() if k in before} == before


def test_a_run_killed_before_its_first_checkpoint_is_started_over(tmp_path, capsys, artifacts, monkeypatch):
    out = tmp_path / "run"
    killed_before_first_checkpoint(artifacts, out, monkeypatch)
    assert train(artifacts, out, "--max-steps", "2", "--report-to", "tensorboard") == 0  # all of it the run's own
    assert (out / "checkpoint-2").is_dir() and len(list((out / "tensorboard").iterdir())) == 1


def test_a_hand_written_run_record_proves_nothing(tmp_path, capsys, artifacts):
    out = tmp_path / "run"
    planted(out, RUN_STATE, json.dumps({"latest": None, "seq": 0, "files": {}}).encode())
    planted(out, "config.json")
    before = snapshot(out)
    for flags in ([], ["--overwrite"]):
        assert train(artifacts, out, "--max-steps", "1", *flags) == 2
        refused(capsys, 2, "--overwrite")
    assert snapshot(out) == before


@pytest.mark.parametrize("plant", ["checkpoint-1/notes.txt", "checkpoint-99/adapter_model.safetensors",
                                   "checkpoint-2/adapter_config.json", "tensorboard/mine.txt", "loss.png",
                                   ".ortlora-run.lock"])
def test_overwrite_and_resume_never_remove_a_file_of_the_users(tmp_path, capsys, artifacts, plant):
    out = tmp_path / "run"
    assert train(artifacts, out, "--max-steps", "2", "--save-every", "1", "--report-to", "tensorboard") == 0
    capsys.readouterr()
    planted(out, plant, b"the user's own, not a process id")
    before = snapshot(out)
    assert train(artifacts, out, "--max-steps", "2", "--overwrite") == 2
    refused(capsys, 2, "--overwrite")
    assert train_cli.main(["--resume", str(out), "--max-steps", "4", "--keep-last", "1", *FAST]) == 2
    refused(capsys, 2, "--overwrite")
    assert snapshot(out) == before
    (out / plant).unlink()
    assert train(artifacts, out, "--max-steps", "1", "--overwrite") == 0  # the run's own files alone: started over
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


def test_keep_last_leaves_a_checkpoint_holding_a_users_file(tmp_path, artifacts):
    out = tmp_path / "run"
    assert train(artifacts, out, "--max-steps", "2", "--save-every", "1") == 0
    user = planted(out / "checkpoint-1", "notes.txt")
    assert remove_checkpoint(out / "checkpoint-1") is False and user.is_file()
    user.unlink()
    assert remove_checkpoint(out / "checkpoint-1") is True and not (out / "checkpoint-1").exists()


def test_records_are_checked_not_trusted(tmp_path):
    """seal's record proves the files as written; a changed byte, a changed record, an extra file all fail it."""
    from ortlora.ownership import read_record, unproven

    d = tmp_path / "d"
    planted(d, "a.bin", b"12345")
    planted(d, "sub/b.bin", b"678")
    seal(d, "ortlora-export")
    assert unproven(d, "ortlora-export") == [] and unproven(d, "ortlora-build") == ["a.bin", FILES_RECORD, "sub"]
    record = json.loads((d / FILES_RECORD).read_text())
    assert read_record(d / FILES_RECORD) == record
    (d / FILES_RECORD).write_text(json.dumps({**record, "files": {**record["files"], "c": record["files"]["a.bin"]}}))
    assert read_record(d / FILES_RECORD) is None and unproven(d, "ortlora-export") == ["a.bin", FILES_RECORD, "sub"]
    (d / FILES_RECORD).write_text(json.dumps(signed(record)))
    planted(d, "a.bin", b"12346")  # same size, other content
    planted(d, "sub/c.bin")
    assert unproven(d, "ortlora-export") == ["a.bin", "sub/c.bin"]


# -- a run that finishes, finishes: a kill after its last checkpoint is completed by --resume, once ------------
def test_a_kill_just_after_the_final_checkpoint_is_finished_by_resume_exactly_once(tmp_path, capsys, artifacts,
                                                                                   monkeypatch):
    from ortlora.runtime import checkpoint as checkpoint_module

    out = tmp_path / "run"
    rename_in = checkpoint_module.replace_dir

    def killed_after_the_last(new, final, *args):  # the kill lands right after the rename, before the record
        rename_in(new, final, *args)
        if final.name == "checkpoint-4":
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "replace_dir", killed_after_the_last)
        assert train(artifacts, out, "--max-steps", "4", "--save-every", "1", "--keep-last", "1", "--plot") == 130
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not (out / "summary.json").exists()
    capsys.readouterr()

    resume = ["--resume", str(out), "--no-progress"]
    assert train_cli.main(resume) == 0
    assert "completed the end of the run" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["checkpoints"] == ["checkpoint-4"]
    assert summary["checkpoint"] == str(out / "checkpoint-4") and (out / "loss.png").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # --keep-last 1, done now
    finished = snapshot(out)
    assert train_cli.main(resume) == 0  # the end is done: it is not done again
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(out) == finished


def test_one_commands_output_is_not_anothers_to_replace(tmp_path, capsys, artifacts, trained_adapter):
    """A record names the command that wrote it: an export never replaces a build or a checkpoint, a build never an
    export, though all of them are ortlora's."""
    built, exported = tmp_path / "built", tmp_path / "exported"
    shutil.copytree(artifacts, built)
    assert export(artifacts, trained_adapter, exported) == 0
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(trained_adapter, checkpoint)
    for out in (built, checkpoint):
        before = snapshot(out)
        assert export(artifacts, trained_adapter, out, "--force") == 2
        assert "which ortlora-export did not write" in refused(capsys, 2, "--force")
        assert snapshot(out) == before
    for out in (exported, checkpoint):
        before = snapshot(out)
        assert build(out, "--force") == 2
        assert "which ortlora-build did not write" in refused(capsys, 2, "--force")
        assert snapshot(out) == before


def test_a_refused_starting_adapter_writes_nothing(tmp_path, capsys, artifacts, trained_adapter):
    """The weights a run starts from (--init-adapter, or the checkpoint --resume continues) are checked before
    the run directory is made or changed: a refusal leaves no record, log or lock behind, and a run's log as it was."""
    import numpy as np
    from safetensors.numpy import save_file

    other = tmp_path / "other"
    shutil.copytree(trained_adapter, other)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((3, 3), np.float32)},
              str(other / "adapter_model.safetensors"))
    out = tmp_path / "run"
    assert train(artifacts, out, "--max-steps", "1", "--init-adapter", str(other)) == 2
    assert "does not match the artifacts" in capsys.readouterr().err and not out.exists()

    run = tmp_path / "resumed"
    assert train(artifacts, run, "--max-steps", "2", "--save-every", "1") == 0
    shutil.copy(other / "adapter_model.safetensors", run / "checkpoint-1" / "adapter_model.safetensors")
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run / "checkpoint-1"), "--out", str(tmp_path / "new"), *FAST,
                           "--max-steps", "3"]) == 2
    assert "does not match the artifacts" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_file_replaced_while_the_run_goes_on_is_not_overwritten(tmp_path, capsys, artifacts, monkeypatch):
    out = tmp_path / "run"
    finish = train_cli.finish

    def user_writes_then_finish(run_dir, c, summary):  # the user's summary.json lands before the run's end
        planted(run_dir, "summary.json", b"the user's own notes")
        finish(run_dir, c, summary)

    monkeypatch.setattr(train_cli, "finish", user_writes_then_finish)
    assert train(artifacts, out, "--max-steps", "1") == 2
    assert "summary.json is not the one ortlora-train wrote" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == b"the user's own notes"


@pytest.mark.parametrize("name", ["log.jsonl", "config.json"])
def test_a_kill_while_a_run_file_is_replaced_leaves_it_the_runs_own(tmp_path, capsys, artifacts, monkeypatch, name):
    """The record lists a file's old and new content while it is replaced: killed just after the rename (here, the
    resume cutting the log back to its checkpoint, or writing its config), the directory is still all the run's."""
    from ortlora.runtime import run_dir as run_dir_module

    out = tmp_path / "run"
    assert train(artifacts, out, "--max-steps", "4", "--save-every", "2", "--log-every", "1") == 0
    write = run_dir_module.write_atomic

    def killed_after(path, data):
        write(path, data)
        if path.name == name:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(run_dir_module, "write_atomic", killed_after)
        assert train_cli.main(["--resume", str(out / "checkpoint-2"), "--out", str(out), *FAST, "--max-steps", "4"]) == 130
    assert run_dir_module.unproven_in_run(out) == []
    capsys.readouterr()
    assert train_cli.main(["--resume", str(out / "checkpoint-2"), "--out", str(out), *FAST, "--max-steps", "4"]) == 0
