"""OpenVINO's bf16 confined to the matrix products, as PyTorch's autocast confines it.

Under ``INFERENCE_PRECISION_HINT`` bf16 (``--precision bf16``), OpenVINO's CPU plugin computes every node in bf16
but those its ``MarkInferencePrecision`` pass keeps in fp32: the ancestors of a graph output reached without
passing a matrix product (MatMul, convolutions, ...), "the tail". In a training graph the outputs are the loss
and the LoRA gradients, which products make, so nearly everything ran in bf16: the residual stream, the norms,
the softmax, the loss's reductions. That cost accuracy: the largest LoRA-gradient error was 2.5 times autocast's
(0.5B shape), against which the project's bar is 1.5.

``fp32_outside_products`` gives the graph one more output, ``FP32_OUTPUT``: the first element of every tensor
that a product reads and another node makes, concatenated. Every node that is not a product is then an ancestor
of an output with no product between (follow its consumers until one feeds a product), so OpenVINO keeps all of
them in fp32 and converts only at the products' inputs and outputs: autocast's rule. Measured with
``bench.py --accuracy`` (0.5B shape, against PyTorch + PEFT fp32; as a multiple of autocast's error, loss /
largest / median LoRA gradient): 1.58 / 2.50 / 1.78 before, 0.56 / 1.05 / 0.99 with the output.

The output costs one Reshape, one Slice and one value per tensor; the backend leaves it unbound. Products inside
a Loop body (the chunked head) are left as they are: the Loop's own outputs feed nodes that are kept.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

PRODUCTS = ("MatMul", "Gemm")
FP32_OUTPUT = "openvino_precision.fp32"
PREFIX = "openvino_precision"


def fp32_outside_products(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the output FP32_OUTPUT (module docstring)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    made_by = {out: node.op_type for node in graph.node for out in node.output if out}
    # Tensors computed from the step's inputs. What comes of weights alone (a bf16 base's widened matrices, an int8 /
    # int4 base's dequantized ones) is left to OpenVINO's own rules: a second reader of a dequantized matrix would
    # also keep its CPU plugin from multiplying by the stored one.
    stepwise = {i.name for i in graph.input}
    for node in graph.node:  # in topological order
        if any(name in stepwise for name in node.input):
            stepwise.update(node.output)
    read = dict.fromkeys(name for node in graph.node if node.op_type in PRODUCTS for name in node.input
                         if name in stepwise and made_by.get(name) not in (None, *PRODUCTS))
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
