"""The LoRA variant of a build, torch-free: initialisation, rsLoRA, layers, per-module rank and alpha, DoRA.

The manifest's ``lora`` object holds what the build chose; everything that needs a module's rank, alpha or
scaling (the build, merges, the PEFT adapter config) reads it back from there through these functions,
which follow PEFT's own rules:

    scaling = alpha / r             (use_rslora: alpha / sqrt(r))
    r, alpha of a module            rank_pattern / alpha_pattern: the first key K (in the order given) for
                                    which re.match(rf"(.*\\.)?({K})$", module name) matches, else --rank / --alpha
                                    (peft.utils.other.get_pattern_key); module names are the base model's,
                                    "model.layers.3.self_attn.v_proj"
    layers                          layers_to_transform: only decoder layers of these indices are adapted
"""

from __future__ import annotations

import json
import math
import re

from ortlora.errors import OrtloraError

INITS = ("gaussian", "kaiming")  # PEFT's init_lora_weights "gaussian" and True (nn.Linear's kaiming-uniform A)
PEFT_INIT = {"gaussian": "gaussian", "kaiming": True}
LAYERS_PATTERN = "layers"  # Qwen2's decoder layers: model.layers.{i}


def parse_layers(spec: str, count: int) -> list[int]:
    """``--layers``: ``N`` or ``last:N`` (the last N of ``count`` layers, mlx-lm's --num-layers), or a list of
    indices and ranges ``0,1,5-7`` (PEFT's layers_to_transform; one index alone is ``5,`` or ``5-5``).
    Sorted, without duplicates."""
    text = spec.strip()
    last = re.fullmatch(r"(?:last:)?\s*(-?\d+)", text)
    if last and ("," not in text):
        n = int(last.group(1))
        if not 1 <= n <= count:
            raise OrtloraError(f"--layers {spec}: the model has {count} layers, so the last N takes N from 1 to {count}")
        return list(range(count - n, count))
    layers: set[int] = set()
    for part in [p for p in text.split(",") if p.strip()] or [text]:  # "5," is layer 5 alone
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise OrtloraError(f"--layers takes N, last:N or a list of layer indices and ranges like 0,1,5-7; "
                               f"got {spec!r}")
        first, end = int(match.group(1)), int(match.group(2) or match.group(1))
        if end < first:
            raise OrtloraError(f"--layers {spec}: the range {first}-{end} runs backwards")
        if end >= count:  # checked before the range is made: 0-2000000000 would take minutes and gigabytes
            raise OrtloraError(f"--layers {spec}: layer {max(first, count)} is out of range; the model has {count} "
                               f"layers (0 to {count - 1})")
        layers.update(range(first, end + 1))
    return sorted(layers)


def parse_pattern(text: str, option: str, integer: bool) -> dict[str, int | float]:
    """``--rank-pattern`` / ``--alpha-pattern``: a JSON object ``{"v_proj": 16}`` or ``v_proj=16,o_proj=4``.
    Keys are PEFT's (regular expressions matched at the end of a module name); values positive."""
    text = text.strip()
    if text.startswith("{"):
        try:
            pattern = json.loads(text)
        except json.JSONDecodeError as e:
            raise OrtloraError(f"{option} is not a valid JSON object ({e.msg} at character {e.pos})") from None
        if not isinstance(pattern, dict):
            raise OrtloraError(f"{option} must be a JSON object of module name to value")
    else:
        pattern = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise OrtloraError(f"{option} takes NAME=VALUE pairs separated by commas or a JSON object, got {part!r}")
            try:
                pattern[key.strip()] = float(value)
            except ValueError:
                raise OrtloraError(f"{option}: {key.strip()}={value.strip()!r} is not a number") from None
    what = "a positive integer" if integer else "a positive number"
    result: dict[str, int | float] = {}
    for key, value in pattern.items():
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0
        if integer and ok and value != int(value):
            ok = False
        if not ok:
            raise OrtloraError(f"{option}: the value of {key!r} must be {what}, got {value!r}")
        try:
            re.compile(key)
        except re.error as e:
            raise OrtloraError(f"{option}: {key!r} is not a valid regular expression ({e})") from None
        result[key] = int(value) if integer else (int(value) if float(value).is_integer() else float(value))
    return result


def pattern_key(keys, module: str) -> str | None:
    """PEFT's get_pattern_key: the first key that matches the end of ``module`` (whole dotted parts)."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank(lora: dict, module: str) -> int:
    key = pattern_key(lora.get("rank_pattern") or {}, module)
    return lora["rank"] if key is None else lora["rank_pattern"][key]


def module_alpha(lora: dict, module: str) -> float:
    key = pattern_key(lora.get("alpha_pattern") or {}, module)
    return lora["alpha"] if key is None else lora["alpha_pattern"][key]


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def module_scaling(lora: dict, module: str) -> float:
    """The scaling of the adapted module ``module`` ("model.layers.0.self_attn.q_proj")."""
    return scaling(module_alpha(lora, module), module_rank(lora, module), bool(lora.get("rslora")))


def unmatched_keys(lora: dict, modules: list[str]) -> list[str]:
    """Pattern keys that match none of the adapted ``modules``: most likely a typo, which PEFT would ignore."""
    problems = []
    for option, field in (("--rank-pattern", "rank_pattern"), ("--alpha-pattern", "alpha_pattern")):
        keys = list(lora.get(field) or {})
        used = {pattern_key(keys, m) for m in modules}
        problems += [f"{option} key {k!r} matches no adapted module" for k in keys if k not in used]
    return problems


def peft_fields(lora: dict) -> dict:
    """The LoraConfig fields (adapter_config.json) that say which variant of LoRA the weights are."""
    layers = lora.get("layers")
    return {
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "target_modules": lora["targets"],
        "init_lora_weights": PEFT_INIT.get(lora["init"], lora["init"]),
        "use_rslora": bool(lora.get("rslora")),
        "use_dora": bool(lora.get("dora")),
        "rank_pattern": dict(lora.get("rank_pattern") or {}),
        "alpha_pattern": dict(lora.get("alpha_pattern") or {}),
        "layers_to_transform": list(layers) if layers is not None else None,
        "layers_pattern": LAYERS_PATTERN if layers is not None else None,
    }
