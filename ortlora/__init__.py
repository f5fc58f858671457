"""ortlora: LoRA fine-tuning of Qwen2- and Qwen3-family causal LMs on ONNX Runtime.

Two halves meet only at the artifact directory and its manifest (``ortlora.json``):

- ``ortlora.build`` (torch, transformers, onnx): injects LoRA, exports ONNX graphs and
  generates ONNX Runtime training artifacts, once per model.
- ``ortlora.runtime`` (onnxruntime, numpy; never torch): trains the LoRA weights with
  our own AdamW and schedules, and writes PEFT-compatible checkpoints.

The Python API (``ortlora/api.py``) is what the commands run: ``ortlora.build(...)``, ``ortlora.train(...)``
(a ``Run``), ``ortlora.export(...)``, and ``ortlora.Generator`` with ``ortlora.Sampling``. Each is imported when
first used, so ``import ortlora`` costs next to nothing and needs neither torch nor onnxruntime.
"""

import importlib
import types

__version__ = "0.1.0"
__all__ = ["build", "train", "export", "Run", "Generator", "Sampling", "OrtloraError", "__version__"]

_LAZY = {"train": "ortlora.api", "export": "ortlora.api", "Run": "ortlora.api", "Generator": "ortlora.runtime.generate",
         "Sampling": "ortlora.runtime.generate", "OrtloraError": "ortlora.errors"}


def __getattr__(name: str):
    if name in _LAZY:
        value = globals()[name] = getattr(importlib.import_module(_LAZY[name]), name)
        return value
    raise AttributeError(f"module 'ortlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _BuildPackage(types.ModuleType):
    """``ortlora.build`` names the build side's package (``ortlora.build.builder``, ...), which importing any of its
    modules makes an attribute of ``ortlora``; so the API's build function is the package called:
    ``ortlora.build(model=..., out=...)`` is ``ortlora.api.build``."""

    def __call__(self, *args, **options):
        from ortlora.api import build

        return build(*args, **options)


from ortlora import build  # noqa: E402  the package alone is its docstring: torch comes with its modules

build.__class__ = _BuildPackage
