"""ortlora-export: a trained adapter as a PEFT adapter, a merged Hugging Face model, a merged ONNX model, ONNX Runtime
and onnxruntime-genai adapters, GGUF for llama.cpp or an mlx-lm adapter."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
from pathlib import Path

from ortlora import __version__
from ortlora.errors import OrtloraError, add_debug_argument, cli_entry
from ortlora.files import read_json
from ortlora.handoff import gguf_export, mlx_adapter
from ortlora.manifest import Manifest
from ortlora.output_dirs import EXPORT_MARKER, check_output_dir, replace_dir, staging_dir
from ortlora.runtime.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    check_peft_config,
    find_checkpoint,
    load_adapter,
)
from ortlora.runtime.config import check_paths

TARGETS = ("peft", "merged", "onnx", "onnx-adapter", "genai", "gguf", "gguf-merged", "mlx")
MAX_SHARD_SIZE = "2GB"
MIN_SHARD_BYTES = 2**10
# The targets that use each option; given with another --to it would be ignored, so it is refused (--to mlx
# refuses --with-base and --gguf-type itself, in mlx_adapter.check_exportable).
USED_BY = {"--gguf-type": ("gguf", "gguf-merged"), "--with-base": ("gguf",), "--ort-format": ("onnx",),
           "--max-shard-size": ("merged",), "--base": ("peft", "merged", "onnx", "gguf", "gguf-merged", "mlx"),
           "--revision": ("peft", "merged", "onnx", "gguf", "gguf-merged", "mlx")}
REFUSED_BY_TARGET = {("--gguf-type", "mlx"), ("--with-base", "mlx")}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)?\s*", text.upper())
    if not match:
        raise OrtloraError(f"--max-shard-size must look like 2GB or 500MB, got {text!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, None: 1}[match.group(2)])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ortlora-export", description=__doc__, allow_abbrev=False)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts/tiny"), help="the artifact directory the adapter was trained on")
    parser.add_argument("--adapter", type=Path, required=True,
                        help="a checkpoint, a run directory (its latest checkpoint), a PEFT or an mlx-lm adapter directory")
    parser.add_argument("--to", choices=TARGETS, required=True,
                        help="peft: the adapter alone; merged: a Hugging Face model with W + B@A*scaling; "
                             "onnx: that merged model as an inference ONNX model (needs ortlora[build]); "
                             "onnx-adapter: ONNX Runtime's .onnx_adapter for the artifacts' graphs; "
                             "genai: an onnxruntime-genai model folder with that adapter; gguf: the adapter for "
                             "llama.cpp; gguf-merged: the merged model for llama.cpp (both need ortlora[gguf]); "
                             "mlx: the adapter for mlx-lm")
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced only with --force)")
    parser.add_argument("--base", default=None,
                        help="the base model directory, or a Hugging Face Hub id (owner/name) read through "
                        "huggingface_hub's cache (default: the one the artifacts were built from)")
    parser.add_argument("--revision", default=None,
                        help="with a Hub id for --base: a branch, tag or commit (default: the commit the artifacts were "
                        "built from where they were built from that id, else the default branch)")
    parser.add_argument("--max-shard-size", default=None,  # None: not given (MAX_SHARD_SIZE), see check_options
                        help=f"merged: largest safetensors file (default: {MAX_SHARD_SIZE})")
    parser.add_argument("--ort-format", action="store_true", help="onnx: also write model.ort, the format of ONNX Runtime's mobile builds")
    parser.add_argument("--gguf-type", default=None,
                        help="gguf: f32 (default) or f16; gguf-merged: f16 (default), bf16, q8_0 or f32")
    parser.add_argument("--with-base", action="store_true",
                        help="gguf: also write base.gguf, the base model for llama.cpp (f16, or f32 with --gguf-type f32)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output directory (only one that ortlora-export wrote)")
    add_debug_argument(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def check_options(args: argparse.Namespace) -> None:
    """Refuse, before anything is read, an option that --to would ignore and a shard size no export can use."""
    given = {"--gguf-type": args.gguf_type, "--with-base": args.with_base or None, "--ort-format": args.ort_format or None,
             "--max-shard-size": args.max_shard_size, "--base": args.base, "--revision": args.revision}
    for flag, value in given.items():
        if isinstance(value, str) and not value.strip():
            raise OrtloraError(f"{flag} is empty: give it a value, or leave it out for the default")
        if value is not None and args.to not in USED_BY[flag] and (flag, args.to) not in REFUSED_BY_TARGET:
            shown = flag if value is True else f"{flag} {value}"
            users = " or ".join(USED_BY[flag])
            raise OrtloraError(f"{shown} goes with --to {users}; --to {args.to} does not use it: leave {flag} out")
    if args.base is not None and args.to == "gguf" and not args.with_base:
        raise OrtloraError(f"--base {args.base} is read by --to gguf only with --with-base (base.gguf is written from "
                           "it): pass --with-base, or leave --base out")
    if args.revision is not None and args.base is None:
        raise OrtloraError(f"--revision {args.revision} goes with --base and a Hugging Face Hub id: pass --base "
                           "owner/name, or leave --revision out")
    args.max_shard_size = MAX_SHARD_SIZE if args.max_shard_size is None else args.max_shard_size
    if parse_size(args.max_shard_size) < MIN_SHARD_BYTES:
        raise OrtloraError(f"--max-shard-size {args.max_shard_size} is {parse_size(args.max_shard_size)} bytes; a "
                           f"shard holds at least {MIN_SHARD_BYTES} bytes (1KB): pass a size like {MAX_SHARD_SIZE}")
    check_paths({"--artifacts": args.artifacts, "--adapter": args.adapter, "--base": args.base, "--out": args.out})


@cli_entry
def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


def run(args: argparse.Namespace) -> Path:
    """Export as ``args`` (ortlora-export's, parsed) say; returns the output directory. ortlora-export and
    ``ortlora.export()`` both export through here."""
    check_options(args)
    check_output_dir(args.out, flag="--force", replace=args.force, what="ortlora-export",
                     reads=[Path(p) for p in (args.artifacts, args.adapter, args.base) if p is not None])
    manifest = Manifest.load(args.artifacts)
    adapter_dir = find_checkpoint(args.adapter)  # a checkpoint, RUN, RUN/best, a PEFT or an mlx-lm adapter
    from_mlx = mlx_adapter.is_mlx_adapter(adapter_dir)
    weights = load_adapter(adapter_dir, manifest)  # wrong model, rank or shapes: an error listing them
    max_shard = parse_size(args.max_shard_size)
    if args.to == "onnx" and not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "onnx")):
        raise OrtloraError("--to onnx exports with torch and transformers: pip install \"ortlora[build]\"")
    if args.to in ("onnx-adapter", "genai"):  # refused before anything is written
        from ortlora.handoff import genai, onnx_adapter

        onnx_adapter.check_exportable(manifest)
        if args.to == "genai":
            genai.check_exportable(manifest)
    if args.to in ("gguf", "gguf-merged", "mlx"):  # refused before anything is written
        (gguf_export if args.to.startswith("gguf") else mlx_adapter).check_exportable(args, manifest)
    hub_id = resolve_base(args, manifest)  # a Hub id becomes its snapshot in huggingface_hub's cache

    # Everything is written beside --out and moved into place at the end: a failure writes nothing.
    with staging_dir(args.out) as staging:
        if args.to == "peft":
            base = base_model_or_none(args, manifest)
            if from_mlx:
                mlx_adapter.write_peft_weights(manifest, weights, staging / ADAPTER_WEIGHTS)
            else:
                shutil.copy2(adapter_dir / ADAPTER_WEIGHTS, staging / ADAPTER_WEIGHTS)
            given = adapter_dir / ADAPTER_CONFIG  # an adapter saved without its config gets ours
            config = read_json(given) if given.is_file() and not from_mlx else adapter_config(manifest, "")
            if given.is_file() and not from_mlx:  # the user's config is copied: PEFT must read it as this adapter
                check_peft_config(config, manifest, given)
            if hub_id is not None:  # PEFT's from_pretrained loads the base by its Hub id, at this commit
                config["base_model_name_or_path"], config["revision"] = hub_id, base.name
            elif base is not None:
                config["base_model_name_or_path"] = str(base.resolve())
            (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            summary = f"PEFT adapter ({len(weights)} tensors)"
        elif args.to == "onnx-adapter":
            summary = onnx_adapter.export(manifest, weights, staging)
        elif args.to == "genai":
            summary = genai.export(args.artifacts, manifest, weights, staging)
        elif args.to in ("gguf", "gguf-merged", "mlx"):
            summary = (gguf_export if args.to.startswith("gguf") else mlx_adapter).export(
                args, manifest, weights, staging, max_shard)
        else:
            from ortlora.handoff.merge import base_model_dir, write_merged

            base = base_model_dir(args.artifacts, manifest, args.base)
            if args.to == "merged":
                files = write_merged(base, manifest, weights, staging, args.artifacts, max_shard)
                summary = f"merged Hugging Face model ({len(files)} weight file{'s' if len(files) > 1 else ''})"
            else:
                from ortlora.build import merged_onnx

                summary = merged_onnx.export(base, manifest, weights, staging, args.artifacts, args.ort_format)
        marker = {"to": args.to, "adapter": str(adapter_dir.resolve()), "artifacts": str(args.artifacts.resolve()),
                  "artifact_id": manifest.artifact_id, "ortlora": __version__}
        (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        replace_dir(staging, args.out, "ortlora-export")
    print(f"wrote {args.out}: {summary} from {adapter_dir}")
    return args.out


def resolve_base(args: argparse.Namespace, manifest: Manifest) -> str | None:
    """Make --base a directory (a Hub id: its snapshot, at --revision, else at the commit the artifacts were built
    from where they were built from that id). Returns the Hub id, or None for a local --base or none."""
    if args.base is None:
        return None
    from ortlora import hub

    given = args.base
    from_hub = not Path(given).exists() and hub.is_hub_id(given)  # a directory of that name wins
    recorded = manifest.model.get("revision") if manifest.model.get("hub_id") == given else None
    args.base = hub.resolve(given, args.revision, "--base", default_revision=recorded)
    return given if from_hub else None


def base_model_or_none(args: argparse.Namespace, manifest: Manifest) -> Path | None:
    """--to peft needs no base model; name it in the adapter config when it is at hand."""
    from ortlora.handoff.merge import base_model_dir

    try:
        return base_model_dir(args.artifacts, manifest, args.base)
    except OrtloraError:
        if args.base is not None:
            raise
        return None
