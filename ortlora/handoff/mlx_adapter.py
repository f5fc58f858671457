"""mlx-lm's LoRA adapters: ``ortlora-export --to mlx`` writes one; ``--init-adapter`` and ``--adapter`` read one.

mlx-lm 0.32 (mlx_lm/tuner/lora.py LoRALinear, tuner/dora.py DoRALinear, tuner/utils.py load_adapters) keeps, for
every adapted linear layer of the last ``num_layers`` decoder layers,

    model.layers.N.self_attn.q_proj.lora_a   in x r    (PEFT's A transposed)
    model.layers.N.self_attn.q_proj.lora_b   r x out   (PEFT's B transposed)
    model.layers.N.self_attn.q_proj.m        out       (DoRA's magnitude, fine_tune_type "dora")

and computes y = W x + b + scale * (x @ lora_a) @ lora_b, where adapter_config.json's lora_parameters.scale is
the multiplier itself: PEFT's alpha / r (or alpha / sqrt(r) with rsLoRA), not alpha. Its adapter_config.json
holds fine_tune_type ("lora" or "dora"), num_layers and lora_parameters {rank, scale, dropout, keys}, keys
naming modules inside a decoder layer ("self_attn.q_proj", "mlp.down_proj").

One rank and one scale serve every module: a module whose scaling differs from the first one's (an
alpha_pattern) has the ratio folded into its lora_b; different ranks (a rank_pattern) or adapted layers that
are not the last N are refused. Reading an mlx-lm adapter does the reverse.

Qwen2 and Qwen3 share this layout: mlx_lm/models/qwen3.py names its projections as qwen2.py does (self_attn.q_proj
.. mlp.down_proj under model.layers.N); its q_norm and k_norm are RMSNorms, which mlx-lm's LoRA never adapts, and
its q/k/v widths come from config.json's head_dim, so the tensors' shapes (the artifacts') are already mlx-lm's.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from ortlora.errors import REBUILD, OrtloraError, listing
from ortlora.files import read_json
from ortlora.lora_config import module_scaling
from ortlora.manifest import Manifest
from ortlora.weights import read_expected, write_safetensors

MLX_WEIGHTS = "adapters.safetensors"
MLX_CONFIG = "adapter_config.json"
KEYS = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
        "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
        "down_proj": "mlp.down_proj"}
LEAF = {"A": "lora_a", "B": "lora_b", "magnitude": "m"}
ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")  # mlx_lm/models/qwen2.py, qwen3.py


def is_mlx_adapter(path: Path) -> bool:
    """An mlx-lm adapter directory: adapters.safetensors and its adapter_config.json."""
    return (path / MLX_WEIGHTS).is_file() and (path / MLX_CONFIG).is_file()


def _layout(manifest: Manifest, layer_count: int) -> tuple[int, int, list[str]]:
    """(rank, num_layers, keys) of mlx-lm's config for the artifacts' adapter, or a one-line refusal."""
    if manifest.model.get("architecture") not in ARCHITECTURES:
        raise OrtloraError(f"--to mlx writes {' and '.join(ARCHITECTURES)} adapters only; these artifacts are of "
                           f"{manifest.model.get('architecture')}: use --to peft or merged")
    unknown = [t for t in manifest.lora["targets"] if t not in KEYS]
    if unknown:
        raise OrtloraError(f"mlx-lm's LoRA adapts decoder-layer linear layers; the artifacts also adapt {unknown[0]}")
    ranks = {p.shape[0] for p in manifest.parameters if p.kind == "A"}
    if len(ranks) != 1:
        raise OrtloraError(f"mlx-lm's adapter_config.json holds one rank for every module; the artifacts' adapter "
                           f"has ranks {sorted(ranks)} (a rank pattern)")
    layers = sorted({p.layer for p in manifest.parameters})
    if layers != list(range(layer_count - len(layers), layer_count)):
        raise OrtloraError(f"mlx-lm adapts the last N decoder layers (num_layers); the artifacts adapt layers "
                           f"{layers} of {layer_count}")
    return ranks.pop(), len(layers), [KEYS[t] for t in manifest.lora["targets"]]


def layer_count(artifacts: Path, manifest: Manifest) -> int:
    return int(read_json(Path(artifacts) / manifest.files["config"])["num_hidden_layers"])


def check_exportable(args: argparse.Namespace, manifest: Manifest) -> None:
    """Refuse before anything is written: an adapter mlx-lm's config cannot describe."""
    if args.with_base or args.gguf_type:
        raise OrtloraError("--with-base and --gguf-type go with --to gguf; mlx-lm loads the base model as it is")
    path = Path(args.artifacts) / manifest.files["config"]  # num_layers counts back from the model's last layer
    config = read_json(path, REBUILD)
    count = config.get("num_hidden_layers")
    if type(count) is not int or count <= 0:
        raise OrtloraError(f"{path}: num_hidden_layers is {'missing' if count is None else repr(count)}, not a "
                           f"positive integer; {REBUILD}")
    if manifest.model.get("architecture") == "Qwen3ForCausalLM" and config.get("attention_bias"):
        # mlx_lm/models/qwen3.py builds its projections with bias=False: its loader refuses this base's biases
        raise OrtloraError(f"{path}: attention_bias is true; mlx-lm's qwen3 has no attention biases and cannot load "
                           f"this base model: use --to peft or merged")
    _layout(manifest, count)


def export(args: argparse.Namespace, manifest: Manifest, weights: dict[str, np.ndarray], out: Path,
           max_shard: int) -> str:
    """ortlora-export --to mlx into the staging directory ``out``. Returns a summary."""
    base = args.base or manifest.base_model_dir(args.artifacts)
    return write_mlx(manifest, weights, out, layer_count(args.artifacts, manifest), str(Path(base).resolve()))


def write_peft_weights(manifest: Manifest, weights: dict[str, np.ndarray], path: Path) -> None:
    """adapter_model.safetensors of weights read from an mlx-lm adapter (--to peft)."""
    write_safetensors(path, {p.peft_name: ("F32", weights[p.onnx_name]) for p in manifest.parameters},
                      metadata={"format": "pt"})


def write_mlx(manifest: Manifest, weights: dict[str, np.ndarray], out: Path, layers: int, base: str) -> str:
    """Write adapters.safetensors + adapter_config.json into ``out`` as mlx-lm's trainer does. Returns a summary."""
    rank, num_layers, keys = _layout(manifest, layers)
    modules = list(dict.fromkeys(p.module_path for p in manifest.parameters))
    scale = module_scaling(manifest.lora, modules[0])
    tensors, folded = {}, set()
    for p in manifest.parameters:
        module = p.module_path
        array = weights[p.onnx_name].astype(np.float32)
        if p.kind == "B" and (factor := module_scaling(manifest.lora, module) / scale) != 1.0:
            array = (array.astype(np.float64) * factor).astype(np.float32)
            folded.add(module)
        tensors[f"{module}.{LEAF[p.kind]}"] = ("F32", np.ascontiguousarray(array.T if p.kind != "magnitude" else array))
    write_safetensors(out / MLX_WEIGHTS, tensors, metadata={"format": "mlx"})
    dora = bool(manifest.lora.get("dora"))
    config = {
        "model": base,
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": manifest.lora["dropout"], "keys": keys},
    }
    (out / MLX_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    note = f", scaling folded into lora_b of {len(folded)} modules" if folded else ""
    return f"mlx-lm {config['fine_tune_type']} adapter ({len(modules)} modules, rank {rank}, scale {scale:g}{note})"


def load_mlx(directory: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """LoRA weights of an mlx-lm adapter, by ONNX name (as load_adapter returns them), checked against the
    artifacts; every mismatch is named in one error."""
    config = read_json(directory / MLX_CONFIG)
    params = config.get("lora_parameters") if isinstance(config, dict) else None
    if not isinstance(params, dict):
        raise OrtloraError(f"{directory / MLX_CONFIG} has no lora_parameters object; it is not an mlx-lm adapter")
    problems = []
    kind = config.get("fine_tune_type", "lora")
    ours = "dora" if manifest.lora.get("dora") else "lora"
    if kind != ours:
        problems.append(f"fine_tune_type is {kind!r}, the artifacts train {ours!r}")
    scale = params.get("scale")
    if not _finite_number(scale):
        problems.append(f"lora_parameters.scale is {scale!r}, not a finite number (mlx-lm's multiplier, PEFT's "
                        "alpha / r)")
    problems += _config_layout_problems(config, params, manifest)
    expected, sources = {}, {}
    for p in manifest.parameters:
        name = f"{p.module_path}.{LEAF[p.kind]}"
        expected[name] = p.shape[::-1] if p.kind != "magnitude" else p.shape
        sources[p.onnx_name] = name
    # Names, shapes and dtypes (floating point only) from the header before any tensor is read; values finite.
    tensors, found = read_expected(directory / MLX_WEIGHTS, expected)
    problems += found
    if problems:
        raise OrtloraError(f"mlx-lm adapter {directory} does not match the artifacts: {listing(problems)}")
    weights = {}
    for p in manifest.parameters:
        array = tensors[sources[p.onnx_name]]
        array = array.T if p.kind != "magnitude" else array
        if p.kind == "B" and (factor := float(scale) / module_scaling(manifest.lora, p.module_path)) != 1.0:
            with np.errstate(over="ignore"):
                array = (array.astype(np.float64) * factor).astype(np.float32)
            if not np.isfinite(array).all():
                raise OrtloraError(f"mlx-lm adapter {directory}: lora_parameters.scale {scale!r} takes "
                                   f"{sources[p.onnx_name]} beyond float32's range")
        weights[p.onnx_name] = np.ascontiguousarray(array)
    return weights


def _finite_number(value) -> bool:
    """A number that is finite as a float (true is no number; an integer beyond any float is not finite)."""
    try:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        return False


def _config_layout_problems(config: dict, params: dict, manifest: Manifest) -> list[str]:
    """Where the adapter's own adapter_config.json disagrees with the tensors it must hold (the artifacts'): its
    rank, num_layers (the last N layers, -1 for all) and keys. A key left out (mlx-lm's defaults) is not checked:
    the tensors, checked by name and shape, say what the adapter is."""
    problems = []
    ranks = sorted({p.shape[0] for p in manifest.parameters if p.kind == "A"})
    rank = params.get("rank", ranks[0] if ranks else None)
    if type(rank) is not int or rank not in ranks:
        problems.append(f"lora_parameters.rank is {rank!r}, its tensors have rank {', '.join(map(str, ranks))}")
    layers = sorted({p.layer for p in manifest.parameters})
    # The base's decoder layers, from the frozen layout (an older build without one: every layer, unless listed).
    model = sorted({int(n.split(".")[2]) for n in manifest.frozen if n.startswith("model.layers.")})
    every = layers == model if model else "layers" not in manifest.lora
    count = config.get("num_layers", len(layers))
    if type(count) is not int or not (count == len(layers) or count == -1 and every):
        problems.append(f"num_layers is {count!r}, its tensors adapt {len(layers)} layers"
                        + (" (all of them: -1 says so too)" if every else ""))
    elif "num_layers" in config and model and layers != model[len(model) - len(layers):]:
        problems.append(f"num_layers {count} means the last {len(layers)} of the base's {len(model)} layers, its "
                        f"tensors adapt layers {layers}")
    keys = params.get("keys")
    ours = sorted({p.module_path.split(".", 3)[3] for p in manifest.parameters})  # "self_attn.q_proj"
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
                                 and sorted(set(keys)) == ours):
        problems.append(f"lora_parameters.keys is {keys!r}, its tensors adapt {', '.join(ours)}")
    return problems
