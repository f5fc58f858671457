"""Shared by the llama.cpp and mlx-lm hand-off tests: adapters of a chosen variant, and the reference logits of the
merged Hugging Face model (transformers, float32)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ortlora.handoff import cli as export_cli
from ortlora.manifest import Manifest
from ortlora.runtime.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config
from ortlora.weights import read_tensors, write_safetensors

# Token ids of the tiny vocabulary (512 rows): ordinary tokens and <|im_start|> (1)
IDS = [1, 72, 305, 44, 19, 410, 88, 131, 7, 256, 33, 499]


def export(artifacts: Path, adapter: Path, to: str, out: Path, *args: str) -> Path:
    assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(adapter), "--to", to, "--out", str(out),
                            *args]) == 0
    return out


def random_adapter(artifacts: Path, out: Path, seed: int) -> Path:
    """A PEFT adapter directory of the artifacts' variant with B far from zero (and DoRA's magnitudes moved about 10%
    from the base rows' norms), so every term of the variant shows in the logits."""
    manifest = Manifest.load(artifacts)
    initial = read_tensors(artifacts / manifest.files["initial_lora"])
    rng = np.random.default_rng(seed)
    tensors = {}
    for p in manifest.parameters:
        if p.kind == "magnitude":
            value = initial[p.onnx_name] * (1 + 0.1 * rng.standard_normal(p.shape))
        else:
            value = 0.2 * rng.standard_normal(p.shape)
        tensors[p.peft_name] = ("F32", value.astype(np.float32))
    out.mkdir(parents=True)
    write_safetensors(out / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(manifest, "")))
    return out


def merged_logits(merged_dir: Path, ids: list[int] = IDS) -> np.ndarray:
    """Logits [len(ids), vocab] of the merged Hugging Face model, float32 (transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def greedy(merged_dir: Path, ids: list[int], count: int) -> list[int]:
    """``count`` greedy tokens after ``ids`` from the merged Hugging Face model (transformers' generate)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=count, min_new_tokens=count, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()
