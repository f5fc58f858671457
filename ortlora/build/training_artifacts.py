"""ONNX Runtime training artifacts from the exported loss graph.

``generate_artifacts`` builds the gradient graph (training model), the forward-only eval model,
the optimizer model and the checkpoint. Around it we fix four things: the loss graph is handed
over without any weight value (see ``generate``), models are stamped with an IR version
onnxruntime-training 1.19 can load, LoRA dropout is removed from the eval model, and operators
whose training kernels are slow are spelled out in standard ones (see ``spell_out_slow_kernels``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ortlora.build import frozen_weights
from ortlora.build.chunked_loss import chunk_head_loss
from ortlora.build.export import stamp_ir_version
from ortlora.build.head_gradient import fuse_head_gradient
from ortlora.build.portable_ops import rewrite_node
from ortlora.build.recompute import recompute_layers

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"


def generate(loss_model: onnx.ModelProto, lora: dict[str, np.ndarray], frozen: dict[str, TensorProto],
             out_dir: Path, label_smoothing: float = 0.0, recompute: str = "none",
             vocabulary_chunks: dict[str, list[tuple[str, int, int]]] | None = None,
             ) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Write the training, eval and optimizer models and the checkpoint into ``out_dir``.

    ``loss_model`` holds the initial LoRA weights as initializers, the trainable parameters (``lora``:
    the same by ONNX name), and reads every frozen weight as a graph input (frozen_weights.fold).
    So ``generate_artifacts`` never sees a weight value: the proto is a few hundred kB at any model
    size, it is checked and shape-inferred in memory, and the checkpoint it writes holds the LoRA
    weights only (a few MB, the same file for every ORT app that trains the adapter). Afterwards the
    frozen inputs of the training and eval models become initializers read from frozen_weights.bin
    (``frozen``: the references), shared with every other graph.

    The training and eval models compute the loss over the LM head in chunks of rows (chunked_loss.py;
    ``label_smoothing``: the exported loss's), in a Loop, which ONNX Runtime's training API runs on the
    CPU and CUDA. Returned: the training model with the loss whole and the head's gradient fused
    (head_gradient.py), which the portable graph is made from: OpenVINO's provider cannot take the Loop
    (its ONNX reader finds no tensor a Loop body reads from the graph); and the training model as written, with
    the Loop, which the CPU provider's portable graph is made from. ``recompute`` "layers": both
    training graphs recompute each decoder layer in the backward pass (recompute.py). ``vocabulary_chunks``: the
    head's row views by matrix (quantize.chunks_by_matrix), which the chunked loss reads a chunk at a time.
    """
    from onnxruntime.training import artifacts

    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    with native_stderr_silenced():  # ORT's gradient builder logs every graph pass at INFO level
        artifacts.generate_artifacts(
            loss_model,
            requires_grad=list(lora),
            frozen_params=[],
            loss=None,  # the exported graph's single output already is the loss
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=str(out_dir),
        )
    whole = onnx.load(str(out_dir / TRAINING_MODEL), load_external_data=False)
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL):
        model = onnx.load(str(out_dir / name), load_external_data=False)
        if name == EVAL_MODEL:
            disable_dropout(model)
        if name != OPTIMIZER_MODEL:
            chunk_head_loss(model, label_smoothing, vocabulary_chunks=vocabulary_chunks)
        if name == TRAINING_MODEL and recompute == "layers":
            recompute_layers(model)
        onnx.save(finish(model, frozen), str(out_dir / name))
        if name == TRAINING_MODEL:
            chunked = model
    fuse_head_gradient(whole)
    if recompute == "layers":
        recompute_layers(whole)
    return finish(whole, frozen), chunked


def finish(model: onnx.ModelProto, frozen: dict[str, TensorProto]) -> onnx.ModelProto:
    """Slow kernels spelled out, frozen weights attached, an IR version ORT 1.19 loads, and no value_info.

    ``generate_artifacts`` annotates about 5,000 tensors with the shapes its inference found, most of them
    in dimensions it could not name (unk__68, ...). ONNX Runtime plans the buffers of a run with them, and
    worse than with the shapes it infers itself: on the 0.5B shape at batch 2 x 512, one training step's peak
    is 7.36 -> 5.99 GB without them, and 6.67 -> 3.62 GB with the layers recomputed (recompute.py), whose
    copies the annotations do not cover. ONNX Runtime infers every shape again when it loads the model.
    """
    del model.graph.value_info[:]
    spell_out_slow_kernels(model)
    frozen_weights.attach(model, frozen)  # last: a quantized base raises the opset of the whole graph
    stamp_ir_version(model)
    return model


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
