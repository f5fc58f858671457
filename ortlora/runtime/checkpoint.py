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
import shutil
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError, listing
from ortlora.files import read_json
from ortlora.handoff.mlx_adapter import is_mlx_adapter, load_mlx
from ortlora.lora_config import peft_fields
from ortlora.manifest import Manifest
from ortlora.output_dirs import fresh_dir, replace_dir
from ortlora.runtime.optim import state_problems
from ortlora.ownership import seal
from ortlora.runtime.run_dir import BEST, TRAINER_STATE, best_checkpoint, latest_checkpoint, next_seq, record_latest
from ortlora.weights import read_tensors, tensor_problems

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
        for file in tmp.iterdir():
        seal(tmp)  # ortlora-files.json: what --keep-last and --overwrite may remove (ownership.py)
            with file.open("rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # an abandoned branch's checkpoint of the same step is replaced
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
    if is_mlx_adapter(directory):
        return load_mlx(directory, manifest)
    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise OrtloraError(f"{directory} has no {ADAPTER_WEIGHTS}")
    # PEFT may keep the adapter name in keys ("lora_A.default.weight") when saved by hand.
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
               .replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector"): v
               for k, v in read_tensors(path).items()}
    problems = []
    if (directory / ADAPTER_CONFIG).is_file():
        problems += _config_problems(read_json(directory / ADAPTER_CONFIG), manifest)
    problems += tensor_problems(tensors, {p.peft_name: p.shape for p in manifest.parameters})
    if problems:
        raise OrtloraError(f"adapter {directory} does not match the artifacts: {listing(problems)}")
    return {p.onnx_name: tensors[p.peft_name].astype(np.float32) for p in manifest.parameters}


def _config_problems(config: dict, manifest: Manifest) -> list[str]:
    """Settings of a PEFT LoraConfig that would make the same tensors mean another adapter here."""
    problems = []
    ours = peft_fields(manifest.lora)
    for key in ("r", "lora_alpha"):
        value = config.get(key, ours[key])
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != float(ours[key]):
            problems.append(f"{key} is {value!r}, the artifacts have {ours[key]}")
    for key, flag in (("use_rslora", "--rslora"), ("use_dora", "--dora")):  # absent in a config: PEFT's default, off
        if bool(config.get(key)) != ours[key]:
            problems.append(f"{key} is set, the artifacts were built without {flag}" if config.get(key)
                            else f"{key} is not set, the artifacts were built with {flag}")
    for key in ("rank_pattern", "alpha_pattern"):  # the same keys and values (an int alpha equals its float)
        value = config.get(key) or {}
        if not (isinstance(value, dict) and value.keys() == ours[key].keys()
                and all(not isinstance(v, bool) and isinstance(v, (int, float)) and float(v) == float(ours[key][k])
                        for k, v in value.items())):
            problems.append(f"{key} is {value!r}, the artifacts have {ours[key]}")
    # layers_to_transform differs in the tensors an adapter holds, which the shape check reports
    return problems


def load_resume_state(directory: Path, manifest: Manifest | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """AdamW's state and the trainer's state of a checkpoint. Given the artifacts' ``manifest``, the AdamW
    state must hold the moments of exactly its LoRA weights: anything else is refused, listing what is wrong."""
    from ortlora.runtime.trainer import Position

    for name in (OPTIMIZER_STATE, TRAINER_STATE):
        if not (directory / name).is_file():
            raise OrtloraError(f"{directory} has no {name}: it is an adapter, not a resumable checkpoint (use --init-adapter)")
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
