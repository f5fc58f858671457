"""PyTorch + PEFT, the reference implementation every ortlora number is checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ortlora.lora_config import peft_fields
from ortlora.manifest import Manifest


def peft_model(artifacts: Path, weights: dict[str, np.ndarray] | None = None, base: Path | None = None):
    """The artifacts' base model (or ``base``) with a PEFT LoRA adapter of the same configuration and weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    manifest = Manifest.load(artifacts)
    base = AutoModelForCausalLM.from_pretrained(base or artifacts / manifest.model["source"],
                                                attn_implementation="eager", dtype=torch.float32)
    # The artifacts' variant as PEFT names it (init, rsLoRA, layers, rank / alpha patterns, DoRA); no dropout.
    config = LoraConfig(**{**peft_fields(manifest.lora), "lora_dropout": 0.0})
    model = get_peft_model(base, config)
    model.eval()
    if weights is not None:
        set_peft_weights(model, manifest, weights)
    return model


def peft_key(p) -> str:
    """PEFT's module parameter name of a manifest parameter: it carries the adapter name
    (...q_proj.lora_A.default.weight, ...q_proj.lora_magnitude_vector.default.weight)."""
    if p.kind == "magnitude":
        return p.peft_name + ".default.weight"
    return p.peft_name.replace(f".lora_{p.kind}.weight", f".lora_{p.kind}.default.weight")


def set_peft_weights(model, manifest: Manifest, weights: dict[str, np.ndarray]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in manifest.parameters:
            # PEFT's module parameter names carry the adapter name: ...q_proj.lora_A.default.weight
            params[peft_key(p)].copy_(torch.from_numpy(weights[p.onnx_name]))


def loss_and_grads(model, manifest: Manifest, batch: dict[str, np.ndarray], label_smoothing: float = 0.0):
    model.zero_grad()
    logits = model(input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(batch["labels"]).reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)
    loss.backward()
    params = dict(model.named_parameters())
    grads = {}
    for p in manifest.parameters:
        grads[p.onnx_name] = params[peft_key(p)].grad.numpy().copy()
    return float(loss.detach()), grads


def random_weights(manifest: Manifest, seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    """Non-zero A and B, so that every gradient and every LoRA path is exercised."""
    rng = np.random.default_rng(seed)
    return {p.onnx_name: (scale * rng.standard_normal(p.shape)).astype(np.float32) for p in manifest.parameters}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-12))
