"""The LM head's input gradient taken through the softmax, without a [rows, vocab] logit gradient.

For cross-entropy over an LM head with weight W, ORT's gradient graph computes

    d logits = (softmax - onehot(label)) * s        [rows, vocab]
    d hidden = d logits @ W                          [rows, hidden]

where s is each row's scale (1 / labelled rows for a mean, 0 on ignored rows). The same product is

    d hidden = s * (softmax @ W - W[label])

so the one-hot term becomes a gather of W's rows and the scale applies to [rows, hidden]. The
gradient then holds one [rows, vocab] tensor (the softmax) where SoftmaxCrossEntropyLossGrad spelled
out held three (softmax, softmax with the labels subtracted, the scaled result), and makes one pass
over it instead of four. With Qwen2.5's 151,936-entry vocabulary one such tensor is 156 MB for
256 rows.

``fuse_head_gradient`` finds SoftmaxCrossEntropyLossGrad -> [Reshape] -> matrix product by the head
weight in ORT's training model and replaces the three nodes. Any other use of the logit gradient
(label smoothing adds a second gradient to it) leaves the graph as it is, for the generic spelling.
"""

from __future__ import annotations

from collections import defaultdict

import onnx

from ortlora.build.portable_ops import Emitter, attrs, label_rows, loss_reduction, weight_shapes

LOSS_GRAD = "SoftmaxCrossEntropyLossGrad"
PRODUCTS = {("", "Gemm"), ("", "MatMul"), ("com.microsoft", "FusedMatMul")}


def fuse_head_gradient(model: onnx.ModelProto) -> int:
    """Rewrite every cross-entropy gradient that flows straight into the LM head. Returns how many."""
    graph = model.graph
    nodes = list(graph.node)  # held, so that the node objects (and their ids) stay the same below
    readers = defaultdict(list)
    for node in nodes:
        for name in node.input:
            readers[name].append(node)
    for out in graph.output:
        readers[out.name].append(None)
    weights = weight_shapes(graph)  # the head weight: an initializer, or a frozen weight still read as an input

    replacements: dict[int, list[onnx.NodeProto]] = {}
    for node in nodes:
        chain = _head_chain(node, readers, weights) if node.op_type == LOSS_GRAD else None
        if chain is None:
            continue
        reshape, product = chain
        replacements[id(node)] = _fused(node, reshape, product)
        for gone in (reshape, product):
            if gone is not None:
                replacements[id(gone)] = []
    if replacements:
        rewritten = [new for node in nodes for new in replacements.get(id(node), [node])]
        del graph.node[:]
        graph.node.extend(rewritten)
    return sum(1 for new in replacements.values() if new)


def _only_reader(name: str, readers) -> onnx.NodeProto | None:
    found = readers.get(name, [])
    return found[0] if len(found) == 1 else None


def _head_chain(grad: onnx.NodeProto, readers, weights: dict[str, list[int]]):
    """(Reshape or None, product node) when the loss gradient feeds only the head's product, else None."""
    if len([i for i in grad.input[3:] if i]):  # class weights: not in the causal-LM loss
        return None
    reader = _only_reader(grad.output[0], readers)
    reshape = reader if reader is not None and reader.op_type == "Reshape" else None
    rows = reshape if reshape is not None else grad
    product = _only_reader(rows.output[0], readers)
    if product is None or (product.domain, product.op_type) not in PRODUCTS or len(product.input) != 2:
        return None
    a = attrs(product)
    if product.input[0] != rows.output[0] or a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 \
            or a.get("transBatchA", 0) or a.get("transBatchB", 0):
        return None
    if len(weights.get(product.input[1], [])) != 2:  # the head weight, [vocab, hidden] or its transpose
        return None
    return reshape, product


def _fused(grad: onnx.NodeProto, reshape: onnx.NodeProto | None, product: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Nodes computing ``product``'s output, d hidden = s * (softmax @ W - W[label])."""
    e = Emitter(grad)
    dy, log_prob = grad.input[:2]
    weight = product.input[1]
    transposed = attrs(product).get("transB", 0)  # W given as [hidden, vocab]
    prob = e("Exp", [log_prob])
    if reshape is not None:
        prob = e("Reshape", [prob, reshape.input[1]])
    through_head = e(product.op_type, [prob, weight], domain=product.domain, **attrs(product))
    column, valid = label_rows(grad, e)
    label = e("Reshape", [column, e.const([-1])])
    if transposed:
        at_label = e("Transpose", [e("Gather", [weight, label], axis=1)], perm=[1, 0])
    else:
        at_label = e("Gather", [weight, label], axis=0)
    # 'mean': dY / (labelled rows); 'sum': dY; 'none': dY is per row. Ignored rows: 0.
    scale = e("Div", [dy, e("ReduceSum", [valid], keepdims=0)]) if loss_reduction(grad) == "mean" else dy
    row_scale = e("Reshape", [e("Mul", [valid, scale]), e.const([-1, 1])])
    e("Mul", [e("Sub", [through_head, at_label]), row_scale], [product.output[0]])
    return e.nodes
