"""ONNX Runtime training artifacts from the exported loss graph.

``generate_artifacts`` builds the gradient graph (training model), the forward-only eval model,
the optimizer model and the checkpoint. Around it we fix four things: the loss graph is handed
over as a small ModelProto whose weights are external-data references (see ``generate``), models
are stamped with an IR version onnxruntime-training 1.19 can load, LoRA dropout is removed from
the eval model, and operators whose training kernels are slow are spelled out in standard ones
(see ``spell_out_slow_kernels``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ortlora.build import frozen_weights
from ortlora.build.export import save_external, stamp_ir_version
from ortlora.build.head_gradient import fuse_head_gradient
from ortlora.build.portable_ops import rewrite_node

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"


def generate(loss_model: onnx.ModelProto, lora: dict[str, np.ndarray], frozen: dict[str, TensorProto],
             out_dir: Path, work_dir: Path) -> None:
    """Write the training, eval and optimizer models and the checkpoint into ``out_dir``.

    ``lora``: the initial LoRA weights by ONNX name, the trainable parameters. ``frozen``: references
    into the frozen weights file (frozen_weights.py), which the training and eval models read.

    ``loss_model`` is saved to ``work_dir`` with its weights as external data; as onnx.save does,
    this moves the weights out of the proto: afterwards it holds references into
    ``work_dir/loss_external.onnx.data``, which must stay until the caller is done with it.
    The same path serves every model size, so the tiny test builds exercise it too.

    Why not hand ``generate_artifacts`` the model as a path, as its docs say to above 2 GB: onnxblock
    then saves the whole model to ``temp.onnx`` + ``temp.onnx.data`` in the working directory once per
    block (the pass-through loss block, then the training block). The first save moves the weights
    out of the shared in-memory model into that file; the second must reuse it, but onnx >= 1.17
    refuses to save external data to a location that already exists (FileExistsError), and deleting
    the file loses the weights the model now points at. It also loads and copies the full model twice.

    What we do instead: hand it a ModelProto whose large initializers are external-data references,
    so the proto is small and onnxblock checks and shape-infers it in memory, with no temporary
    files. Nothing in it needs the weight values: shape inference reads only dims (small constants
    stay inline), and generate_artifacts moves every parameter to a graph input before ORT's graph
    optimizer and gradient builder see the model. The values are read only where the checkpoint is
    written: ORT's save_checkpoint reads each frozen parameter from the external data file (that
    checkpoint is then replaced by one of the LoRA weights only, see ``_keep_only_lora_in_checkpoint``).
    Both the onnx checker and ORT resolve an in-memory model's relative external-data locations
    against the current directory, hence the chdir into ``work_dir`` for the duration.
    """
    from onnxruntime.training import artifacts

    trainable = list(lora)
    out_dir, work_dir = out_dir.resolve(), work_dir.resolve()  # they must survive the chdir below
    loss_path = work_dir / "loss_external.onnx"
    save_external(loss_model, loss_path)
    with contextlib.chdir(work_dir):
        reference_model = onnx.load(str(loss_path), load_external_data=False)
        frozen_params = [init.name for init in reference_model.graph.initializer if init.name not in set(trainable)]
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
        with native_stderr_silenced():  # ORT's gradient builder logs every graph pass at INFO level
            artifacts.generate_artifacts(
                reference_model,
                requires_grad=trainable,
                frozen_params=frozen_params,
                loss=None,  # the exported graph's single output already is the loss
                optimizer=artifacts.OptimType.AdamW,
                artifact_directory=str(out_dir),
            )
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL):
        model = onnx.load(str(out_dir / name), load_external_data=False)
        if name == EVAL_MODEL:
            disable_dropout(model)
        frozen_weights.attach(model, frozen)
        if name == TRAINING_MODEL:
            fuse_head_gradient(model)
        spell_out_slow_kernels(model)
        stamp_ir_version(model)
        onnx.save(model, str(out_dir / name))
    _keep_only_lora_in_checkpoint(out_dir, lora)


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


def _keep_only_lora_in_checkpoint(out_dir: Path, lora: dict[str, np.ndarray]) -> None:
    """Rewrite the checkpoint with the LoRA weights only.

    generate_artifacts makes every frozen weight a model input fed from the checkpoint, so the
    checkpoint held a second copy of the base model. ``generate`` turns those inputs into
    initializers in frozen_weights.bin (shared with every other graph), so the checkpoint needs only
    the LoRA weights: a few MB, and the same file for every ORT app that trains the adapter.
    """
    from onnxruntime.capi import _pybind_state as C

    for path in (out_dir / CHECKPOINT, out_dir / f"{CHECKPOINT}.data"):
        path.unlink(missing_ok=True)
    trainable = [numpy_helper.from_array(value, name).SerializeToString() for name, value in lora.items()]
    C.save_checkpoint(trainable, [], str(out_dir / CHECKPOINT), False)


# onnxruntime-training 1.19's kernels for these are slower than the same math in standard operators:
# on the 0.5B shape with 2 threads, SoftmaxCrossEntropyLoss 215 ms against 13 ms for LogSoftmax on the
# [256, 151936] logits, its gradient 93 ms against about 30, SimplifiedLayerNormalizationGrad 1.54 ms
# against 0.12 ms on [2, 128, 896] (49 of them a step; 52 -> 28 ms in a step's profile). The
# spellings are the portable graph's (portable_ops.py), each tested against ORT's kernel.
SLOW_KERNELS = ("SoftmaxCrossEntropyLoss", "SoftmaxCrossEntropyLossGrad", "SimplifiedLayerNormalizationGrad")


def spell_out_slow_kernels(model: onnx.ModelProto) -> int:
    """Replace the nodes of SLOW_KERNELS by standard operators. Returns how many."""
    graph = model.graph
    used = {name for node in graph.node for name in node.input} | {out.name for out in graph.output}
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type not in SLOW_KERNELS:
            nodes.append(node)
            continue
        for k in range(1, len(node.output)):  # outputs nobody reads are not computed
            if node.output[k] not in used:
                node.output[k] = ""
        nodes.extend(rewrite_node(node))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


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
