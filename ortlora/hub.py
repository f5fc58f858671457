"""Hugging Face Hub ids for ``ortlora-build --model`` and ``ortlora-export --base``, through huggingface_hub.

An argument that names an existing path is that path, always; one that does not and is spelled like a Hub id
(``owner/name``) is downloaded with ``snapshot_download`` into huggingface_hub's own cache, so everything
huggingface_hub reads applies as it does for transformers: HF_HOME / HF_HUB_CACHE (where), HF_HUB_OFFLINE=1 (the
cache only), HF_TOKEN (gated and private repositories), HF_ENDPOINT (another Hub or a mirror), its progress bars
(HF_HUB_DISABLE_PROGRESS_BARS=1 hides them). Only the files a build reads are fetched: config.json, the
safetensors weights and their index, the tokenizer files and generation_config.json, from the repository's root.

A snapshot lives at ``HUB_CACHE/models--owner--name/snapshots/COMMIT``; ``snapshot_record`` reads the id and the
commit back from that path, which is what the build's manifest records (``model.hub_id``, ``model.revision``).
Torch-free; huggingface_hub is imported only when an id is resolved (the runtime environment may lack it).
"""

from __future__ import annotations

import re
from pathlib import Path

from ortlora.errors import OrtloraError, no_space, one_line

# What the build reads (build/model_dir.py), at the repository's root: weights, config, tokenizer, chat template.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "merges.txt", "chat_template.jinja"]
IGNORE_PATTERNS = ["*/*"]  # fnmatch's * crosses "/": without this, a subfolder's weights would come too
# huggingface_hub's rule (utils/_validators.py): names of word characters, "-" and ".", each starting and ending
# with a word character, neither "--" nor ".." anywhere. The owner is required here: "gpt2" is read as a path.
NAME = r"\w(?:[\w.-]{0,94}\w)?"
HUB_ID = re.compile(f"{NAME}/{NAME}")
COMMIT = re.compile(r"[0-9a-f]{40}")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is spelled like a Hub model id, owner/name (it may still name a local path too)."""
    return bool(HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text


def resolve(given: str | Path, revision: str | None, flag: str, default_revision: str | None = None) -> Path:
    """The local directory of ``given``: the path itself where one exists (or where ``given`` is no Hub id: its
    reader says what is wrong with it), else the Hub model's snapshot at ``revision`` (``default_revision`` where
    none is given, else the default branch), downloaded unless it is in the cache."""
    text = str(given)
    if Path(text).exists() or not is_hub_id(text):
        if revision is not None:
            what = "a local path" if Path(text).exists() else "not one (owner/name)"
            raise OrtloraError(f"--revision {revision} goes with a Hugging Face Hub id, and {flag} {text} is {what}: "
                               "leave --revision out")
        return Path(text)
    try:
        import huggingface_hub
    except ImportError:
        raise OrtloraError(f"{flag} {text} is no directory here, so it is read as a Hugging Face Hub id, which needs "
                           "huggingface_hub: pip install huggingface_hub") from None
    revision = revision if revision is not None else default_revision
    try:
        folder = Path(huggingface_hub.snapshot_download(text, revision=revision, allow_patterns=ALLOW_PATTERNS,
                                                        ignore_patterns=IGNORE_PATTERNS))
    except Exception as e:
        if no_space(e):
            raise  # the CLI's own line for a full disk
        raise OrtloraError(_failure(e, text, revision, flag)) from None
    if not folder.is_dir():  # nothing matched ALLOW_PATTERNS: snapshot_download made no folder
        raise OrtloraError(f"{flag} {text} at {folder.name} holds none of config.json, *.safetensors, tokenizer.json "
                           "at its root: is it a Hugging Face Transformers model?")
    print(f"{flag} {text}: commit {folder.name} ({folder})", flush=True)
    return folder


def snapshot_record(path: Path) -> dict:
    """{"hub_id": "owner/name", "revision": COMMIT} for a snapshot folder of huggingface_hub's cache, else {}."""
    path = Path(path).resolve()
    repo = path.parent.parent.name
    if path.parent.name != "snapshots" or not COMMIT.fullmatch(path.name) or not repo.startswith("models--"):
        return {}
    hub_id = repo.removeprefix("models--").replace("--", "/")  # ids have no "--" of their own
    return {"hub_id": hub_id, "revision": path.name} if is_hub_id(hub_id) else {}


def _failure(error: Exception, repo: str, revision: str | None, flag: str) -> str:
    """The one line for a failed snapshot_download: what went wrong, and what to do about it."""
    from huggingface_hub import constants, errors
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # newer releases: a cached copy lacks files

    at = f" (revision {revision})" if revision else ""
    where, cache = constants.ENDPOINT, constants.HF_HUB_CACHE
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, GatedRepoError):
        return (f"{flag} {repo} is a gated repository on {where}: accept its conditions on its page there and set "
                f"HF_TOKEN to a token of that account")
    if isinstance(error, RepositoryNotFoundError) or (isinstance(error, HfHubHTTPError) and status in (401, 403)):
        return (f"{flag} {repo} is no directory here and no model repository on {where} that this machine may read "
                f"(HTTP {status}): check the spelling; a private repository needs HF_TOKEN")
    if isinstance(error, RevisionNotFoundError):
        return (f"{flag} {repo} has no revision {revision!r} on {where}: pass one of its branches, tags or commits "
                f"to --revision")
    if isinstance(error, incomplete):
        return (f"{flag} {repo}{at}: the copy in the Hugging Face cache ({error.snapshot_path}) is incomplete and "
                f"the Hub cannot be reached to complete it: run again online")
    if isinstance(error, LocalEntryNotFoundError):
        if constants.is_offline_mode():
            return (f"{flag} {repo}{at} is not in the Hugging Face cache ({cache}), and HF_HUB_OFFLINE is set: "
                    f"download it once without HF_HUB_OFFLINE, or pass a local directory")
        cause = error.__cause__ or error
        return (f"{flag} {repo}{at}: {where} cannot be reached ({type(cause).__name__}: {one_line(cause)[:200]}) and "
                f"the model is not in the Hugging Face cache ({cache}): check the connection (or HF_ENDPOINT), or "
                f"pass a local directory")
    if isinstance(error, HfHubHTTPError):
        return f"{flag} {repo}{at}: {where} answered HTTP {status} ({one_line(error)[:200]}): try again later"
    return f"{flag} {repo}{at}: downloading from {where} failed ({type(error).__name__}: {one_line(error)[:200]})"
