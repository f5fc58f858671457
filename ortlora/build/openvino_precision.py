"""OpenVINO's bf16 kept where PyTorch's autocast keeps bf16, and fp32 where autocast keeps fp32.

Under ``INFERENCE_PRECISION_HINT`` bf16 (``--precision bf16``), OpenVINO's CPU plugin computes every node in bf16
but those its ``MarkInferencePrecision`` pass keeps in fp32: the ancestors of a graph output reached without
passing a matrix product (MatMul, convolutions, ...), "the tail". In a training graph the outputs are the loss
and the LoRA gradients, which products make, so nearly everything ran in bf16: the residual stream, the norms,
the loss's reductions. That cost accuracy: the largest LoRA-gradient error was 1.9 to 2.5 times autocast's (0.5B
shape), against which the project's bar is 1.5.

``fp32_as_autocast`` gives the graph one more output, ``FP32_OUTPUT``: the first element of every tensor that a
product reads, the step computes and autocast would hold in fp32 (``autocast_types``), concatenated. OpenVINO
then keeps in fp32 every node from such a tensor back to the products before it, and converts at the product.
What autocast holds in bf16 it may round: a product's output and what is computed from bf16 alone (the MLP's
SiLU and gating, a projection's bias, the attention scores' scaling). Measured with ``bench.py --accuracy``
(0.5B shape, 4 batches, against PyTorch + PEFT fp32, as a multiple of autocast's error, loss / largest / median
LoRA gradient): 1.21 / 1.91 / 1.76 with OpenVINO's rule alone, 0.91 / 0.95 / 0.98 with this output. The rule
before this one kept every product's input fp32: as accurate, and its step 1.13 times this one's.

The output costs one Reshape, one Slice and one value per tensor; the backend leaves it unbound. Products inside
a Loop body (the chunked head) are left as they are: the Loop's own outputs feed nodes that are kept.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

PRODUCTS = ("MatMul", "Gemm")
FP32_OUTPUT = "openvino_precision.fp32"
PREFIX = "openvino_precision"

# What autocast computes in fp32 whatever its inputs: the norms' and the loss's reductions and what follows them,
# and the softmax (eager attention asks for fp32; SDPA's kernels compute it in fp32).
FP32_OPS = frozenset({"LogSoftmax", "Softmax", "ReduceMean", "ReduceSum", "Sqrt", "Reciprocal", "Div", "Exp"})
# Ops whose output is a view or a rearrangement of their first input: its type.
MOVES = frozenset({"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Slice", "Split", "Expand",
                   "ScatterElements", "ScatterND", "GatherElements"})
# Ops whose output is no float of the step's own (shapes, masks, indices).
NOT_FLOAT = frozenset({"Shape", "ConstantOfShape", "Range", "Equal", "Not", "Where", "NonZero", "LessOrEqual", "And",
                       "ReduceProd"})


def autocast_types(graph: onnx.GraphProto) -> dict[str, str | None]:
    """Each tensor's type under autocast: "bf16", "fp32", or None for weights, constants and what is made of them
    alone, which take the other operand's type (autocast casts a weight to its product's type, and a scalar does
    not promote). An embedding's rows are fp32, as torch's lookup in an fp32 table."""
    weights = {init.name for init in graph.initializer}
    kind: dict[str, str | None] = {}
    for node in graph.node:  # in topological order
        found = [kind.get(name) for name in node.input if name]
        if node.op_type in PRODUCTS:
            made = "bf16"
        elif node.op_type in FP32_OPS:
            made = "fp32"
        elif node.op_type == "Cast":  # .to(torch.float32) of a float, as the norms ask (else a mask's or an index's)
            to_float = next(a.i for a in node.attribute if a.name == "to") == TensorProto.FLOAT
            made = "fp32" if to_float and found[0] is not None else None
        elif node.op_type in NOT_FLOAT or node.op_type == "Constant":
            made = None
        elif node.op_type == "Gather":
            made = "fp32" if node.input[0] in weights else found[0]
        elif node.op_type in MOVES:
            made = found[0]
        else:
            made = "fp32" if "fp32" in found else "bf16" if "bf16" in found else None
        kind.update(dict.fromkeys(node.output, made))
    return kind


def fp32_as_autocast(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the output FP32_OUTPUT (module docstring)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    # Tensors computed from the step's inputs. What comes of weights alone (a bf16 base's widened matrices, an int8 /
    # int4 base's dequantized ones) is left to OpenVINO's own rules: a second reader of a dequantized matrix would
    # also keep its CPU plugin from multiplying by the stored one.
    stepwise = {i.name for i in graph.input}
    for node in graph.node:  # in topological order
        if any(name in stepwise for name in node.input):
            stepwise.update(node.output)
    kind = autocast_types(graph)  # a product's output is bf16, a graph input (a LoRA weight) untyped: neither is kept
    read = dict.fromkeys(name for node in graph.node if node.op_type in PRODUCTS for name in node.input
                         if name in stepwise and kind.get(name) == "fp32")
    if not read:
        return model
    flat, start, end = f"{PREFIX}.flat", f"{PREFIX}.start", f"{PREFIX}.end"
    nodes = [helper.make_node("Constant", [], [name], name=name, value=helper.make_tensor(name, TensorProto.INT64, [1], [v]))
             for name, v in ((flat, -1), (start, 0), (end, 1))]
    firsts = []
    for k, name in enumerate(read):
        nodes += [helper.make_node("Reshape", [name, flat], [f"{PREFIX}.{k}.flat"], name=f"{PREFIX}.{k}.flat"),
                  helper.make_node("Slice", [f"{PREFIX}.{k}.flat", start, end], [f"{PREFIX}.{k}"], name=f"{PREFIX}.{k}")]
        firsts.append(f"{PREFIX}.{k}")
    nodes.append(helper.make_node("Concat", firsts, [FP32_OUTPUT], name=FP32_OUTPUT, axis=0))
    graph.node.extend(nodes)
    graph.output.append(helper.make_tensor_value_info(FP32_OUTPUT, TensorProto.FLOAT, [len(firsts)]))
    return model
