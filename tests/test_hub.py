"""Hub ids for ortlora-build --model and ortlora-export --base, through huggingface_hub, with no Hub reachable.

A small HTTP server on 127.0.0.1 answers the endpoints huggingface_hub 2.4's snapshot_download calls (HF_ENDPOINT):
GET /api/models/{id}/revision/{rev} (the commit), GET /api/models/{id}/tree/{commit} (the file listing), and
HEAD / GET /{id}/resolve/{commit}/{file} (X-Repo-Commit, ETag or X-Linked-Etag / X-Linked-Size for LFS files,
Content-Length), with the Hub's X-Error-Code on a 404 or 401. It serves the tiny model as the repository's
``main`` and a tiny model of another seed as tag ``v2``. The commands run in subprocesses, as a user runs them:
huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE and HF_TOKEN when it is imported. The cache it fills is
its own layout (models--owner--name/blobs, refs, snapshots), read back with HF_HUB_OFFLINE=1 and nothing listening.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from ortlora.build import cli as build_cli
from ortlora.build.tiny import create_tiny_model
from ortlora.files import MANIFEST_NAME
from tests.cli_helpers import one_line

REPO = "ortlora-test/tiny-qwen2"
GATED = "ortlora-test/gated"
TOKEN = "hf_test_token"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The Hub's read endpoints for a few repositories: {repo: {"refs": {name: commit}, commit: {file: bytes}}}."""

    def __init__(self, repos: dict):
        self.repos, self.requests = repos, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def send(handler, status: int, headers: dict, data: bytes = b"", body: bool = True) -> None:
        handler.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(data))}).items():
            handler.send_header(key, value)
        handler.end_headers()
        if body:
            handler.wfile.write(data)

    def answer(self, handler, body: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        self.requests.append((handler.command, path, handler.headers.get("authorization")))
        parts = path.strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo = "/".join(parts[2:4] if api else parts[:2])
        rest = parts[4:] if api else parts[2:]
        error = {"Content-Type": "application/json"}
        if repo not in self.repos:
            return self.send(handler, 401, error | {"X-Error-Code": "RepoNotFound"}, b'{"error": "not found"}', body)
        entry = self.repos[repo]
        if entry.get("gated") and handler.headers.get("authorization") != f"Bearer {TOKEN}":
            return self.send(handler, 401, error | {"X-Error-Code": "GatedRepo"}, b'{"error": "gated"}', body)
        kind, revision = rest[0], rest[1]
        commit = entry["refs"].get(revision, revision)
        if commit not in entry:
            return self.send(handler, 404, error | {"X-Error-Code": "RevisionNotFound"}, b'{"error": "no rev"}', body)
        files = entry[commit]
        if api and kind == "revision":
            info = {"id": repo, "sha": commit, "private": False, "siblings": [{"rfilename": f} for f in files]}
            return self.send(handler, 200, {"Content-Type": "application/json"}, json.dumps(info).encode(), body)
        if api and kind == "tree":
            tree = [{"type": "file", "path": name, "size": len(data), "oid": _git_blob_sha1(data)}
                    | ({"lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}}
                       if name.endswith(".safetensors") else {})
                    for name, data in files.items()]
            return self.send(handler, 200, {"Content-Type": "application/json"}, json.dumps(tree).encode(), body)
        name = "/".join(rest[2:])
        if kind != "resolve" or name not in files:
            missing = error | {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
            return self.send(handler, 404, missing, b"", body)
        data = files[name]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
        if name.endswith(".safetensors"):  # an LFS file: the Hub names the object's sha256 and size
            headers |= {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))}
        return self.send(handler, 200, headers, data, body)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tiny_model, tmp_path_factory):
    """The tiny model (the one the session's artifacts are built from) at main, another seed's at tag v2."""
    other = create_tiny_model(tmp_path_factory.mktemp("model") / "tiny-seed1", seed=1)
    files_a, files_b = _files(tiny_model), _files(other)
    server = FakeHub({
        REPO: {"refs": {"main": COMMIT_A, "v2": COMMIT_B}, COMMIT_A: files_a, COMMIT_B: files_b},
        GATED: {"refs": {"main": COMMIT_A}, COMMIT_A: {"config.json": files_a["config.json"]}, "gated": True},
    })
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_home")


def _closed_port_url() -> str:
    """An endpoint where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _env(endpoint: str, hf_home: Path, offline: bool = False, token: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "1" if offline else "0"}
    return env | ({"HF_TOKEN": token} if token else {})


def _run(command: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """A console command as pip's wrapper script runs it."""
    code = f"import sys; from ortlora._entry import {command}; sys.exit({command}())"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def _refused(result: subprocess.CompletedProcess) -> str:
    """The one stderr line of a refused command (exit 2), never a traceback."""
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr, result.stderr
    return result.stderr


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


@pytest.fixture(scope="module")
def built(hub, hf_home, tmp_path_factory) -> Path:
    """ortlora-build --model owner/name, downloaded from the local Hub into a fresh cache."""
    out = tmp_path_factory.mktemp("hub-build") / "artifacts"
    result = _run("build", ["--model", REPO, "--out", out], _env(hub.url, hf_home))
    assert result.returncode == 0, result.stderr
    return out


def test_build_downloads_and_records_the_commit(built, hub, hf_home, artifacts):
    model = _manifest(built)["model"]
    assert (model["hub_id"], model["revision"]) == (REPO, COMMIT_A)
    snapshot = hf_home / "hub" / "models--ortlora-test--tiny-qwen2" / "snapshots" / COMMIT_A
    assert Path(model["source"]) == snapshot.resolve()
    assert (snapshot.parent.parent / "refs" / "main").read_text() == COMMIT_A  # huggingface_hub's own layout
    assert model["weights_sha256"] == _manifest(artifacts)["model"]["weights_sha256"]  # the very same weights
    asked = {(method, path) for method, path, _ in hub.requests}
    assert ("GET", f"/api/models/{REPO}/revision/main") in asked
    assert ("GET", f"/{REPO}/resolve/{COMMIT_A}/model.safetensors") in asked


def test_build_from_the_cache_offline(built, hf_home, tmp_path, hub):
    """HF_HUB_OFFLINE=1 and nothing listening at HF_ENDPOINT: the same id builds from the cache."""
    seen = len(hub.requests)
    out = tmp_path / "offline"
    result = _run("build", ["--model", REPO, "--out", out], _env(_closed_port_url(), hf_home, offline=True))
    assert result.returncode == 0, result.stderr
    assert len(hub.requests) == seen
    assert _manifest(out)["model"] == _manifest(built)["model"]
    assert f"--model {REPO}: commit {COMMIT_A}" in result.stdout


def test_build_revision_picks_another_commit(built, hub, hf_home, tmp_path):
    out = tmp_path / "v2"
    result = _run("build", ["--model", REPO, "--revision", "v2", "--out", out], _env(hub.url, hf_home))
    assert result.returncode == 0, result.stderr
    model = _manifest(out)["model"]
    assert (model["hub_id"], model["revision"]) == (REPO, COMMIT_B)
    assert model["weights_sha256"] != _manifest(built)["model"]["weights_sha256"]  # seed 1's weights


@pytest.mark.parametrize("case, args, expected", [
    ("online", ["--model", "ortlora-test/nope"], "is no directory here and no model repository on"),
    ("online", ["--model", REPO, "--revision", "v9"], "has no revision 'v9' on"),
    ("fresh offline", ["--model", REPO], "is not in the Hugging Face cache"),
    ("closed", ["--model", REPO], "cannot be reached"),
    ("online", ["--model", GATED], "is a gated repository"),
])
def test_build_refusals_are_one_line(hub, tmp_path, case, args, expected):
    """Unknown repository or revision, offline with an empty cache, no Hub, a gated repository without HF_TOKEN."""
    endpoint = _closed_port_url() if case == "closed" else hub.url
    env = _env(endpoint, tmp_path / "hf", offline=case.endswith("offline"))
    result = _run("build", [*args, "--out", tmp_path / "out"], env)
    assert expected in _refused(result)
    assert not (tmp_path / "out").exists()


def test_hf_token_opens_a_gated_repository(hub, tmp_path):
    code = f"from ortlora import hub; print(hub.resolve({GATED!r}, None, '--model'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=_env(hub.url, tmp_path / "hf", token=TOKEN))
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.splitlines()[-1], "config.json").is_file()
    assert (f"/api/models/{GATED}/revision/main", f"Bearer {TOKEN}") in {(p, a) for _, p, a in hub.requests}


@pytest.mark.parametrize("args, expected", [
    (["--tiny", "--revision", "v2"], "--revision v2 goes with --model and a Hugging Face Hub id, not --tiny"),
    (["--model", "MODEL", "--revision", "v2"], "--revision v2 goes with a Hugging Face Hub id, and --model"),
    (["--model", "a/b/c"], "does not exist"),  # no Hub id (two slashes): the directory's own error
])
def test_revision_and_paths_refused(capsys, tmp_path, tiny_model, args, expected):
    args = [str(tiny_model) if a == "MODEL" else a for a in args]
    err = one_line(capsys, build_cli.main([*args, "--out", str(tmp_path / "out")]))
    assert expected in err


def test_a_directory_wins_over_an_id(tmp_path, tiny_model, monkeypatch):
    from ortlora import hub

    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").symlink_to(tiny_model)
    assert hub.resolve("owner/name", None, "--model") == Path("owner/name")
    assert hub.is_hub_id("Qwen/Qwen2.5-0.5B") and not hub.is_hub_id("gpt2") and not hub.is_hub_id("a--b/c")
    assert hub.snapshot_record(tiny_model) == {}


def test_export_base_from_the_hub(hub, hf_home, artifacts, trained_adapter, tmp_path):
    """--base owner/name: --to merged merges into the downloaded base (checked by its weights' hash); --to peft names
    the id and commit in adapter_config.json, as PEFT's from_pretrained reads them."""
    env = _env(hub.url, hf_home)
    common = ["--artifacts", artifacts, "--adapter", trained_adapter, "--base", REPO]
    merged = _run("export", [*common, "--to", "merged", "--out", tmp_path / "merged"], env)
    assert merged.returncode == 0, merged.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    peft = _run("export", [*common, "--to", "peft", "--out", tmp_path / "peft"], env)
    assert peft.returncode == 0, peft.stderr
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (REPO, COMMIT_A)
    # Another commit's weights are not the base the artifacts were built from.
    other = _run("export", [*common, "--revision", "v2", "--to", "merged", "--out", tmp_path / "v2"], env)
    assert "is not the one the artifacts were built from" in _refused(other)
    missing = _run("export", [*common[:-1], "ortlora-test/nope", "--to", "merged", "--out", tmp_path / "nope"], env)
    assert "no model repository" in _refused(missing)


def test_export_without_huggingface_hub(artifacts, trained_adapter, tmp_path):
    """The runtime environment may lack huggingface_hub (it comes with transformers): a Hub id then says so in one
    line, and a directory needs no huggingface_hub at all."""
    code = "import sys; sys.modules['huggingface_hub'] = None; from ortlora._entry import export; sys.exit(export())"
    common = ["--artifacts", artifacts, "--adapter", trained_adapter, "--to", "peft"]

    def run(*args):
        return subprocess.run([sys.executable, "-c", code, *map(str, common), *map(str, args)], capture_output=True,
                              text=True, timeout=120)

    assert "pip install huggingface_hub" in _refused(run("--base", REPO, "--out", tmp_path / "hub"))
    local = run("--base", artifacts / "base_model", "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr
