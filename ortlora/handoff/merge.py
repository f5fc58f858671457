"""Merge a LoRA adapter into its base model, as PEFT's ``merge_and_unload`` does, without torch.

    W' = W + (B @ A) * scaling        (W: out x in, B: out x r, A: r x in, scaling = alpha / r, the module's own
                                       with rsLoRA or a rank / alpha pattern: lora_config.module_scaling)
    DoRA: W' = m / ||W + (B @ A) * scaling||_row * (W + (B @ A) * scaling)   (m: the magnitude, one per row)

The result is an ordinary Hugging Face model directory: safetensors in the base model's dtype
(bfloat16 included), sharded when large, with the config and tokenizer beside them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError
from ortlora.files import read_json
from ortlora.lora_config import module_scaling
from ortlora.manifest import Manifest
from ortlora.weights import (
    from_float32,
    read_safetensors,
    to_float32,
    weight_files,
    weights_sha256,
    write_safetensors,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_FILES = ("config.json", "generation_config.json")


def base_model_dir(artifacts: Path, manifest: Manifest, given: Path | None = None) -> Path:
    """The base model the artifacts were built from (or ``given``), checked by its weights' hash."""
    base = given or manifest.base_model_dir(artifacts)
    if not base.is_dir() or not weight_files(base):
        hub_id = manifest.model.get("hub_id")  # built from the Hub: the id finds it again (at the recorded commit)
        hint = f" (--base {hub_id} reads it from the Hugging Face Hub or its cache)" if hub_id and not given else ""
        raise OrtloraError(f"base model {base} is missing (no *.safetensors there); pass --base with the model "
                           f"the artifacts were built from{hint}")
    if weights_sha256(base) != manifest.model["weights_sha256"]:
        raise OrtloraError(f"base model {base} is not the one the artifacts were built from (its weights differ); "
                           f"pass --base with that model")
    return base


def lora_pairs(manifest: Manifest, weights: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{"A": ..., "B": ...[, "magnitude": ...]} for every adapted projection, by the base model's weight name."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for p in manifest.parameters:
        pairs.setdefault(p.module_path + ".weight", {})[p.kind] = weights[p.onnx_name].astype(np.float32)
    return pairs


def merged_weight(weight: np.ndarray, adapter: dict[str, np.ndarray], scaling: float) -> np.ndarray:
    """W + B @ A * scaling, and with DoRA's magnitude m that times m / (its row norms), as PEFT's merge does."""
    merged = weight + (adapter["B"] @ adapter["A"]) * np.float32(scaling)
    if "magnitude" in adapter:
        norms = np.linalg.norm(merged, axis=1)
        merged = (adapter["magnitude"] / norms)[:, None] * merged
    return merged


def write_merged(base: Path, manifest: Manifest, weights: dict[str, np.ndarray], out: Path,
                 tokenizer_dir: Path, max_shard_bytes: int) -> list[str]:
    """Write the merged model directory into ``out`` (which must exist and be empty). Returns the weight files."""
    pairs = lora_pairs(manifest, weights)
    shard: dict[str, tuple[str, np.ndarray]] = {}
    written: list[tuple[Path, list[str], int]] = []  # shards are written as they fill, named at the end

    def flush() -> None:
        path = out / f".shard-{len(written)}.tmp"
        write_safetensors(path, shard, metadata={"format": "pt"})
        written.append((path, list(shard), sum(a.nbytes for _, a in shard.values())))
        shard.clear()

    for file in weight_files(base):
        for name, dtype, array in read_safetensors(file):
            if name in pairs:  # one delta at a time: B @ A is as large as the weight it goes into
                if dtype not in ("F32", "F16", "BF16"):
                    raise OrtloraError(f"{file}: {name} is {dtype}; only float weights can be merged")
                scaling = module_scaling(manifest.lora, name.removesuffix(".weight"))
                array = from_float32(dtype, merged_weight(to_float32(dtype, array), pairs.pop(name), scaling))
            if shard and sum(a.nbytes for _, a in shard.values()) + array.nbytes > max_shard_bytes:
                flush()
            shard[name] = (dtype, array)
    flush()
    if pairs:
        raise OrtloraError(f"base model {base} has no weight {sorted(pairs)[0]} to merge into")

    count = len(written)
    names = [SINGLE_FILE] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for name, (path, _, _) in zip(names, written):
        path.rename(out / name)
    if count > 1:
        index = {"metadata": {"total_size": sum(size for _, _, size in written)},
                 "weight_map": {tensor: name for name, (_, tensors, _) in zip(names, written) for tensor in tensors}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    for name in MODEL_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    _rope_theta_at_top(out / "config.json")
    for name in manifest.files["tokenizer"]:
        shutil.copy2(tokenizer_dir / name, out / name)
    return names


def _rope_theta_at_top(path: Path) -> None:
    """transformers 5 writes rope_theta inside rope_parameters only; mlx-lm's and llama.cpp's converters (and
    transformers 4) read it at the top level: the merged model's config.json carries it in both places."""
    if not path.is_file():
        return
    config = read_json(path)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        path.write_text(json.dumps(config, indent=2) + "\n")
