"""Checkpoints: a PEFT adapter directory plus what it takes to resume, written atomically.

RUN/checkpoint-STEP/
    adapter_model.safetensors   LoRA weights under PEFT's saved names; metadata in the header
    adapter_config.json         PEFT's LoraConfig: PeftModel.from_pretrained(base, dir) loads it
    optimizer.safetensors       AdamW moments and step count
    trainer_state.json          step, epoch, position in the epoch, resolved settings

The directory is written under a temporary name and renamed into place, so a kill at any
moment leaves every earlier checkpoint intact and never a half-written one under a final name.
The run's record (run_dir.py) then names it as the run's latest checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError, listing
from ortlora.files import read_json
from ortlora.handoff.mlx_adapter import MLX_WEIGHTS, is_mlx_adapter, load_mlx
from ortlora.lora_config import LAYERS_PATTERN, peft_fields
from ortlora.manifest import Manifest
from ortlora.output_dirs import fresh_dir, replace_dir
from ortlora.ownership import seal
from ortlora.runtime.optim import state_problems
from ortlora.runtime.run_dir import (
    BEST,
    TRAINER,
    TRAINER_STATE,
    best_checkpoint,
    latest_checkpoint,
    next_seq,
    record_latest,
)
from ortlora.weights import header_problems, read_expected, read_tensors, stored_tensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.safetensors"


def adapter_config(manifest: Manifest, base_model: str) -> dict:
    fields = peft_fields(manifest.lora)  # r, alpha, targets and the variant: rsLoRA, layers, patterns, DoRA
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        **fields,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: Path,
    step: int,
    manifest: Manifest,
    base_model: str,
    weights: dict[str, np.ndarray],
    optimizer_state: dict[str, np.ndarray],
    trainer_state: dict,
    metadata: dict,
) -> Path:
    from safetensors.numpy import save_file

    final = run_dir / f"checkpoint-{step}"
    tmp = fresh_dir(run_dir, f".checkpoint-{step}.tmp-")
    seq = next_seq(run_dir)
    trainer_state = {**trainer_state, "seq": seq}  # the run's latest is the checkpoint of highest seq
    try:
        by_onnx = {p.onnx_name: p.peft_name for p in manifest.parameters}
        header = {k: str(v) for k, v in {**metadata, "step": step, "artifact_id": manifest.artifact_id,
                                         "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "format": "pt"}.items()}
        save_file({by_onnx[n]: np.ascontiguousarray(w) for n, w in weights.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=header)
        save_file({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()}, str(tmp / OPTIMIZER_STATE))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(manifest, base_model), indent=2) + "\n")
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        seal(tmp, TRAINER)  # ortlora-files.json: what --keep-last and --overwrite may remove (ownership.py)
        for file in tmp.iterdir():
            with file.open("rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        replace_dir(tmp, final, TRAINER)  # an abandoned branch's checkpoint of the same step is replaced
        _fsync_dir(run_dir)
        record_latest(run_dir, final, seq)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def find_checkpoint(path: Path) -> Path:
    """A checkpoint (or any PEFT or mlx-lm adapter) directory itself, the latest complete checkpoint in a run
    directory, or for RUN/best the run's checkpoint of lowest eval loss."""
    if (path / ADAPTER_WEIGHTS).is_file() or is_mlx_adapter(path):
        return path
    if path.name == BEST and not path.exists() and path.parent.is_dir():
        return best_checkpoint(path.parent)
    if not path.is_dir():
        raise OrtloraError(f"{path} does not exist")
    latest = latest_checkpoint(path)
    if latest is None:
        raise OrtloraError(f"{path} holds no checkpoint (checkpoint-STEP/{ADAPTER_WEIGHTS}); a run stopped before "
                           "its first one is started again with the same --out, not resumed")
    return latest


def load_adapter(directory: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """LoRA weights of a PEFT adapter (ours or PyTorch's) or an mlx-lm adapter (converted), by ONNX name, checked
    against the artifacts."""
    if is_mlx_adapter(directory) and (directory / ADAPTER_WEIGHTS).is_file():
        raise OrtloraError(f"{directory} holds both a PEFT adapter ({ADAPTER_WEIGHTS}) and an mlx-lm adapter "
                           f"({MLX_WEIGHTS}), which would be read by one adapter_config.json; give each its own "
                           "directory")
    if is_mlx_adapter(directory):
        return load_mlx(directory, manifest)
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise OrtloraError(f"{directory} has no {ADAPTER_WEIGHTS}")
    config = read_json(directory / ADAPTER_CONFIG) if (directory / ADAPTER_CONFIG).is_file() else None
    problems = [] if config is None else _config_problems(config, manifest)
    # Names, shapes and dtypes (floating point only) come from the header before any tensor is read; then the
    # values must be finite. Tensors of other modules name them; tensors that match need a config that says so.
    tensors, found = read_expected(path, {p.peft_name: p.shape for p in manifest.parameters}, _without_adapter_name)
    problems += found or ([] if config is None else _module_problems(config, manifest))
    if problems:
        raise OrtloraError(f"adapter {directory} does not match the artifacts: {listing(problems)}")
    return {p.onnx_name: tensors[p.peft_name] for p in manifest.parameters}


def _without_adapter_name(key: str) -> str:
    """PEFT may keep the adapter name in keys ("lora_A.default.weight") when saved by hand."""
    return (key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
            .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"))


def check_peft_config(config: dict, manifest: Manifest, path: Path) -> None:
    """Refuse to copy a user's adapter_config.json (``ortlora-export --to peft``) that PEFT would read as another
    adapter than the artifacts': every check of ``_config_problems``, and the keys PEFT would otherwise fill
    with its own defaults (r 8, lora_alpha 8) must be there."""
    problems = [f"{key} is missing" for key in ("peft_type", "r", "lora_alpha", "target_modules")
                if config.get(key) is None]  # (PEFT reads a null target_modules as its own default for Qwen2)
    problems += _config_problems(config, manifest) + _module_problems(config, manifest)
    if problems:
        raise OrtloraError(f"{path} does not describe the artifacts' adapter, so PEFT would load it as another: "
                           f"{listing(problems)}; correct it, or move it away and ortlora-export writes the "
                           f"artifacts' own")


# init_lora_weights values PEFT applies only to new weights; others (pissa, olora, loftq, corda) rewrite the base
# model's weights when PEFT loads the adapter.
LOADABLE_INITS = (True, False, "gaussian", None)
# LoraConfig keys that, set, make PEFT add to plain LoRA weights: whole modules, biases, parameters, embedding rows,
# replicated layers, activated LoRA, QA-LoRA, Arrow routing.
EXTRAS = ("modules_to_save", "lora_bias", "target_parameters", "trainable_token_indices", "layer_replication",
          "alora_invocation_tokens", "use_qalora", "arrow_config")


def _config_problems(config: dict, manifest: Manifest) -> list[str]:
    """Settings of a PEFT LoraConfig that would make the same tensors mean another adapter here: rank, alpha,
    the variant, and anything beside LoRA weights (modules_to_save, bias); ``_module_problems`` checks which
    modules it adapts. A key left out is taken as the artifacts' own (r, lora_alpha) or PEFT's default."""
    problems = []
    ours = peft_fields(manifest.lora)
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config['peft_type']!r}, not 'LORA'")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type is {config['task_type']!r}, the artifacts are a causal LM (CAUSAL_LM)")
    value = config.get("r", ours["r"])
    if type(value) is not int or value != ours["r"]:
        problems.append(f"r is {value!r}, the artifacts have {ours['r']}")
    value = config.get("lora_alpha", ours["lora_alpha"])
    if not _same_number(value, ours["lora_alpha"]):
        problems.append(f"lora_alpha is {value!r}, the artifacts have {ours['lora_alpha']}")
    for key, flag in (("use_rslora", "--rslora"), ("use_dora", "--dora")):  # absent in a config: PEFT's default, off
        if config.get(key) not in (None, True, False):
            problems.append(f"{key} is {config[key]!r}, not true or false")
        elif bool(config.get(key)) != ours[key]:
            problems.append(f"{key} is set, the artifacts were built without {flag}" if config.get(key)
                            else f"{key} is not set, the artifacts were built with {flag}")
    for key in ("rank_pattern", "alpha_pattern"):  # the same keys and values (an int alpha equals its float)
        value = config.get(key) or {}
        if not (isinstance(value, dict) and value.keys() == ours[key].keys()
                and all(_same_number(v, ours[key][k]) for k, v in value.items())):
            problems.append(f"{key} is {value!r}, the artifacts have {ours[key]}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        problems.append(f"lora_dropout is {dropout!r}, not a probability (PEFT refuses to load it)")
    if config.get("init_lora_weights") not in LOADABLE_INITS:
        problems.append(f"init_lora_weights is {config['init_lora_weights']!r}, which PEFT applies to the base "
                        "weights when it loads the adapter; the artifacts' adapter needs true")
    for key in EXTRAS:
        if config.get(key):
            problems.append(f"{key} is {config[key]!r}, which adds to plain LoRA weights what the artifacts do not "
                            "train; set it to null")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}: the artifacts train no biases; set it to 'none'")
    return problems


def _same_number(value, ours: float) -> bool:
    """Whether a config's ``value`` is the number ``ours`` (an int alpha equals its float; true is no number)."""
    try:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and float(value) == float(ours)
    except OverflowError:  # an integer beyond any float
        return False


def _module_problems(config: dict, manifest: Manifest) -> list[str]:
    """Whether target_modules, exclude_modules and layers_to_transform select exactly the artifacts' adapted
    modules, matched as PEFT matches them (a list: a module's name or its last parts; a string: a regular
    expression matching the whole name; "all-linear": every linear layer but the output layer)."""
    problems = []
    adapted = {p.module_path for p in manifest.parameters}
    layers = sorted({p.layer for p in manifest.parameters})
    given = config.get("layers_to_transform")
    given = [given] if type(given) is int else given
    valid = given is None or isinstance(given, list) and all(type(i) is int for i in given)
    if not valid or (None if given is None else sorted(set(given))) not in ([layers] if "layers" in manifest.lora
                                                                             else [None, layers]):  # every layer
        problems.append(f"layers_to_transform is {config.get('layers_to_transform')!r}, the artifacts adapt "
                        + (f"layers {layers}" if "layers" in manifest.lora else "every layer (null)"))
    if given is not None and config.get("layers_pattern") not in (None, LAYERS_PATTERN, [LAYERS_PATTERN]):
        problems.append(f"layers_pattern is {config['layers_pattern']!r}, Qwen2's decoder layers are {LAYERS_PATTERN!r}")
    # Every linear layer of the adapted layers, the output layer and the embedding: what a target could name.
    parents = {m: "self_attn" for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
    parents |= {m: "mlp" for m in ("gate_proj", "up_proj", "down_proj")}
    candidates = [f"model.layers.{i}.{parent}.{m}" for i in layers for m, parent in parents.items()]
    candidates += ["lm_head", "model.embed_tokens"]
    for key in ("target_modules", "exclude_modules"):
        spec = config.get(key)
        if spec is None or (key == "exclude_modules" and not spec):
            continue
        if not (isinstance(spec, str) or isinstance(spec, list) and all(isinstance(k, str) for k in spec)):
            problems.append(f"{key} is {spec!r}, not a list of module names or a regular expression")
            continue
        try:
            matched = {name for name in candidates if _peft_matches(spec, name)}
        except re.error as e:
            problems.append(f"{key} {spec!r} is not a valid regular expression ({e})")
            continue
        short = lambda names: ", ".join(sorted({n.split(".")[-1] for n in names}))  # noqa: E731
        if key == "exclude_modules" and matched & adapted:
            problems.append(f"exclude_modules {spec!r} excludes {short(matched & adapted)}, which the artifacts adapt")
        elif key == "target_modules" and matched != adapted:
            extra, missing = matched - adapted, adapted - matched
            problems.append(f"target_modules {spec!r} "
                            + (f"adapts {short(extra)}, which the artifacts do not adapt" if extra else "")
                            + ("; it " if extra and missing else "")
                            + (f"leaves out {short(missing)}, which the artifacts adapt" if missing else "")
                            + f" (the artifacts adapt {', '.join(manifest.lora['targets'])})")
    return problems


def _peft_matches(spec: str | list[str], name: str) -> bool:
    """PEFT's check_target_module_exists for a Qwen2 module name: a string is a regular expression for the whole
    name ("all-linear": every linear layer but lm_head), a list holds names or their last dotted parts."""
    if spec == "all-linear":
        return name.startswith("model.layers.")
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith(f".{key}") for key in spec)


def load_resume_state(directory: Path, manifest: Manifest | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """AdamW's state and the trainer's state of a checkpoint. Given the artifacts' ``manifest``, the AdamW
    state must hold the moments of exactly its LoRA weights: anything else is refused, listing what is wrong."""
    from ortlora.runtime.trainer import Position

    for name in (OPTIMIZER_STATE, TRAINER_STATE):
        if not (directory / name).is_file():
            raise OrtloraError(f"{directory} has no {name}: it is an adapter, not a resumable checkpoint (use --init-adapter)")
    if manifest is not None:  # names, shapes and dtypes from the header first: nothing unexpected is read
        expected = {"step": (1,)} | {f"{kind}.{p.onnx_name}": p.shape for kind in ("exp_avg", "exp_avg_sq")
                                     for p in manifest.parameters}
        problems = header_problems(stored_tensors([directory / OPTIMIZER_STATE]), expected, integers=("step",))
        if problems:
            raise OrtloraError(f"{directory / OPTIMIZER_STATE} does not match the artifacts: {listing(problems)}")
    optimizer_state = read_tensors(directory / OPTIMIZER_STATE)
    if manifest is not None:
        problems = state_problems(optimizer_state, {p.onnx_name: p.shape for p in manifest.parameters})
        if problems:
            raise OrtloraError(f"{directory / OPTIMIZER_STATE} does not match the artifacts: {listing(problems)}")
    state = read_json(directory / TRAINER_STATE)
    position = state.get("position")
    keys = [f.name for f in fields(Position)]
    if not (isinstance(position, dict) and sorted(position) == sorted(keys)
            and all(type(v) is int and v >= 0 for v in position.values())):
        raise OrtloraError(f"{directory / TRAINER_STATE} has no valid position (an object of {', '.join(keys)}: "
                           "counts from 0)")
    return optimizer_state, state
