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


def transformers_greedy(base: Path, adapter: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """The tokens transformers generates greedily from ``prompt`` with ``adapter`` merged into ``base`` (float32,
    PEFT's merge_and_unload), up to the test models' eos (id 2)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                       adapter).merge_and_unload().eval()
    with torch.no_grad():
        tokens = merged.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 do_sample=False, max_new_tokens=new_tokens, eos_token_id=2,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


def assert_same_adapters(a: Path, b: Path) -> None:
    """Two checkpoints hold the same trained LoRA weights (B no longer zero), as a resumed run must."""
    from ortlora.weights import read_tensors

    first, second = (read_tensors(c / "adapter_model.safetensors") for c in (a, b))
    assert first.keys() == second.keys() and any(np.abs(v).max() > 0 for k, v in first.items() if "lora_B" in k)
    for name, value in first.items():
        np.testing.assert_allclose(second[name], value, rtol=1e-6, atol=1e-9, err_msg=name)
