"""One command (issue 27, item 2): ortlora-train --model builds the artifacts on first use into the cache
($ORTLORA_CACHE here), reuses a complete entry from then on, keys entries by the model and the build options, and
refuses in one line what it cannot do (build options with --artifacts, a build without torch)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import ortlora
from ortlora.build import cli as build_cli
from ortlora.manifest import MANIFEST_NAME
from ortlora.runtime import cli as train_cli
from tests.cli_helpers import one_line

FAST = ["--max-steps", "2", "--batch-size", "4", "--no-progress", "--no-plot"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ORTLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "artifacts"


@pytest.fixture
def builds(monkeypatch) -> list:
    """The builds made (build/cli.run's calls, each its --out)."""
    made, run = [], build_cli.run

    def counted(args):
        made.append(Path(args.out))
        return run(args)

    monkeypatch.setattr(build_cli, "run", counted)
    return made


def train(capsys, *argv: str) -> tuple[str, Path]:
    """Run ortlora-train; its output and the artifacts it says it used."""
    assert train_cli.main([*FAST, *argv]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if line.startswith("artifacts: ")]
    assert len(said) == 1, out
    return said[0], Path(said[0].removeprefix("artifacts: ").rsplit(" (", 1)[0])


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def test_the_first_run_builds_into_the_cache_and_the_next_reuses_it(tiny_model, cache, builds, tmp_path, capsys):
    line, entry = train(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "run1"))
    assert line == f"artifacts: {entry} (built)" and entry.parent == cache and builds == [entry]
    assert entry.name.startswith("tiny-qwen2-") and entries(cache) == [entry.name]
    manifest = entry / MANIFEST_NAME
    written = manifest.stat().st_mtime_ns
    assert json.loads((tmp_path / "run1" / "config.json").read_text())["artifacts"] == str(entry)

    line, again = train(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "run2"), "--rank", "8")
    assert line == f"artifacts: {entry} (cached)" and again == entry  # --rank 8 is the build's default
    assert builds == [entry] and manifest.stat().st_mtime_ns == written  # not built again
    # The same adapter from the same artifacts, data and seed.
    first, second = (load_file(tmp_path / r / "checkpoint-2" / "adapter_model.safetensors") for r in ("run1", "run2"))
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


def test_other_build_options_are_another_entry(tiny_model, cache, builds, tmp_path, capsys):
    _, default = train(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "run1"))
    _, rank4 = train(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "run2"), "--rank", "4",
                     "--targets", "v_proj,q_proj")
    assert rank4 != default and builds == [default, rank4] and entries(cache) == sorted([default.name, rank4.name])
    lora = json.loads((rank4 / MANIFEST_NAME).read_text())["lora"]
    assert lora["rank"] == 4 and lora["targets"] == ["q_proj", "v_proj"]
    run = ortlora.train(model=tiny_model, rank=4, targets=["v_proj", "q_proj"], out=tmp_path / "run3", max_steps=1,
                        progress=False, plot=False)  # the API's model=: the same entry
    assert run.artifacts == rank4 and len(builds) == 2


def test_build_options_in_a_toml_file_and_the_command_line_over_it(tiny_model, cache, builds, tmp_path, capsys):
    config = tmp_path / "conf" / "one.toml"
    config.parent.mkdir()
    config.write_text(f'model = "{tiny_model}"\nrank = 4\nalpha = 4.0\n')
    _, entry = train(capsys, "--config", str(config), "--out", str(tmp_path / "run1"), "--alpha", "8")
    lora = json.loads((entry / MANIFEST_NAME).read_text())["lora"]
    assert (lora["rank"], lora["alpha"]) == (4, 8.0)  # the file's rank, the command line's alpha
    # --artifacts on the command line replaces the file's model with its build options: nothing is refused.
    assert train_cli.main([*FAST, "--config", str(config), "--artifacts", str(entry), "--out", str(tmp_path / "run2")]) == 0
    assert builds == [entry]


def test_refusals_are_one_line(tiny_model, artifacts, cache, tmp_path, capsys):
    run = str(tmp_path / "run")
    err = one_line(capsys, train_cli.main(["--artifacts", str(artifacts), "--out", run, "--rank", "4"]))
    assert err == (f"error: --rank 4 is a build option, and --artifacts {artifacts} is built already: pass --model "
                   "ID_OR_DIR instead (its artifacts are built with --rank and cached), or leave --rank out\n")
    assert "--dora is a build option" in one_line(capsys, train_cli.main(["--artifacts", str(artifacts), "--dora"]))
    err = one_line(capsys, train_cli.main(["--artifacts", str(artifacts), "--model", str(tiny_model)]))
    assert "--artifacts and --model both name the artifacts" in err
    config = tmp_path / "both.toml"
    config.write_text(f'artifacts = "{artifacts}"\nmodel = "{tiny_model}"\n')
    assert f"{config}: artifacts and model both name" in one_line(capsys, train_cli.main(["--config", str(config)]))
    err = one_line(capsys, train_cli.main(["--model", str(tmp_path / "nothing"), "--out", run]))
    assert err == f"error: model directory {tmp_path / 'nothing'} does not exist\n"
    err = one_line(capsys, train_cli.main(["--model", str(tiny_model), "--revision", "main", "--out", run]))
    assert "--revision main goes with a Hugging Face Hub id" in err
    err = one_line(capsys, train_cli.main(["--model", str(tiny_model), "--rank", "0", "--out", run]))
    assert err == "error: --rank must be a positive integer, got 0\n"
    assert not Path(run).exists() and (not cache.exists() or entries(cache) == [])


def test_without_the_build_extra_it_says_what_to_install(tiny_model, cache, builds, tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", None)  # a runtime-only install: importing torch fails
        err = one_line(capsys, train_cli.main([*FAST, "--model", str(tiny_model), "--out", str(tmp_path / "run1")]))
        assert "its artifacts are not in the cache yet, and building them needs torch, transformers and onnx (torch " \
               "missing): pip install 'ortlora[build]'" in err
        assert builds == [] and entries(cache) == [] and not (tmp_path / "run1").exists()
    _, entry = train(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "run1"))
    monkeypatch.setitem(sys.modules, "torch", None)
    line, again = train(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "run2"))  # cached: no torch needed
    assert line.endswith("(cached)") and again == entry and builds == [entry]


def test_an_entry_that_does_not_match_is_refused_and_never_replaced(tiny_model, cache, builds, tmp_path, capsys):
    _, entry = train(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "run1"))
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    manifest["lora"]["rank"], manifest["lora"]["scaling"] = 16, 1.0  # as if another build had landed under this key
    (entry / MANIFEST_NAME).write_text(json.dumps(manifest))
    err = one_line(capsys, train_cli.main([*FAST, "--model", str(tiny_model), "--out", str(tmp_path / "run2")]))
    assert err.startswith(f"error: the cached artifacts {entry} are not the build they are kept for (")
    assert err.endswith("; remove that directory and run again\n") and builds == [entry]
    assert json.loads((entry / MANIFEST_NAME).read_text()) == manifest  # left as it is
    shutil.rmtree(entry)
    line, again = train(capsys, "--model", str(tiny_model), "--out", str(tmp_path / "run2"))
    assert line.endswith("(built)") and again == entry and builds == [entry, entry]


def test_the_builtin_tiny_model_in_one_command(cache, builds, tmp_path, capsys):
    line, entry = train(capsys, "--model", "builtin:tiny", "--out", str(tmp_path / "run"))
    assert line.endswith("(built)") and entry.name.startswith("tiny-")
    assert (entry / "base_model" / "config.json").is_file()  # bundled, as ortlora-build --tiny does
