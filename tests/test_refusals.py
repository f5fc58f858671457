"""Settings that would be ignored are refused, and absurd values are refused before any heavy work: each ends in
one ``error:`` line (exit 2) that names the option, its value and what to pass instead (issue 25, section 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ortlora.errors import OrtloraError
from ortlora.runtime import cli as train_cli
from ortlora.runtime import config as cfg

FAST = ["--no-progress", "--no-plot", "--batch-size", "4"]
CPUS = os.cpu_count() or 1


def one_line(capsys, code: int) -> str:
    """The single stderr line of a command refused with exit code 2."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "unexpected" not in err, err
    return err


def train(*argv: str) -> int:
    return train_cli.main([*FAST, *argv])


# -- ortlora-train: settings that would be ignored -------------------------------------------------------

def test_resume_in_a_toml_file_resumes_as_the_option_does(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "2") == 0
    config = tmp_path / "conf" / "resume.toml"
    config.parent.mkdir()
    config.write_text('resume = "../run"\nmax_steps = 3\n')  # relative to the file, as every path in it
    capsys.readouterr()
    assert train("--config", str(config)) == 0
    out = capsys.readouterr().out
    assert "resumed from " in out and "checkpoint-2 at step 2" in out
    assert (run / "checkpoint-3").is_dir()
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["position"]["step"] == 3


@pytest.mark.parametrize("extra, says", [
    (["--max-steps", "1", "--resume", "RUN", "--init-adapter", "RUN/checkpoint-1"],
     "--init-adapter RUN/checkpoint-1 would be ignored: pass one of them"),
    (["--resume", "RUN", "--overwrite", "--max-steps", "2"], "--overwrite would start RUN over, and --resume RUN"),
    (["--epochs", "2", "--max-steps", "3"], "--epochs and --max-steps both set the length of the run"),
    (["--max-steps", "1", "--min-lr", "1e-5", "--schedule", "constant"], "--schedule constant never decays"),
    (["--max-steps", "1", "--eval-split", "0.1", "--eval-data", "DATA"], "--eval-split 0.1 holds out training data"),
    (["--max-steps", "1", "--data", "DATA", "--eval-every", "1"], "--eval-every 1 needs evaluation data"),
    (["--max-steps", "1", "--data", "DATA", "--eval-batches", "2"], "--eval-batches 2 needs evaluation data"),
    (["--max-steps", "1", "--allow-fallback"], "--allow-fallback lets the CPU provider take over from another --ep"),
    (["--max-steps", "1", "--allow-fallback", "--ep", "cuda"], "uses ORT's training API, which has no fallback"),
])
def test_train_settings_that_would_be_ignored_are_refused(artifacts, tmp_path, capsys, extra, says):
    run = tmp_path / "run"
    assert train("--artifacts", str(artifacts), "--out", str(run), "--max-steps", "1") == 0
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a b c"}\n' * 4)
    extra = [a.replace("RUN", str(run)).replace("DATA", str(data)) for a in extra]
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    err = one_line(capsys, train("--artifacts", str(artifacts), *extra))
    assert says.replace("RUN", str(run)) in err
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_toml_file_that_sets_a_setting_twice_or_both_lengths_is_refused(artifacts, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("epochs = 2\nmax_steps = 3\n")
    assert f"{config}: epochs and max_steps both set" in one_line(capsys, train("--config", str(config)))
    config.write_text("max-steps = 2\nmax_steps = 3\n")
    assert "'max-steps' and 'max_steps' are the same setting" in one_line(capsys, train("--config", str(config)))


def test_epochs_on_the_command_line_win_over_max_steps_in_the_file(artifacts, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'artifacts = "{artifacts}"\nmax_steps = 100\n')
    args = train_cli.parse_args(["--config", str(config), "--epochs", "2"])
    c, _ = train_cli.resolve_config(args)
    assert (c.epochs, c.max_steps) == (2, None)


# -- ortlora-train: absurd numbers, paths that cannot be looked up -------------------------------------------

@pytest.mark.parametrize("option, value, says", [
    ("--threads", str(10**9), f"--threads 1000000000 is more than 4 threads for each of this machine's {CPUS} CPUs"),
    ("--seed", "-1", "--seed must be from 0 to 4294967295, got -1"),
    ("--seed", str(2**64), f"--seed must be from 0 to 4294967295, got {2**64}"),
    ("--grad-accum", "1000000", "--grad-accum must be from 1 to 1024"),
    ("--workers", "1000", f"--workers 1000 needs 1000 CPUs (one per worker), and this machine has {CPUS}"),
])
def test_absurd_train_numbers_are_refused_before_any_work(artifacts, tmp_path, capsys, option, value, says):
    err = one_line(capsys, train("--artifacts", str(artifacts), "--out", str(tmp_path / "run"), option, value))
    assert says in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option", ["--data", "--eval-data", "--init-adapter", "--resume", "--artifacts", "--config"])
def test_a_symbolic_link_to_itself_is_one_line(artifacts, tmp_path, capsys, option):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    argv = {"--artifacts": [option, str(loop)]}.get(option, ["--artifacts", str(artifacts), option, str(loop)])
    err = one_line(capsys, train("--out", str(tmp_path / "run"), "--max-steps", "1", *argv))
    assert f"{option} {loop}: Too many levels of symbolic links (a symbolic link that leads back to itself)" in err


def test_the_cluster_check_counts_cpus():
    cfg.check_workers(4, 4.0, "the Ray cluster")
    with pytest.raises(OrtloraError, match=r"--workers 5 needs 5 CPUs \(one per worker\), and the Ray cluster at "
                                           r"auto has 4; pass --workers 4 or fewer"):
        cfg.check_workers(5, 4.0, "the Ray cluster at auto")
