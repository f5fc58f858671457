"""The portable graphs for providers without NonZero and LogSoftmax: the loss over every position.

The loss graph gathers the hidden rows at the labelled positions, ``nonzero(labels != ignore_index)``, before
the last layer's MLP and the LM head (export.CausalLMLoss): ignored positions cost no vocabulary projection.
NonZero's output has a shape only the data decide, and some execution providers lack it: onnxruntime-ggml
0.2.0 lacks NonZero and LogSoftmax, and so took none of the portable graphs (docs/providers.md). This
transform writes a copy of each portable graph without them:

    NonZero(labels != ignore_index)   every position instead: Range(0, N) as [1, N], as NonZero lays out
    LogSoftmax(x)                     x - max(x) - log(sum(exp(x - max(x))))

With every position, the last layer and the LM head compute the ignored rows too; the loss already weights
each row by labels != ignore_index (portable_ops.label_rows: ignored rows count 0 in the loss and its
gradient, and the mean divides by the labelled rows), so loss and gradients are the same numbers. Every
position's index occurs once, so the gradient's ScatterND without reduction stays exact. The price is the
head's products and its [positions, vocab] tensors for ignored rows too, which is why the default graphs keep
NonZero (tests/test_dense_loss.py compares the two).

Label smoothing's term is a mean over the labelled rows' whole vocabulary (export.CausalLMLoss), which
ignored rows would enter: those builds get no such graph, and neither do bf16 and quantized bases (ggml 0.2.0
refused bf16 tensors and took none of an int8 base's graph: builder.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ortlora.build.portable_graph import PORTABLE_EVAL, PORTABLE_TRAINING
from ortlora.build.portable_ops import UnsupportedNode, attrs

# The graphs for onnxruntime-ggml (--ep ggml), by manifest role (session_backend reads ROLE_ggml_model).
GGML_TRAINING = "portable_training_ggml.onnx"
GGML_EVAL = "portable_eval_ggml.onnx"
GRAPHS = {"portable_training_ggml_model": (PORTABLE_TRAINING, GGML_TRAINING),
          "portable_eval_ggml_model": (PORTABLE_EVAL, GGML_EVAL)}
LACKED = ("NonZero", "LogSoftmax")


def every_position(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a portable graph (training or eval) without NonZero and LogSoftmax, computing the same loss and
    gradients. Refused (UnsupportedNode) where its NonZero is not the one that picks the labelled positions."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    nonzero = [n for n in graph.node if n.op_type == "NonZero"]
    if len(nonzero) != 1 or not _reads_labels(nonzero[0], graph):
        raise UnsupportedNode(f"expected one NonZero of labels != ignore_index, found {len(nonzero)} NonZero nodes "
                              "(not the loss graph's)")
    nodes = []
    for node in graph.node:
        if node.op_type == "NonZero":
            nodes += _positions(node)
        elif node.op_type == "LogSoftmax":
            nodes += _log_softmax(node, _opset(model))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _reads_labels(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    """Whether NonZero's input is Not(Equal(labels reshaped, a constant)): the labelled positions, 1-D."""
    producer = {out: n for n in graph.node for out in n.output}
    chain = []
    name = node.input[0]
    while name in producer and len(chain) < 3:
        chain.append(producer[name])
        name = producer[name].input[0]
    return [n.op_type for n in chain] == ["Not", "Equal", "Reshape"] and name == "labels"


def _positions(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Every position of NonZero's 1-D input, laid out as NonZero's output: [1, N] int64."""
    mask, out = node.input[0], node.output[0]
    name = f"{out}.every_position"
    return [
        helper.make_node("Shape", [mask], [f"{name}.count"]),
        _const(f"{name}.zero", 0), _const(f"{name}.one", 1), _const(f"{name}.axis", [0]),
        helper.make_node("Squeeze", [f"{name}.count", f"{name}.axis"], [f"{name}.n"]),
        helper.make_node("Range", [f"{name}.zero", f"{name}.n", f"{name}.one"], [f"{name}.range"]),
        helper.make_node("Unsqueeze", [f"{name}.range", f"{name}.axis"], [out], name=node.name),
    ]


def _log_softmax(node: onnx.NodeProto, opset: int) -> list[onnx.NodeProto]:
    """log_softmax(x) = x - max - log(sum(exp(x - max))) along the node's axis (opset 13+: default -1).
    ReduceMax takes its axes as an input from opset 18 (a quantized base's graphs are opset 21)."""
    axis = attrs(node).get("axis", -1)
    x, out = node.input[0], node.output[0]
    name = f"{out}.spelled"
    maximum = helper.make_node("ReduceMax", [x, f"{name}.axis"], [f"{name}.max"], keepdims=1) if opset >= 18 \
        else helper.make_node("ReduceMax", [x], [f"{name}.max"], axes=[axis], keepdims=1)
    return [
        _const(f"{name}.axis", [axis]),
        maximum,
        helper.make_node("Sub", [x, f"{name}.max"], [f"{name}.shifted"]),
        helper.make_node("Exp", [f"{name}.shifted"], [f"{name}.exp"]),
        helper.make_node("ReduceSum", [f"{name}.exp", f"{name}.axis"], [f"{name}.sum"], keepdims=1),
        helper.make_node("Log", [f"{name}.sum"], [f"{name}.log"]),
        helper.make_node("Sub", [f"{name}.shifted", f"{name}.log"], [out], name=node.name),
    ]


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.int64), name))


def write(out_dir: Path) -> dict[str, str]:
    """Write the ggml copies of the portable graphs in ``out_dir`` (they read the same frozen_weights.bin);
    returns their manifest entries."""
    for source, target in GRAPHS.values():
        model = onnx.load(str(out_dir / source), load_external_data=False)
        onnx.save(every_position(model), str(out_dir / target))
    return {role: target for role, (_, target) in GRAPHS.items()}
