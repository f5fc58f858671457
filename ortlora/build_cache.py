"""ortlora-train --model: the artifacts built on first use, kept in a cache, and reused from then on.

An entry is the artifact directory of one build, ``CACHE/artifacts/NAME-KEY``: CACHE is $ORTLORA_CACHE (default
$XDG_CACHE_HOME/ortlora, else ~/.cache/ortlora), NAME the model's, and KEY a hash of all that decides the artifacts:

- the model: a Hub model's id and commit; a local directory's path (the manifest records it as the base) and the
  hashes of its weights (the manifest's weights_sha256), config.json and tokenizer files; builtin:tiny and its seed;
- ortlora-build's options that shape the artifacts (build/cli.py's add_artifact_arguments), defaults filled in;
- ortlora's version.

builder.build writes a staging directory and renames it into place, so an entry is complete or absent. One is used
only where its manifest loads and agrees with the key's model and LoRA settings; one that does not (changed since it
was built) is refused, never replaced, as ortlora-build never replaces what it did not write. Two
processes that need the same entry take turns (a lock file beside it), and the second finds the first one's build.
Torch-free: the build side is imported only to build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from pathlib import Path

from ortlora import __version__
from ortlora.errors import OrtloraError
from ortlora.manifest import MANIFEST_NAME, Manifest

CACHE_ENV = "ORTLORA_CACHE"
ENTRY_HASH = 16  # hex digits of the key in an entry's name: 64 bits


def cache_root() -> Path:
    """Where the cache lives: $ORTLORA_CACHE, else $XDG_CACHE_HOME/ortlora, else ~/.cache/ortlora."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ortlora"


def artifacts_for(model: str, options: dict, threads: int | None = None) -> Path:
    """The artifact directory of ``model`` built with ``options`` (ortlora-build's artifact options by name; those
    left out take the build's defaults): a complete cached build, or a new one. Prints where it is."""
    from ortlora.api import arguments
    from ortlora.build import cli as build_cli

    args = arguments(build_cli.make_parser(), {"model": model, "out": "-", "threads": threads, **options},
                     f"ortlora-train --model {model}")
    build_cli.check_numbers(args)  # before any download or hashing
    identity, name = model_identity(args)
    settings = {key: getattr(args, key) for key in build_cli.artifact_defaults() if key != "revision"}
    key = hashlib.sha256(json.dumps({"model": identity, "build": settings, "ortlora": __version__},
                                    sort_keys=True).encode()).hexdigest()
    entry = cache_root() / "artifacts" / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)[:48]}-{key[:ENTRY_HASH]}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.parent / f".{entry.name}.lock", entry):
        if (entry / MANIFEST_NAME).is_file():
            problem = _mismatch(entry, identity, settings)
            if problem is not None:  # changed since it was built: never used, never replaced
                raise OrtloraError(f"the cached artifacts {entry} are not the build they are kept for ({problem}); "
                                   "remove that directory and run again")
            print(f"artifacts: {entry} (cached)", flush=True)
            return entry
        if missing := build_cli.missing_build_packages():
            raise OrtloraError(f"--model {model}: its artifacts are not in the cache yet, and building them needs torch, "
                               f"transformers and onnx ({', '.join(missing)} missing): {build_cli.INSTALL_BUILD} (or "
                               "train from artifacts built elsewhere with --artifacts DIR)")
        args.out = entry
        start = time.perf_counter()
        manifest = build_cli.run(args)
        print(build_cli.built(entry, manifest, time.perf_counter() - start), flush=True)
    print(f"artifacts: {entry} (built)", flush=True)
    return entry


def model_identity(args) -> tuple[dict, str]:
    """What identifies the model of ``args`` (ortlora-build's, parsed) in the key, and its name for the entry. A Hub
    id is resolved to its snapshot (downloaded unless cached), which ``args.model`` then names."""
    from ortlora import hub
    from ortlora.build.cli import TINY_MODEL

    given = str(args.model)
    if given == TINY_MODEL and not Path(given).exists():
        return {"builtin": "tiny", "seed": args.seed}, "tiny"
    if not Path(given).exists() and hub.is_hub_id(given):
        import importlib.util

        if importlib.util.find_spec("huggingface_hub") is None:
            from ortlora.build.cli import INSTALL_BUILD

            raise OrtloraError(f"--model {given} is no directory here, so it is read as a Hugging Face Hub id, which "
                               f"needs huggingface_hub (and the build, torch, transformers and onnx): {INSTALL_BUILD}")
        folder = hub.resolve(given, args.revision, "--model")
        record = hub.snapshot_record(folder)
        args.model, args.revision = str(folder), None  # the build reads the snapshot
        if record:
            return {"hub_id": record["hub_id"], "revision": record["revision"]}, given.split("/")[-1]
    path = hub.resolve(given, args.revision, "--model")  # a local path: --revision refused there, in one line
    from ortlora.build.model_dir import TOKENIZER_FILES, check_model_dir
    from ortlora.weights import weights_sha256

    check_model_dir(path)  # what is missing or wrong in it, before hashing
    files = {name: hashlib.sha256((path / name).read_bytes()).hexdigest()
             for name in ("config.json", *TOKENIZER_FILES) if (path / name).is_file()}
    return {"path": str(path.resolve()), "weights_sha256": weights_sha256(path), "files": files}, path.resolve().name


def _mismatch(entry: Path, identity: dict, settings: dict) -> str | None:
    """Why the cached ``entry`` is not the build the key names (a manifest that does not load, another model or other
    LoRA settings), or None where it is."""
    try:
        manifest = Manifest.load(entry)
    except OrtloraError as e:
        return str(e)
    model, lora = manifest.model, manifest.lora
    expected = {"ortlora version": (manifest.versions.get("ortlora"), __version__),
                "rank": (lora["rank"], settings["rank"]), "alpha": (lora["alpha"], settings["alpha"]),
                "dropout": (lora["dropout"], settings["dropout"]), "init": (lora["init"], settings["init"]),
                "rslora": (lora.get("rslora", False), settings["rslora"]), "dora": (lora.get("dora", False), settings["dora"]),
                "label smoothing": (manifest.label_smoothing, settings["label_smoothing"]),
                "base precision": (model.get("base_precision", "fp32"), settings["base_precision"]),
                "recompute": (model.get("recompute", "none"), settings["recompute"])}
    if "hub_id" in identity:
        expected["model"] = ((model.get("hub_id"), model.get("revision")), (identity["hub_id"], identity["revision"]))
    elif "weights_sha256" in identity:
        expected["model"] = ((model["source"], model["weights_sha256"]), (identity["path"], identity["weights_sha256"]))
    if settings["targets"].strip() != "all-linear":
        expected["targets"] = (sorted(lora["targets"]), sorted({t.strip() for t in settings["targets"].split(",")}))
    if settings["layers"] is None:
        expected["layers"] = ("layers" in lora, False)
    wrong = [name for name, (found, wanted) in expected.items() if found != wanted]
    return f"its manifest differs in {', '.join(wrong)}" if wrong else None


@contextlib.contextmanager
def _locked(path: Path, entry: Path):
    """Hold ``path`` locked while ``entry`` is looked up and built; another process waits its turn."""
    with open(path, "a+") as f:
        if os.name == "nt":
            import msvcrt

            def take():
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            def take():
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        said = False
        while True:
            try:
                take()
                break
            except OSError:
                if not said:
                    print(f"waiting for another process building {entry}", flush=True)
                    said = True
                time.sleep(0.5)
        yield  # closing the file releases the lock
