"""The docs run (issue 27, item 5): every shell and Python block of README.md and docs/*.md is executed, so a
command or an option the docs show cannot drift from what the tools take.

What is extracted: each block fenced as ```bash, ```sh, ```shell, ```console (its `$ ` lines) or ```python; each is
one test case, named PAGE:LINE (the line of its opening fence). Blocks fenced otherwise (```json, ```toml, ```text,
plain ```) are data or output and are not run. docs/api.md is left to its owner, tests/test_api.py.

How a page runs: its blocks run in order in one working directory of its own, so what an earlier block makes
(artifacts, runs, exports) the later ones use, as a reader's shell would. Shell blocks run with `bash -e -o pipefail`,
Python blocks with this interpreter, both with this interpreter's bin directory (.venv/bin) first on PATH. Running one
case alone first runs the page's earlier blocks. Every docs/ page's directory starts where a reader of the README
stands: the README's main job already run there once per session (artifacts/tiny and runs/tiny, copied), with
configs/ copied and scripts/ and clients/ linked. The README's own directory starts with configs/ only, so its main
job runs as written from nothing.

Substitution, the one change made to a block: the machines that run the tests cannot reach the Hugging Face Hub, so
each model id of HUB_MODELS in a block (the README's walkthrough builds Qwen/Qwen2.5-0.5B-Instruct) is replaced by the
path of a local tiny Qwen2 model directory (ortlora.build.tiny: config.json, model.safetensors, tokenizer.json and a
chat template, as a Hub snapshot holds them) before it runs. HF_HUB_OFFLINE and HF_DATASETS_OFFLINE are set, so a
block that would reach the Hub fails instead of waiting on the network.

Markers, an HTML comment on the line just before a fence (any other comment there is an error):
- `<!-- not run: REASON -->`: the block must not run here (it installs from a package index, needs a cluster or
  other hardware, or takes hours); the case is skipped with REASON, which must be given.
- `<!-- run with: ENV -->`: a Python block for another environment of tests/environments.py (genai, llama, mlx, ...),
  run with its interpreter; skipped where that environment is absent, except in CI, which creates them all.

Also checked: the README is at most 200 lines, its test command is the one .ci/run runs, and every relative link of
README.md and docs/*.md (but docs/api.md) names a file that exists, and a heading there where it has an #anchor.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.environments import ENVIRONMENTS, python_of

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "api.md")
SHELL = {"bash", "sh", "shell", "console"}
HUB_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B")  # longest first: one may prefix another
README_MAIN_JOB = "ortlora-build --tiny --out artifacts/tiny --force && ortlora-train --config configs/tiny.toml"
MARKER = re.compile(r"<!--\s*(not run|run with):\s*(.*?)\s*-->")
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)")
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    page: str       # path relative to the repository, e.g. docs/data.md
    line: int       # the line of the opening fence, from 1
    lang: str
    code: str
    not_run: str | None = None      # the reason, where marked not run
    run_with: str | None = None     # an environment of tests/environments.py

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The runnable blocks of ``page`` in order, with their markers; a malformed marker or an unclosed fence is an
    AssertionError naming the line."""
    rel = page.relative_to(ROOT).as_posix()
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        ticks, lang, start = fence.group(1), fence.group(2).lower(), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == ticks), None)
        assert end is not None, f"{rel}:{start + 1}: unclosed code fence"
        previous = lines[start - 1].strip() if start else ""
        marker = MARKER.fullmatch(previous)
        if previous.startswith("<!--"):
            assert marker and marker.group(2), (
                f"{rel}:{start}: a comment before a fence must be <!-- not run: REASON --> or <!-- run with: ENV -->")
        if lang in SHELL or lang == "python":
            code = "\n".join(lines[start + 1:end])
            if lang == "console":
                code = "\n".join(line[2:] for line in lines[start + 1:end] if line.startswith("$ "))
            not_run = run_with = None
            if marker and marker.group(1) == "not run":
                not_run = marker.group(2)
            elif marker:
                run_with = marker.group(2)
                assert run_with in ENVIRONMENTS, f"{rel}:{start}: unknown environment {run_with!r}"
                assert lang == "python", f"{rel}:{start}: run with: applies to Python blocks"
            blocks.append(Block(rel, start + 1, lang, code, not_run, run_with))
        else:
            assert not marker, f"{rel}:{start}: a marker before a ```{lang} block, which is never run"
        i = end + 1
    return blocks


BLOCKS = {page.relative_to(ROOT).as_posix(): blocks_of(page) for page in PAGES}
ALL = [block for blocks in BLOCKS.values() for block in blocks]


def substitute(code: str, model_dir: Path) -> str:
    """``code`` with every Hub model id of HUB_MODELS replaced by ``model_dir`` (the machines here have no Hub)."""
    for model in HUB_MODELS:
        code = re.sub(re.escape(model) + r"(?![\w.-])", str(model_dir), code)
    return code


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("ORTLORA_DEBUG", None)
    return env


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


@pytest.fixture(scope="session")
def hub_model(tmp_path_factory) -> Path:
    """The directory that stands in for the Hub's models: the tiny Qwen2 model, laid out as a snapshot is."""
    from ortlora.build.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("hub") / "Qwen2.5-0.5B-Instruct", seed=0)


@pytest.fixture(scope="session")
def readers_start(tmp_path_factory) -> Path:
    """A directory where the README's main job has run: artifacts/tiny and runs/tiny."""
    start = tmp_path_factory.mktemp("readme-main-job")
    shutil.copytree(ROOT / "configs", start / "configs")
    done = run(["bash", "-e", "-c", README_MAIN_JOB], start)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return start


class Page:
    """One page's working directory and the results of its blocks run so far."""

    def __init__(self, page: str, cwd: Path, hub_model: Path):
        self.blocks, self.cwd, self.hub_model = BLOCKS[page], cwd, hub_model
        self.results: dict[int, tuple[str, str]] = {}   # index -> ("passed" | "failed" | "skipped", what to say)

    def result(self, index: int) -> tuple[str, str]:
        for i in range(index + 1):
            if i not in self.results:
                self.results[i] = self._run(self.blocks[i])
        return self.results[index]

    def _run(self, block: Block) -> tuple[str, str]:
        if block.not_run:
            return "skipped", f"not run: {block.not_run}"
        code = substitute(block.code, self.hub_model)
        script = self.cwd / f".block-{block.line}.{'py' if block.lang == 'python' else 'sh'}"
        script.write_text(code + "\n", encoding="utf-8")
        if block.lang == "python":
            python = python_of(block.run_with) if block.run_with else Path(sys.executable)
            if python is None:
                if os.environ.get("CI"):
                    return "failed", f"CI must create {ENVIRONMENTS[block.run_with][0]} (see .ci/run)"
                return "skipped", f"no {ENVIRONMENTS[block.run_with][0]}: create it as .ci/run does"
            argv = [str(python), script.name]
        else:
            argv = ["bash", "-e", "-o", "pipefail", script.name]
        try:
            done = run(argv, self.cwd)
        except subprocess.TimeoutExpired:
            return "failed", f"{block.name} ran past {BLOCK_TIMEOUT_S} s"
        if done.returncode != 0:
            return "failed", (f"{block.name} exited {done.returncode}\n--- block, as run ---\n{code}\n"
                              f"--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-4000:]}")
        return "passed", ""


@pytest.fixture(scope="session")
def pages(request, tmp_path_factory, hub_model):
    """Each page's Page, made on first use; docs/ pages start from a copy of ``readers_start``."""
    made: dict[str, Page] = {}

    def page(name: str) -> Page:
        if name not in made:
            cwd = tmp_path_factory.mktemp(re.sub(r"\W", "-", name))
            shutil.copytree(ROOT / "configs", cwd / "configs")
            if name != "README.md":
                start = request.getfixturevalue("readers_start")
                for folder in ("artifacts", "runs"):
                    shutil.copytree(start / folder, cwd / folder)
                for folder in ("scripts", "clients"):
                    (cwd / folder).symlink_to(ROOT / folder, target_is_directory=True)
            made[name] = Page(name, cwd, hub_model)
        return made[name]

    return page


@pytest.mark.parametrize("block", ALL, ids=[block.name for block in ALL])
def test_block_runs(block, pages):
    page = pages(block.page)
    outcome, said = page.result(BLOCKS[block.page].index(block))
    if outcome == "skipped":
        pytest.skip(said)
    assert outcome == "passed", said


def test_readme_is_a_door_of_at_most_200_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_has_the_main_job_and_the_test_command_ci_runs():
    shell = [block.code.strip() for block in BLOCKS["README.md"] if block.lang in SHELL]
    assert README_MAIN_JOB in shell, "the README's main job changed: update README_MAIN_JOB and configs/tiny.toml's header"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] in shell, f"the README's test command is not .ci/run's last line, {ci[-1]!r}"


def test_markers_are_few_and_each_gives_its_reason():
    not_run = [block for block in ALL if block.not_run]
    assert all(len(block.not_run.split()) >= 2 for block in not_run), [b.name for b in not_run]
    assert len(not_run) <= len(ALL) // 2, f"{len(not_run)} of {len(ALL)} blocks are not run"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6}\s+(.*)", line)):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            result.add(base if n == 0 else f"{base}-{n}")
    return result


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_name_files_that_exist(page):
    broken = []
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
