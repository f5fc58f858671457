"""ortlora: LoRA fine-tuning of Qwen2-family causal LMs on ONNX Runtime.

Two halves meet only at the artifact directory and its manifest (``ortlora.json``):

- ``ortlora.build`` (torch, transformers, onnx): injects LoRA, exports ONNX graphs and
  generates ONNX Runtime training artifacts, once per model.
- ``ortlora.runtime`` (onnxruntime, numpy; never torch): trains the LoRA weights with
  our own AdamW and schedules, and writes PEFT-compatible checkpoints.
"""

__version__ = "0.1.0"
