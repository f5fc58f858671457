"""The Python API (ortlora/api.py, issue 27 item 4): build, train, export and generate as keyword calls that run the
commands' own code, a Run whose fields are the run's real files, the commands' one-line errors as OrtloraError, and
the examples of docs/api.md and of the module's docstring executed as written."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ortlora
from ortlora import api
from ortlora.build import cli as build_cli
from ortlora.runtime import cli as train_cli
from tests.cli_helpers import one_line

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "api.md"
QUIET = {"progress": False, "plot": False}


def refused(call) -> str:
    """The message of the OrtloraError ``call`` raises, checked to be one line."""
    with pytest.raises(ortlora.OrtloraError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message == " ".join(message.split())
    return message


def test_build_train_export_generate_through_the_api(tiny_model, tmp_path):
    artifacts = ortlora.build(model=tiny_model, out=tmp_path / "artifacts", rank=4, targets=["q_proj", "v_proj"])
    assert artifacts == tmp_path / "artifacts" and (artifacts / "ortlora.json").is_file()
    assert json.loads((artifacts / "ortlora.json").read_text())["lora"]["rank"] == 4

    run = ortlora.train(artifacts=artifacts, out=str(tmp_path / "run"), max_steps=4, save_every=2, eval_every=2,
                        batch_size=4, **QUIET)
    assert isinstance(run, ortlora.Run)
    assert run.out == tmp_path / "run" and run.artifacts == artifacts
    assert run.checkpoints == [tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"]
    assert all((c / "adapter_model.safetensors").is_file() for c in run.checkpoints)
    assert run.adapter == run.checkpoints[-1]
    assert run.best in run.checkpoints and run.best.name == f"checkpoint-{run.summary['best_step']}"
    assert run.summary == json.loads((run.out / "summary.json").read_text())
    assert run.summary["steps"] == 4
    with pytest.raises(AttributeError):
        run.out = tmp_path  # frozen

    out = ortlora.export(artifacts=artifacts, adapter=run.out, to="peft", out=tmp_path / "peft")
    assert out == tmp_path / "peft" and (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").read_bytes() == (run.adapter / "adapter_model.safetensors").read_bytes()

    generator = ortlora.Generator(artifacts, adapter=run.adapter)
    result = generator.generate(generator.prompt("Hello"), ortlora.Sampling(max_new_tokens=4))
    assert 1 <= len(result.tokens) <= 4


def test_no_evaluation_means_no_best_checkpoint(artifacts, tmp_path):
    run = ortlora.train(artifacts=artifacts, data=str(ROOT / "ortlora/data/text_train.jsonl"), out=tmp_path / "run",
                        max_steps=2, **QUIET)
    assert run.best is None and run.checkpoints == [run.adapter] == [tmp_path / "run" / "checkpoint-2"]


def test_keywords_are_the_options_and_a_mistake_is_one_line_naming_them(artifacts, tmp_path):
    message = refused(lambda: ortlora.train(max_step=3))
    assert message.startswith("ortlora.train() got unknown keyword max_step; it takes ")
    assert "max_steps" in message and "artifacts" in message and "debug" not in message and "help" not in message
    assert "ortlora.build() got unknown keywords colour, rnak; it takes " in refused(lambda: ortlora.build(rnak=3, colour=1))
    assert "ortlora.export() got unknown keyword" in refused(lambda: ortlora.export(to_="peft"))
    assert refused(lambda: ortlora.train(str(artifacts))).startswith("ortlora.train() takes keyword arguments only")
    assert refused(lambda: ortlora.build("x")).startswith("ortlora.build() takes keyword arguments only")
    assert refused(lambda: ortlora.train(max_steps=2.5)) == "ortlora.train(): --max-steps: invalid int value: '2.5'"
    assert refused(lambda: ortlora.train(plot="no")) == "ortlora.train(): plot must be True or False, got 'no'"
    assert "--to" in refused(lambda: ortlora.export(artifacts=artifacts, adapter=tmp_path))
    assert "invalid choice" in refused(lambda: ortlora.export(artifacts=artifacts, adapter=tmp_path, to="pdf",
                                                              out=tmp_path / "x"))
    assert "not allowed with argument" in refused(lambda: ortlora.build(model="m", tiny=True))


def test_the_api_and_the_command_say_the_same(artifacts, tmp_path, capsys):
    """The command is the function behind a parser: the same check, the same words."""
    argv = ["--artifacts", str(artifacts), "--out", str(tmp_path / "run"), "--lr", "1", "--min-lr", "2"]
    from_cli = one_line(capsys, train_cli.main(argv)).strip()
    assert from_cli == "error: " + refused(lambda: ortlora.train(artifacts=artifacts, out=tmp_path / "run", lr=1.0,
                                                                  min_lr=2.0))
    from_cli = one_line(capsys, build_cli.main(["--tiny", "--out", str(tmp_path / "a"), "--rank", "0"])).strip()
    assert from_cli == "error: " + refused(lambda: ortlora.build(tiny=True, out=tmp_path / "a", rank=0))
    assert not (tmp_path / "run").exists() and not (tmp_path / "a").exists()
    missing = tmp_path / "missing"
    assert refused(lambda: ortlora.train(artifacts=missing)).startswith(f"{missing} is not an ortlora artifact directory")
    assert refused(lambda: ortlora.export(artifacts=artifacts, adapter=missing, to="peft",
                                          out=tmp_path / "e")) == f"{missing} does not exist"


def test_build_without_the_build_extra_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # as in a runtime-only install: importing it fails
    message = refused(lambda: ortlora.build(tiny=True, out=tmp_path / "a"))
    assert message.endswith("torch is not installed: pip install 'ortlora[build]'")
    assert not (tmp_path / "a").exists()


def test_a_full_disk_is_the_commands_one_line(artifacts, tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train_cli, "write_owned", full)
    message = refused(lambda: ortlora.train(artifacts=artifacts, out=tmp_path / "run", max_steps=1, **QUIET))
    assert message.startswith("no space left on the device")


def test_import_ortlora_is_cheap_and_the_api_is_what_it_exports():
    code = ("import sys, ortlora; heavy = [m for m in ('numpy', 'onnxruntime', 'torch', 'ortlora.api', "
            "'ortlora.runtime') if m in sys.modules]; print(heavy)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip() == "[]"
    assert set(ortlora.__all__) <= set(dir(ortlora))
    assert ortlora.train is api.train and ortlora.export is api.export and ortlora.Run is api.Run
    assert callable(ortlora.build) and inspect.ismodule(ortlora.build)  # the build side's package, called: api.build
    importlib.import_module("ortlora.build.builder")  # importing a module of the package keeps it callable
    assert callable(ortlora.build) and ortlora.build.builder.build is not None


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


def docstring_example(module) -> str:
    """The indented example at the top of a module's docstring (up to its first blank line)."""
    lines = inspect.getdoc(module).split("\n\n")[1]
    return textwrap.dedent(lines)


def test_the_documented_examples_run(tmp_path, monkeypatch, capsys):
    """The example in ortlora/api.py's docstring and every ``python`` block of docs/api.md, each as a script of its
    own in an empty directory (ORTLORA_CACHE there too, for the one-command example)."""
    monkeypatch.setenv("ORTLORA_CACHE", str(tmp_path / "cache"))
    blocks = python_blocks(DOCS.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    for name, code in [("ortlora/api.py", docstring_example(api))] + [(f"docs/api.md block {i + 1}", block)
                                                                      for i, block in enumerate(blocks)]:
        where = tmp_path / re.sub(r"\W+", "-", name)
        where.mkdir()
        monkeypatch.chdir(where)
        exec(compile(code, name, "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert "ortlora.train() got unknown keyword max_step; it takes " in out
    assert "no/such/dir is not an ortlora artifact directory" in out
