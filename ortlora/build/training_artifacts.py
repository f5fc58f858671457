"""ONNX Runtime training artifacts from the exported loss graph.

``generate_artifacts`` builds the gradient graph (training model), the forward-only eval model,
the optimizer model and the checkpoint. Around it we fix two things: models are stamped with
an IR version onnxruntime-training 1.19 can load, and LoRA dropout is removed from the eval model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import onnx

from ortlora.build.export import is_large, save_model, stamp_ir_version

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"


def generate(loss_model: onnx.ModelProto, trainable: list[str], out_dir: Path, work_dir: Path) -> None:
    from onnxruntime.training import artifacts

    # Known gap: over 2 GB, onnxblock's shape inference of the path-given model fails under
    # onnx >= 1.17 (it re-saves temp.onnx.data in the working directory, which onnx refuses).
    frozen = [init.name for init in loss_model.graph.initializer if init.name not in set(trainable)]
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    # loss=None: the exported graph's single output already is the loss.
    model_arg = loss_model
    if is_large(loss_model):  # over 2 GB the model must be handed over as a path, weights external
        save_model(loss_model, work_dir / "loss_external.onnx")
        model_arg = str(work_dir / "loss_external.onnx")
    with native_stderr_silenced():  # ORT's gradient builder logs every graph pass at INFO level
        artifacts.generate_artifacts(
            model_arg,
            requires_grad=trainable,
            frozen_params=frozen,
            loss=None,
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=str(out_dir),
        )
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL):
        model = onnx.load(str(out_dir / name), load_external_data=False)
        if name == EVAL_MODEL:
            disable_dropout(model)
        stamp_ir_version(model)
        onnx.save(model, str(out_dir / name))  # weights, if external, stay where they are


@contextlib.contextmanager
def native_stderr_silenced():
    """Send what native code writes to file descriptor 2 to /dev/null for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def disable_dropout(model: onnx.ModelProto) -> int:
    """Turn Dropout nodes into Identity (evaluation runs without dropout). Returns how many."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "Dropout":
            node.op_type = "Identity"
            del node.input[1:]
            del node.output[1:]
            del node.attribute[:]
            count += 1
    return count
