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
import tempfile
import time
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError
from ortlora.manifest import Manifest
from ortlora.output_dirs import replace_dir
from ortlora.runtime.run_dir import latest_checkpoint, record_latest

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER_STATE = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"


def adapter_config(manifest: Manifest, base_model: str) -> dict:
    lora = manifest.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_modules": lora["targets"],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": lora["init"],
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
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
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.tmp-", dir=run_dir))
    try:
        by_onnx = {p.onnx_name: p.peft_name for p in manifest.parameters}
        header = {k: str(v) for k, v in {**metadata, "step": step, "artifact_id": manifest.artifact_id,
                                         "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "format": "pt"}.items()}
        save_file({by_onnx[n]: np.ascontiguousarray(w) for n, w in weights.items()}, str(tmp / ADAPTER_WEIGHTS), metadata=header)
        save_file({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()}, str(tmp / OPTIMIZER_STATE))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(manifest, base_model), indent=2) + "\n")
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        for file in tmp.iterdir():
            with file.open("rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # an abandoned branch's checkpoint of the same step is replaced
        _fsync_dir(run_dir)
        record_latest(run_dir, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the latest complete checkpoint in a run directory."""
    if (path / ADAPTER_WEIGHTS).is_file():
        return path
    if not path.is_dir():
        raise OrtloraError(f"{path} does not exist")
    latest = latest_checkpoint(path)
    if latest is None:
        raise OrtloraError(f"{path} holds no checkpoint (checkpoint-STEP/{ADAPTER_WEIGHTS})")
    return latest


def load_adapter(directory: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """LoRA weights of a PEFT adapter (ours or PyTorch's), by ONNX name, checked against the artifacts."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise OrtloraError(f"{directory} has no {ADAPTER_WEIGHTS}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise OrtloraError(f"{path} cannot be read: {e}") from None
    # PEFT may keep the adapter name in keys ("lora_A.default.weight") when saved by hand.
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in tensors.items()}
    problems = []
    config_path = directory / ADAPTER_CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        for key, ours in (("r", manifest.lora["rank"]), ("lora_alpha", manifest.lora["alpha"])):
            if key in config and float(config[key]) != float(ours):
                problems.append(f"{key} is {config[key]}, the artifacts have {ours}")
    weights = {}
    for p in manifest.parameters:
        value = tensors.pop(p.peft_name, None)
        if value is None:
            problems.append(f"missing {p.peft_name}")
        elif tuple(value.shape) != p.shape:
            problems.append(f"{p.peft_name} has shape {tuple(value.shape)}, expected {p.shape}")
        else:
            weights[p.onnx_name] = value.astype(np.float32)
    problems += [f"unexpected {k}" for k in sorted(tensors)]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise OrtloraError(f"adapter {directory} does not match the artifacts: {shown}")
    return weights


def load_resume_state(directory: Path) -> tuple[dict[str, np.ndarray], dict]:
    from safetensors.numpy import load_file

    for name in (OPTIMIZER_STATE, TRAINER_STATE):
        if not (directory / name).is_file():
            raise OrtloraError(f"{directory} has no {name}: it is an adapter, not a resumable checkpoint (use --init-adapter)")
    return load_file(str(directory / OPTIMIZER_STATE)), json.loads((directory / TRAINER_STATE).read_text())
