"""LoRA injection into a transformers model, with PEFT's module and parameter names.

The variants are PEFT's, and their settings live in the manifest's ``lora`` object (ortlora/lora_config.py):
A's initialisation (``gaussian``, or ``kaiming`` as PEFT's default), rsLoRA's scaling, a subset of the
decoder layers, a rank and alpha per module (PEFT's rank_pattern / alpha_pattern), and DoRA.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ortlora.errors import OrtloraError
from ortlora.lora_config import INITS, module_alpha, module_rank, scaling, unmatched_keys

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude: PEFT saves it as ...q_proj.lora_magnitude_vector


def detached_row_norm(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of ``weight``, with no gradient (PEFT's DoRA detaches it, DoRA paper 4.3).

    The TorchScript exporter drops ``detach()``, and ONNX has no stop-gradient operator, so the norm is
    spelled exp(log(sum of squares) / 2) as Pow(e, ...): ONNX Runtime's gradient builder never differentiates
    Pow's exponent (its STOP_GRADIENT_EDGES, "Pow": {1}), so no gradient reaches A or B through the norm.
    It is the same norm to about 1e-7 relative; tests/test_lora_variants.py checks the gradients against PEFT.
    """
    squares = (weight * weight).sum(dim=1)
    return torch.pow(torch.tensor(math.e, dtype=weight.dtype), 0.5 * torch.log(squares)).detach()


class LoRALinear(nn.Module):
    """y = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling, with scaling = alpha / rank (rsLoRA: alpha / sqrt(rank)).

    lora_A is (rank, in), drawn from N(0, 1/rank) (PEFT's ``init_lora_weights="gaussian"``) or kaiming-uniform
    with a = sqrt(5), nn.Linear's own (PEFT's default, ``init_lora_weights=True``); lora_B is (out, rank) zeros,
    so the adapted layer starts equal to the base layer.

    DoRA (``dora``): a magnitude m (out,), initialised to the row norms of W, and
        y = base_layer(x) + (m / n - 1) * (W dropout(x)) + (m / n) * lora_B(lora_A(dropout(x))) * scaling
    with n = ||W + scaling * B @ A|| per row, detached: (m / n) (W x + scaling B A x) + bias without dropout.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float, init: str = "gaussian",
                 rslora: bool = False, dora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        self.scaling = scaling(alpha, rank, rslora)
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_B.weight)
        # DoRA's magnitude; its initial value, ||W|| per row, is computed from the checkpoint by the build.
        self.lora_magnitude_vector = nn.Parameter(torch.ones(base_layer.out_features)) if dora else None
        # (A, B[, m]) tensors that replace the parameters during ONNX export, where they are graph inputs.
        self.external: tuple[torch.Tensor, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, *m = self.external or (self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector)
        x_lora = self.lora_dropout(x)
        lora = F.linear(F.linear(x_lora, a), b) * self.scaling
        result = self.base_layer(x)
        if self.lora_magnitude_vector is None:
            return result + lora
        # Read W through its transpose only, as every other product does, so the build keeps storing it
        # transposed (frozen_weights.plan).
        weight_t = self.base_layer.weight.t()
        scale = m[0] / detached_row_norm((weight_t + (a.t() @ b.t()) * self.scaling).t())
        if isinstance(self.lora_dropout, nn.Identity) or not self.lora_dropout.training:
            bias = self.base_layer.bias
            base = result - bias if bias is not None else result
        else:
            base = x_lora @ weight_t
        return result + (scale - 1) * base + scale * lora


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def parameter_names(name: str, module: LoRALinear) -> list[str]:
    """The names of one module's LoRA parameters, in the order the graphs take them: A, B[, magnitude]."""
    names = [f"{name}.lora_A.weight", f"{name}.lora_B.weight"]
    return names + ([f"{name}.{MAGNITUDE}"] if module.lora_magnitude_vector is not None else [])


@contextlib.contextmanager
def external_lora_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Run ``model`` with its LoRA weights taken from ``weights`` (parameter name -> tensor)."""
    modules = lora_modules(model)
    try:
        for name, module in modules.items():
            module.external = tuple(weights[n] for n in parameter_names(name, module))
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


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else None


def inject_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, seed: int,
                init: str = "gaussian", rslora: bool = False, layers: list[int] | None = None,
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None, dora: bool = False) -> list[str]:
    """Replace every targeted nn.Linear (in ``layers`` only, when given) by a LoRALinear; freeze the rest.
    A module's rank and alpha follow ``rank_pattern`` / ``alpha_pattern`` as PEFT's do (lora_config.py).

    Returns the names of the LoRA parameters, in module order (layer 0 q_proj A, B[, magnitude], ...).
    """
    if rank <= 0:
        raise OrtloraError(f"--rank must be a positive integer, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise OrtloraError(f"--dropout must be in [0, 1), got {dropout}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise OrtloraError(f"--alpha must be a positive number, got {alpha}")
    if init not in INITS:
        raise OrtloraError(f"--init must be one of {', '.join(INITS)}, got {init}")
    settings = {"rank": rank, "alpha": alpha, "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}}
    for param in model.parameters():
        param.requires_grad_(False)
    chosen = [(f"{name}.{child_name}" if name else child_name, module, child_name, child)
              for name, module in model.named_modules() for child_name, child in module.named_children()
              if child_name in targets and isinstance(child, nn.Linear)]
    if layers is not None:
        chosen = [c for c in chosen if _layer_index(c[0]) in set(layers)]
    problems = unmatched_keys(settings, [c[0] for c in chosen])
    if problems:
        raise OrtloraError(f"{'; '.join(problems)} (adapted: {', '.join(targets)})")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for full, module, child_name, child in chosen:
            setattr(module, child_name, LoRALinear(child, module_rank(settings, full), module_alpha(settings, full),
                                                   dropout, init, rslora, dora))
    finally:
        torch.random.set_rng_state(generator_state)
    names = [n for name, m in lora_modules(model).items() for n in parameter_names(name, m)]
    if not names:
        raise OrtloraError(f"no module named {', '.join(targets)} found in the model")
    return names
