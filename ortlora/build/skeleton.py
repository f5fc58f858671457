"""The model without its weights: what the graphs are traced from.

The graphs do not depend on the values of the frozen weights, so the build never loads them into
torch. The model is made on PyTorch's meta device from config.json alone (no memory, no
initialisation), LoRA is injected with real, seeded A and B weights, and every frozen parameter
is replaced by a placeholder: an uninitialised tensor of the parameter's shape. Large ones are fresh
pages of the operating system that nothing writes, so they take no memory even when the trace
reads them (a page never written reads as the shared zero page); the values are never looked at,
since no graph depends on them. Each export passes the placeholders as graph inputs named after the checkpoint's tensors
(``model.layers.0.self_attn.q_proj.weight``), so the graphs read the frozen weights by name, and
frozen_weights.py streams the values from the checkpoint into one file afterwards.

Tracing still runs the forward pass on these shapes (an example batch of a few tokens). Measured on the
7B shape, the loss graph's export: 11.5 s at 0.47 GB peak; with zero-stride placeholders (one float
each, but an operator that needs contiguous data copies them) 16.6 s at 2.6 GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ortlora.build.lora import inject_lora
from ortlora.errors import OrtloraError


@dataclass
class Skeleton:
    model: nn.Module  # the causal LM with LoRA injected; its frozen weights are the placeholders below
    lora: dict[str, torch.Tensor]  # the initial LoRA weights by ONNX name (PEFT's, without its prefix)
    frozen: dict[str, torch.Tensor]  # checkpoint tensor name -> placeholder, in module order (tied ones once)

    @property
    def frozen_count(self) -> int:
        return sum(placeholder.numel() for placeholder in self.frozen.values())


def load_skeleton(model_dir: Path, targets: list[str] = (), rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                  seed: int = 0, **variant) -> Skeleton:
    """The model of ``model_dir`` (config.json only) with LoRA injected into ``targets`` (none: the plain model)
    and placeholders for the frozen weights. ``variant``: lora.inject_lora's init, rslora, layers, rank_pattern,
    alpha_pattern, dora."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    # Rotary frequencies are a buffer computed from the config, not loaded: make them for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    meta = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    if meta:
        raise OrtloraError(f"the model has buffers ortlora cannot compute without loading it: {meta[:3]}")
    model.eval()
    lora_names = inject_lora(model, list(targets), rank, alpha, dropout, seed, **variant) if targets else []
    lora = {name: param.detach() for name, param in model.named_parameters() if name in lora_names}
    return Skeleton(model, {name: lora[name] for name in lora_names}, _replace_frozen(model, set(lora_names)))


def checkpoint_name(parameter: str) -> str:
    """The checkpoint's name of a parameter of the LoRA-injected model (PEFT's ``base_layer`` is ours)."""
    return parameter.replace(".base_layer.", ".")


def _replace_frozen(model: nn.Module, lora: set[str]) -> dict[str, torch.Tensor]:
    """Turn every meta parameter but the LoRA ones into a plain attribute holding a placeholder."""
    placeholders: dict[int, torch.Tensor] = {}  # by id of the parameter: a tied one is shared
    frozen: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            full = f"{module_name}.{name}" if module_name else name
            if param is None or full in lora:
                continue
            if id(param) not in placeholders:
                placeholders[id(param)] = torch.empty(param.shape, dtype=torch.float32)
                frozen[checkpoint_name(full)] = placeholders[id(param)]
            del module._parameters[name]
            setattr(module, name, placeholders[id(param)])
    return frozen
