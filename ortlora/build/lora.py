"""LoRA injection into a transformers model, with PEFT's module and parameter names."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ortlora.errors import OrtloraError

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, with scaling = alpha / rank.

    lora_A is (rank, in) drawn from N(0, 1/rank), lora_B is (out, rank) zeros, so the adapted
    layer starts equal to the base layer (PEFT's ``init_lora_weights="gaussian"``).
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        self.scaling = alpha / rank
        nn.init.normal_(self.lora_A.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_B.weight)
        # (A, B) tensors that replace the parameters during ONNX export, where they are graph inputs.
        self.external: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.external or (self.lora_A.weight, self.lora_B.weight)
        return self.base_layer(x) + F.linear(F.linear(self.lora_dropout(x), a), b) * self.scaling


@contextlib.contextmanager
def external_lora_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Run ``model`` with its LoRA weights taken from ``weights`` (parameter name -> tensor)."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    try:
        for name, module in modules.items():
            module.external = (weights[f"{name}.lora_A.weight"], weights[f"{name}.lora_B.weight"])
        yield model
    finally:
        for module in modules.values():
            module.external = None


def parse_targets(spec: str) -> list[str]:
    """``"q_proj,v_proj"`` or ``"all-linear"`` -> ordered list of projection names."""
    if spec.strip() == "all-linear":
        return list(ALL_TARGETS)
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in targets if t not in ALL_TARGETS]
    if unknown or not targets:
        raise OrtloraError(
            f"unknown target module(s) {unknown or [spec]}; choose from {', '.join(ALL_TARGETS)} or all-linear"
        )
    return [t for t in ALL_TARGETS if t in targets]  # canonical order, no duplicates


def inject_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int) -> list[str]:
    """Replace every targeted nn.Linear by a LoRALinear; freeze the rest.

    Returns the names of the LoRA parameters, in module order (layer 0 q_proj A, B, ...).
    """
    if rank <= 0:
        raise OrtloraError(f"--rank must be a positive integer, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise OrtloraError(f"--dropout must be in [0, 1), got {dropout}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise OrtloraError(f"--alpha must be a positive number, got {alpha}")
    for param in model.parameters():
        param.requires_grad_(False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    setattr(module, child_name, LoRALinear(child, rank, alpha, dropout))
    finally:
        torch.random.set_rng_state(generator_state)
    names = [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    if not names:
        raise OrtloraError(f"no module named {', '.join(targets)} found in the model")
    return names
