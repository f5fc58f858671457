"""ortlora-build: export a Qwen2 / Qwen3 model with LoRA and generate ONNX Runtime training artifacts."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path

from ortlora.errors import OrtloraError, add_debug_argument, cli_entry
from ortlora.output_dirs import remove_stale_temp, temp_prefix
from ortlora.runtime.config import check_paths, check_seed, check_threads

TINY_TEMP = "ortlora-tiny"  # the tiny model is made in a temporary directory of this name
FLOAT32_MAX = 3.4028234663852886e38
BUILD_PACKAGES = ("torch", "transformers", "onnx")
INSTALL_BUILD = "pip install 'ortlora[build]'"


TINY_MODEL = "builtin:tiny"  # --model's name for --tiny (ortlora-train --model builtin:tiny builds it too)


def missing_build_packages() -> list[str]:
    """The build side's packages that this environment lacks (a runtime-only install lacks them all)."""
    return [name for name in BUILD_PACKAGES if importlib.util.find_spec(name) is None]


def add_artifact_arguments(parser, defaults: bool = True) -> None:
    """The options that shape the artifacts: the model's revision, LoRA and the frozen base. ortlora-train --model
    takes the same ones (build_cache.py); there ``defaults=False`` leaves each default None, so that an option the
    user gave can be told from one left out."""
    def d(value):
        return value if defaults else None

    parser.add_argument("--revision", default=None,
                        help="with a Hub id for --model: a branch, tag or commit (default: the repository's default "
                        "branch); the manifest records the commit")
    parser.add_argument("--rank", type=int, default=d(8), help="LoRA rank r (default: 8)")
    parser.add_argument("--alpha", type=float, default=d(16.0), help="LoRA alpha; scaling = alpha / rank (default: 16)")
    parser.add_argument("--dropout", type=float, default=d(0.0), help="dropout on the LoRA input, training only (default: 0)")
    parser.add_argument("--targets", default=d("q_proj,v_proj"),
                        help="comma-separated projections (q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj) "
                        "or all-linear (default: q_proj,v_proj)")
    parser.add_argument("--init", choices=("gaussian", "kaiming"), default=d("gaussian"),
                        help="initialisation of LoRA A (B starts at zero): gaussian, N(0, 1/rank) (PEFT's "
                        "init_lora_weights=\"gaussian\"), or kaiming, nn.Linear's kaiming-uniform (PEFT's default, "
                        "init_lora_weights=True) (default: gaussian)")
    parser.add_argument("--rslora", action="store_true", default=d(False),
                        help="rank-stabilised LoRA: scaling = alpha / sqrt(rank) (PEFT's use_rslora)")
    parser.add_argument("--layers", default=None,
                        help="adapt only these decoder layers: N or last:N for the last N, or indices and ranges "
                        "like 0,1,5-7 (PEFT's layers_to_transform) (default: all)")
    parser.add_argument("--rank-pattern", default=None,
                        help="rank per module name, e.g. v_proj=16,o_proj=4 or '{\"layers.0.self_attn.q_proj\": 4}' "
                        "(PEFT's rank_pattern: a key matches the end of a module name, the first match wins)")
    parser.add_argument("--alpha-pattern", default=None,
                        help="alpha per module name, as --rank-pattern (PEFT's alpha_pattern)")
    parser.add_argument("--dora", action="store_true", default=d(False),
                        help="DoRA: a trainable magnitude per output row of each adapted module (PEFT's use_dora; "
                        "fp32 base only)")
    parser.add_argument("--label-smoothing", type=float, default=d(0.0), help="label smoothing of the loss (default: 0)")
    parser.add_argument("--base-precision", choices=("fp32", "bf16", "int8", "int4"), default=d("fp32"),
                        help="how the frozen matrices are stored and read: fp32; bf16 (half the bytes: a bf16 "
                        "checkpoint's values bit for bit, others rounded as torch rounds; widened to fp32 at each "
                        "use); or blockwise int8 / int4 quantized (dequantized at each use). LoRA stays fp32 "
                        "(default: fp32)")
    parser.add_argument("--block-size", type=int, default=None,  # None: not given (BLOCK_SIZE where it applies)
                        help="inputs that share a scale in an int8 / int4 base (default: 32)")
    parser.add_argument("--recompute", choices=("none", "layers"), default=d("none"),
                        help="layers: each decoder layer's forward pass is recomputed in the backward pass instead of "
                        "keeping its activations (gradient checkpointing: less memory at large batches, about a "
                        "fifth to a quarter more time) (default: none)")


def artifact_defaults() -> dict:
    """Each artifact option's destination and default, as ortlora-build takes it."""
    parser = argparse.ArgumentParser(add_help=False)
    add_artifact_arguments(parser)
    return {action.dest: action.default for action in parser._actions}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ortlora-build",
        allow_abbrev=False,
        description="Inject LoRA into a Qwen2/Qwen2.5 or Qwen3 model, export it to ONNX with a causal-LM loss "
        "and generate ONNX Runtime training artifacts in which only the LoRA weights are trainable.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="local Hugging Face model directory (config.json, *.safetensors, tokenizer), or "
                        "a Hugging Face Hub id, owner/name, downloaded into huggingface_hub's cache (a directory "
                        f"of that name wins), or {TINY_MODEL} (as --tiny)")
    source.add_argument("--tiny", action="store_true", help="the built-in tiny Qwen2 model (created, seeded, no download)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/tiny"), help="artifact directory (default: artifacts/tiny)")
    add_artifact_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed for LoRA A initialisation and the tiny model (default: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the export (default: all cores)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing artifact directory (only one that ortlora-build wrote)")
    add_debug_argument(parser)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def check_numbers(args: argparse.Namespace) -> None:
    """Refuse option values no build can use (NaN and infinity included) or that it would ignore, in one line."""
    if args.rank <= 0:
        raise OrtloraError(f"--rank must be a positive integer, got {args.rank}")
    if not math.isfinite(args.alpha) or args.alpha <= 0:
        raise OrtloraError(f"--alpha must be a positive number, got {args.alpha}")
    if args.alpha > FLOAT32_MAX:  # scaling = alpha / r is a float32 in the graphs: infinity would train NaN
        raise OrtloraError(f"--alpha {args.alpha} is beyond float32's range (scaling = alpha / rank is a float32 in "
                           f"the graphs); pass at most {FLOAT32_MAX:.4g}")
    if not 0.0 <= args.dropout < 1.0:  # False for NaN too
        raise OrtloraError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise OrtloraError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    check_seed(args.seed)
    check_threads(args.threads)
    if args.block_size is not None and args.base_precision not in ("int8", "int4"):
        raise OrtloraError(f"--block-size {args.block_size} is for an int8 / int4 base, and --base-precision is "
                           f"{args.base_precision}: leave --block-size out, or pass --base-precision int8 or int4")
    check_paths({"--model": args.model, "--out": args.out})


def model_config(args: argparse.Namespace) -> dict:
    """config.json of the model to build (the tiny model's own), or {} where it cannot be read: the build checks
    the model directory itself and names every problem."""
    if args.tiny:
        from ortlora.build.tiny import TINY_CONFIG

        return TINY_CONFIG
    try:
        config = json.loads((args.model / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def check_against_model(args: argparse.Namespace, config: dict, rank_pattern: dict) -> None:
    """Refuse, before torch allocates them, ranks beyond any use (--layers beyond the model's layers are refused by
    lora_config.parse_layers before a range is made)."""
    hidden = config.get("hidden_size")
    if type(hidden) is int and hidden > 0:
        # Every projection LoRA adapts is hidden_size wide on one side, so B @ A has rank at most hidden_size.
        for flag, rank in [("--rank", args.rank)] + [(f"--rank-pattern {k}=", v) for k, v in rank_pattern.items()]:
            if rank > hidden:
                raise OrtloraError(f"{flag}{'' if flag.endswith('=') else ' '}{rank} is more than the model's "
                                   f"hidden size {hidden}, the highest rank a LoRA update of its projections can "
                                   f"have; pass at most {hidden}")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    manifest = run(args)
    print(f"{built(args.out, manifest, time.perf_counter() - start)}; next: ortlora-train --artifacts {args.out}")
    return 0


def built(out: Path, manifest, seconds: float) -> str:
    return (f"built {out} in {seconds:.1f} s: {manifest.counts['trainable']:,} trainable of "
            f"{manifest.counts['total']:,} parameters")


def run(args: argparse.Namespace):
    """Check every option of ``args`` (ortlora-build's, parsed), then build; returns the manifest. ortlora-build,
    ``ortlora.build()`` and ortlora-train --model all build through here."""
    if args.model == TINY_MODEL and not Path(args.model).exists():
        args.model, args.tiny = None, True
    if missing := missing_build_packages():
        raise OrtloraError(f"building artifacts needs torch, transformers and onnx, and {', '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_BUILD}")
    from ortlora.build.builder import BuildOptions, build, check_out_dir
    from ortlora.build.lora import parse_targets
    from ortlora.build.quantize import BLOCK_SIZE

    targets = tuple(parse_targets(args.targets))
    check_numbers(args)
    from ortlora.lora_config import parse_pattern

    patterns = {}
    for option, value, integer in (("--rank-pattern", args.rank_pattern, True), ("--alpha-pattern", args.alpha_pattern, False)):
        if value is not None:
            patterns[option] = parse_pattern(value, option, integer)  # the build checks them again, with the model
            if not patterns[option]:
                raise OrtloraError(f"{option} {value!r} names no module: pass NAME=VALUE pairs, or leave it out")
    for key, alpha in patterns.get("--alpha-pattern", {}).items():
        if alpha > FLOAT32_MAX:
            raise OrtloraError(f"--alpha-pattern {key}={float(alpha):g} is beyond float32's range (scaling = alpha / rank is a "
                               f"float32 in the graphs); pass at most {FLOAT32_MAX:.4g}")
    if args.model is not None:
        from ortlora import hub

        if not Path(args.model).exists() and hub.is_hub_id(args.model):
            check_out_dir(args.out, args.force)  # before a download
        args.model = hub.resolve(args.model, args.revision, "--model")  # a directory, perhaps huggingface_hub's
    elif args.revision is not None:
        raise OrtloraError(f"--revision {args.revision} goes with --model and a Hugging Face Hub id, not --tiny: "
                           "leave --revision out")
    check_against_model(args, model_config(args), patterns.get("--rank-pattern", {}))
    check_out_dir(args.out, args.force, args.model)  # fail before any slow work
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    remove_stale_temp(TINY_TEMP)  # the tiny models of builds that were killed
    with tempfile.TemporaryDirectory(prefix=temp_prefix(TINY_TEMP)) as tmp:
        model_dir = args.model
        if args.tiny:
            from ortlora.build.tiny import create_tiny_model

            model_dir = create_tiny_model(Path(tmp) / "tiny-qwen2", seed=args.seed)
            print(f"created the built-in tiny Qwen2 model (seed {args.seed})")
        options = BuildOptions(
            model_dir=model_dir,
            out_dir=args.out,
            rank=args.rank,
            alpha=args.alpha,
            dropout=args.dropout,
            targets=targets,
            label_smoothing=args.label_smoothing,
            seed=args.seed,
            force=args.force,
            # The tiny base model lives with its artifacts: PEFT and merges need a base directory.
            bundle_base=args.tiny,
            base_precision=args.base_precision,
            block_size=BLOCK_SIZE if args.block_size is None else args.block_size,
            recompute=args.recompute,
            init=args.init,
            rslora=args.rslora,
            layers=args.layers,
            rank_pattern=args.rank_pattern,
            alpha_pattern=args.alpha_pattern,
            dora=args.dora,
        )
        return build(options)
