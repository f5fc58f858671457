"""--force / --overwrite replace only what ortlora wrote, never a directory it reads or stands in;
leftovers of killed processes are removed at the next start, and only theirs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ortlora.build import cli as build_cli
from ortlora.handoff import cli as export_cli
from ortlora.output_dirs import replace_dir, staging_dir
from ortlora.ownership import FILES_RECORD, seal
from ortlora.runtime import cli as train_cli


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A working directory holding a file of the user's, inside a home directory of its own."""
    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    (work / "precious.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    return home


@pytest.mark.parametrize("out", [".", "..", "/", "~", "sub/.."])
def test_no_command_replaces_cwd_its_parents_root_or_home(home, capsys, artifacts, trained_adapter, out):
    out = str(Path(out).expanduser())
    commands = {
        "build": lambda: build_cli.main(["--tiny", "--out", out, "--force"]),
        "export": lambda: export_cli.main(["--artifacts", str(artifacts), "--adapter", str(trained_adapter),
                                           "--to", "peft", "--out", out, "--force"]),
        "train": lambda: train_cli.main(["--artifacts", str(artifacts), "--out", out, "--overwrite",
                                         "--max-steps", "1", "--no-progress", "--no-plot"]),
    }
    for name, command in commands.items():
        assert command() == 2, name
        err = one_line_error(capsys)
        assert any(s in err for s in ("current directory", "filesystem root", "home directory")), err
    assert (home / "work" / "precious.txt").read_text() == "mine"


def test_build_never_replaces_the_model_it_reads(tmp_path, capsys, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for out in (model, tmp_path):
        assert build_cli.main(["--model", str(model), "--out", str(out), "--force"]) == 2
        assert "which this command reads" in one_line_error(capsys)
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny_model.iterdir())


def test_export_never_replaces_what_it_reads(tmp_path, capsys, artifacts, trained_adapter):
    for out in (artifacts, trained_adapter, trained_adapter.parent):
        assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(trained_adapter), "--to", "peft",
                                "--out", str(out), "--force"]) == 2
        assert "which this command reads" in one_line_error(capsys)
    assert (trained_adapter / "adapter_model.safetensors").is_file()


def test_force_replaces_only_ortloras_own_output(tmp_path, capsys, monkeypatch, artifacts, trained_adapter):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    (foreign / "config.json").write_text("{}")  # as in a model directory
    export = ["--artifacts", str(artifacts), "--adapter", str(trained_adapter), "--to", "peft"]
    assert build_cli.main(["--tiny", "--out", str(foreign), "--force"]) == 2
    assert "config.json and notes.txt, which ortlora-build did not write" in one_line_error(capsys)
    assert export_cli.main([*export, "--out", str(foreign), "--force"]) == 2
    assert "which ortlora-export did not write" in one_line_error(capsys)
    for flags in ([], ["--overwrite"]):  # without --overwrite too: training would overwrite config.json
        assert train_cli.main(["--artifacts", str(artifacts), "--out", str(foreign), "--max-steps", "1", *flags]) == 2
        assert "did not write" in one_line_error(capsys)
    assert sorted(p.name for p in foreign.iterdir()) == ["config.json", "notes.txt"]
    assert (foreign / "config.json").read_text() == "{}"

    exported = tmp_path / "exported"
    assert export_cli.main([*export, "--out", str(exported)]) == 0
    assert (exported / "ortlora-export.json").is_file()
    assert export_cli.main([*export, "--out", str(exported)]) == 2
    assert "pass --force" in one_line_error(capsys)
    assert export_cli.main([*export, "--out", str(exported), "--force"]) == 0

    built = tmp_path / "built"
    shutil.copytree(artifacts, built)
    assert build_cli.main(["--tiny", "--out", str(built)]) == 2
    assert "pass --force" in one_line_error(capsys)
    temp = tmp_path / "temp"  # the system's temporary directory, where a killed --tiny build left its model
    (temp / f"ortlora-tiny-{dead_pid()}-abc" / "tiny-qwen2").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    assert build_cli.main(["--tiny", "--out", str(built), "--force"]) == 0
    assert not list(tmp_path.glob(".built.*")) and not list(tmp_path.glob(".exported.*")) and not list(temp.iterdir())
    umask = os.umask(0)
    os.umask(umask)
    for made in (built, exported):  # made with the user's permissions, not a temporary directory's 0700
        assert made.stat().st_mode & 0o777 == 0o777 & ~umask


def test_stale_staging_of_dead_processes_is_removed_and_live_ones_kept(tmp_path, artifacts, trained_adapter, capsys):
    out = tmp_path / "out"
    stale = tmp_path / f".out.partial-{dead_pid()}-abc"
    live = tmp_path / f".out.partial-{os.getppid()}-abc"  # the process that runs the tests lives
    other = tmp_path / f".other.partial-{dead_pid()}-abc"  # another target's: not this command's business
    for d in (stale, live, other):
        d.mkdir()
        (d / "frozen_weights.bin").write_bytes(b"x" * 10)
    assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(trained_adapter), "--to", "peft",
                            "--out", str(out)]) == 0
    assert not stale.exists() and live.exists() and other.exists()


def test_a_kill_between_the_renames_of_a_replacement_loses_nothing(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    seal(final, "ortlora-export")  # the command's own output: replace_dir replaces nothing else
    new = tmp_path / "new"
    new.mkdir()
    (new / "new.txt").write_text("new")
    replace_dir(new, final, "ortlora-export")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt", FILES_RECORD] and not list(tmp_path.glob(".out.old-*"))
    # Killed after moving the old output aside, before moving the new one in: the next start puts it back.
    aside = tmp_path / f".out.old-{dead_pid()}-xyz"
    aside.mkdir()
    final.rename(aside / "out")
    with staging_dir(final) as staging:
        assert staging.name.startswith(f".out.partial-{os.getpid()}-")
        assert (final / "new.txt").read_text() == "new" and not aside.exists()
    assert not staging.exists()


def test_run_dir_leftovers_are_removed_at_the_next_start(tmp_path, artifacts, capsys):
    run = tmp_path / "run"
    assert train_cli.main(["--artifacts", str(artifacts), "--out", str(run), "--max-steps", "2", "--no-progress",
                           "--no-plot"]) == 0
    (run / ".checkpoint-7.tmp-abc").mkdir()
    (run / ".checkpoint-7.tmp-abc" / "adapter_model.safetensors").write_bytes(b"half")
    (run / ".summary.json.tmp-abc").write_text("{")
    capsys.readouterr()
    assert train_cli.main(["--resume", str(run), "--max-steps", "3", "--no-progress", "--no-plot"]) == 0
    assert "removed 2 half-written entries" in capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [".ortlora-run.lock"]
