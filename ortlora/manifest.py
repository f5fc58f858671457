"""The artifact manifest (``ortlora.json``): the only contract between build and runtime.

Torch-free. The build step writes it last, so a directory without it is not a finished build.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ortlora.errors import OrtloraError

MANIFEST_NAME = "ortlora.json"
FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraParameter:
    onnx_name: str  # "model.layers.0.self_attn.q_proj.lora_A.weight": the ONNX initializer / input
    peft_name: str  # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": adapter key
    shape: tuple[int, ...]
    layer: int
    module: str  # "q_proj"
    kind: str  # "A" or "B"


@dataclass
class Manifest:
    model: dict  # architecture, source dir, the HF config, base weights hash
    lora: dict  # rank, alpha, dropout, scaling, targets, init, seed
    label_smoothing: float
    parameters: list[LoraParameter]
    files: dict  # role -> file name inside the artifact directory
    io: dict  # graph -> {"inputs": [...], "outputs": [...]}
    counts: dict  # trainable / total parameters
    versions: dict
    artifact_id: str
    format: int = FORMAT_VERSION
    # name -> dtype, shape, offset, length of every frozen weight in files["frozen_weights"]
    frozen: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        data = asdict(self)
        (directory / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise OrtloraError(
                f"{directory} is not an ortlora artifact directory (no {MANIFEST_NAME}); "
                f"build one first: ortlora-build --tiny --out {directory}"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != FORMAT_VERSION:
                raise OrtloraError(f"{path} has format {data.get('format')}, this ortlora reads {FORMAT_VERSION}; rebuild the artifacts")
            data["parameters"] = [LoraParameter(**{**p, "shape": tuple(p["shape"])}) for p in data["parameters"]]
            manifest = cls(**data)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise OrtloraError(f"{path} is damaged ({e}); rebuild the artifacts") from None
        missing = [f for f in manifest.all_files() if not (Path(directory) / f).exists()]
        if missing:
            raise OrtloraError(f"{directory} is incomplete, missing {', '.join(missing)}; rebuild the artifacts")
        return manifest

    def base_model_dir(self, artifacts: Path) -> Path:
        """The base model the artifacts were built from (the tiny one is bundled inside them)."""
        source = Path(self.model["source"])
        return source if source.is_absolute() else Path(artifacts) / source

    def all_files(self) -> list[str]:
        files: list[str] = []
        for value in self.files.values():
            files.extend(value if isinstance(value, list) else [value])
        return files
