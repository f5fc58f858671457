"""Checks on a local Hugging Face model directory, before anything heavy is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from ortlora.errors import OrtloraError
from ortlora.weights import weight_files

SUPPORTED_MODEL_TYPES = ("qwen2",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json")


def check_model_dir(path: Path) -> dict:
    """Return the model's config.json, or raise a one-line error saying what is missing."""
    if not path.is_dir():
        raise OrtloraError(f"model directory {path} does not exist")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise OrtloraError(f"{path} has no config.json: is it a Hugging Face model directory?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise OrtloraError(f"{config_path} is not valid JSON: {e}") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise OrtloraError(
            f"{path} holds a {model_type or 'unknown'} model ({', '.join(config.get('architectures') or [])}); "
            f"ortlora supports Qwen2 / Qwen2.5 (model_type qwen2)"
        )
    if not weight_files(path):
        raise OrtloraError(f"{path} has no *.safetensors weights")
    if not (path / "tokenizer.json").is_file():
        raise OrtloraError(f"{path} has no tokenizer.json (a fast tokenizer is needed at run time)")
    return config
