"""The LM head and its cross-entropy in chunks of rows, its input gradient taken in the forward pass.

The exported loss is ``cross_entropy(rows @ W^T, targets)`` over the N labelled rows (with label smoothing
e, ``(1 - e) * nll + e * mean(-log_softmax)``). Done whole, it holds [N, vocab] tensors: at 8 x 512
tokens and Qwen2.5's 151,936-entry vocabulary one is 2.5 GB, and the forward pass keeps its
log-probabilities for the backward. Per row r, with p_r = softmax(rows_r @ W^T),

    loss_r            = -(1 - e) log p_r[label_r] - (e / vocab) sum_v log p_r[v]
    d loss_r / d rows_r = (p_r - e / vocab) @ W - (1 - e) W[label_r]

so the whole of the head's work for row r can be done at once, in the forward pass: its loss term and
its input gradient (as Liger's fused linear cross-entropy does). ``chunk_head_loss`` replaces the loss
(and in a training graph the head's part of the backward pass) by a Loop over chunks of at most
CHUNK_ROWS rows. Each iteration computes its chunk's logits, log-probabilities, loss terms and
[rows, hidden] gradient; the backward pass only scales that gradient by d loss / N. One chunk's
[rows, vocab] tensors exist at a time, the products are the ones the backward pass computed before (no
recompute), and loss and gradients are the same numbers (tests/test_chunked_loss.py).

A head stored [vocab, hidden] with row views (quantize.row_views: the vocabulary's chunks of rows, of any base)
is also used a chunk of the vocabulary at a time (``_by_vocabulary_chunks``): each vocabulary chunk's logits
are kept, the log-sum-exp is taken over them, and the label's logit, the smoothing sum and the gradient's
softmax @ W come chunk by chunk, so no [rows, vocab] tensor is formed (0.5B, 2 x 128: peak 2,876 -> 2,766 MB
with an fp32 base, 2,087 -> 1,924 MB with a bf16 one).

Chunks are of equal size (a Loop's outputs are stacked), ceil(N / chunks) rows, the last padded with
ignored rows: at most chunks - 1 rows of padding. The CPU provider's portable training graph is made from the
training model with this Loop (portable_graph.CPU_TRAINING).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortlora.build.portable_ops import read_names, weight_shapes
from ortlora.errors import OrtloraError

# Rows of logits a chunk holds: [1024, 151936] float32 is 622 MB. Measured at 8 x 512 on the 0.5B
# shape in docs/performance.md (the head's products run at full speed from a few hundred rows).
CHUNK_ROWS = 1024
LOSS = "SoftmaxCrossEntropyLoss"
PRODUCTS = ("Gemm", "MatMul")
PREFIX = "head_chunks"


def chunk_head_loss(model: onnx.ModelProto, label_smoothing: float, chunk_rows: int | None = None,
                    vocabulary_chunks: dict[str, list[tuple[str, int, int]]] | None = None) -> None:
    """Compute the graph's loss output (and, where the graph has it, the head input's gradient) in chunks.

    ``model``: the exported loss graph, ORT's eval model or ORT's training model, before
    spell_out_slow_kernels. ``label_smoothing``: the loss's, as exported (export.CausalLMLoss).
    ``chunk_rows``: at most this many rows a chunk (default CHUNK_ROWS). ``vocabulary_chunks``: for a head
    matrix [vocab, hidden] with row views (quantize.row_views), its chunks as (view name, start, end): each row
    chunk's logits are then computed and used a vocabulary chunk at a time (``_by_vocabulary_chunks``), and the
    views become graph inputs.
    """
    chunk_rows = chunk_rows or CHUNK_ROWS
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    loss_nodes = [n for n in graph.node if n.op_type == LOSS and n.domain in ("", "ai.onnx")]
    if len(loss_nodes) != 1:
        raise OrtloraError(f"the loss graph has {len(loss_nodes)} {LOSS} nodes, expected one (its head)")
    ce = loss_nodes[0]
    a = {x.name: helper.get_attribute_value(x) for x in ce.attribute}
    if a.get("reduction", b"mean") not in (b"mean", "mean") or len(ce.input) > 2 and ce.input[2]:
        raise OrtloraError(f"{LOSS}: only the mean without class weights is chunked")
    product = _through_reshapes(ce.input[0], producer)
    weights = weight_shapes(graph)
    if product is None or product.op_type not in PRODUCTS or len(weights.get(product.input[1], [])) != 2:
        raise OrtloraError("the loss is not computed on a product of the hidden rows with the LM head's weight")
    pa = {x.name: helper.get_attribute_value(x) for x in product.attribute}
    if pa.get("transA", 0) or pa.get("alpha", 1.0) != 1.0 or len(product.input) > 2:
        raise OrtloraError(f"the LM head's {product.op_type} has attributes the chunked loss does not take")
    rows, weight = product.input[0], product.input[1]
    transposed = product.op_type == "MatMul" or not pa.get("transB", 0)  # W stored [hidden, vocab]
    vocab, hidden = weights[weight][::-1] if transposed else weights[weight]
    loss = graph.output[0].name
    gradient = rows + "_grad" if rows + "_grad" in producer else None

    views = (vocabulary_chunks or {}).get(weight) if not transposed else None
    inputs = {i.name for i in graph.input}
    graph.input.extend(helper.make_tensor_value_info(view, TensorProto.FLOAT, [end - start, hidden])
                       for view, start, end in views or [] if view not in inputs)
    e = _Nodes()
    forward = _forward(e, rows, ce.input[1], weight, transposed, vocab, hidden, label_smoothing,
                       int(a.get("ignore_index", -100)), chunk_rows, with_gradient=gradient is not None, loss=loss,
                       views=views)
    backward = []
    if gradient is not None:
        seed = loss + "_grad"
        g = _Nodes(e.count)
        scale = g("Div", [seed, forward["count"]])
        g("Reshape", [g("Mul", [forward["gradient"], scale]), g("Shape", [rows])], [gradient])
        backward = g.nodes

    nodes = []
    for node in graph.node:
        if id(node) == id(producer[loss]):
            nodes += e.nodes
        elif gradient is not None and id(node) == id(producer[gradient]):
            nodes += backward
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(_without_dead_nodes(nodes, {o.name for o in graph.output}))


def _forward(e: "_Nodes", rows: str, targets: str, weight: str, transposed: bool, vocab: int, hidden: int,
             smoothing: float, ignore: int, chunk_rows: int, with_gradient: bool, loss: str,
             views: list[tuple[str, int, int]] | None = None) -> dict[str, str]:
    """The Loop and the loss; returns the names of the labelled-row count and (with_gradient) of the
    [N, hidden] gradient of the summed loss terms. ``views``: the head's chunks of rows, see chunk_head_loss."""
    flat = e("Reshape", [rows, e.const([-1, hidden])])
    count_rows = e("Shape", [targets])  # [N]
    chunks = e("Max", [e("Div", [e("Add", [count_rows, e.const([chunk_rows - 1])]), e.const([chunk_rows])]),
                       e.const([1])])
    size = e("Div", [e("Sub", [e("Add", [count_rows, chunks]), e.const([1])]), chunks])  # ceil(N / chunks)
    padding = e("Sub", [e("Mul", [chunks, size]), count_rows])
    zero = e.const([0])
    padded_rows = e("Pad", [flat, e("Concat", [zero, zero, padding, zero], axis=0)])
    padded_targets = e("Pad", [targets, e("Concat", [zero, padding], axis=0), e.const(ignore)])

    body = _Nodes(e.count)
    i, cond = f"{PREFIX}.iteration", f"{PREFIX}.condition"
    start = body("Mul", [body("Unsqueeze", [i, body.const([0])]), size])
    end = body("Add", [start, size])
    chunk = body("Slice", [padded_rows, start, end, body.const([0])])
    labels = body("Slice", [padded_targets, start, end, body.const([0])])
    valid = body("Not", [body("Equal", [labels, body.const([ignore])])])
    labels = body("Where", [valid, labels, body.const([0])])
    weight_of_row = body("Unsqueeze", [body("Cast", [valid], to=TensorProto.FLOAT), body.const([1])])  # [rows, 1]
    if views:
        picked, spread, prob_times_head = _by_vocabulary_chunks(body, chunk, labels, views, vocab, smoothing,
                                                                with_gradient)
    else:
        logits = body("MatMul", [chunk, weight]) if transposed else body("Gemm", [chunk, weight], transB=1)
        log_prob = body("LogSoftmax", [logits], axis=1)
        picked = body("GatherElements", [log_prob, body("Unsqueeze", [labels, body.const([1])])], axis=1)  # [rows, 1]
        spread = body("ReduceSum", [log_prob, body.const([1])], keepdims=1) if smoothing else None
    terms = body("Mul", [picked, body.const(-(1.0 - smoothing), np.float32)])
    if smoothing:
        terms = body("Sub", [terms, body("Mul", [spread, body.const(smoothing / vocab, np.float32)])])
    outputs = [body("Identity", [cond]), body("Mul", [terms, weight_of_row])]
    if with_gradient:
        if views:
            through_head = prob_times_head
        else:
            prob = body("Exp", [log_prob])
            if smoothing:
                prob = body("Sub", [prob, body.const(smoothing / vocab, np.float32)])
            through_head = body("Gemm", [prob, weight], transB=1) if transposed else body("MatMul", [prob, weight])
        if transposed:
            at_label = body("Transpose", [body("Gather", [weight, labels], axis=1)], perm=[1, 0])
        else:
            at_label = body("Gather", [weight, labels], axis=0)
        if smoothing:
            at_label = body("Mul", [at_label, body.const(1.0 - smoothing, np.float32)])
        outputs.append(body("Mul", [body("Sub", [through_head, at_label]), weight_of_row]))
    e.count = body.count
    float_rows = [helper.make_tensor_value_info(outputs[1], TensorProto.FLOAT, None)]
    if with_gradient:
        float_rows.append(helper.make_tensor_value_info(outputs[2], TensorProto.FLOAT, None))
    graph = helper.make_graph(
        body.nodes, f"{PREFIX}.body",
        [helper.make_tensor_value_info(i, TensorProto.INT64, []), helper.make_tensor_value_info(cond, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(outputs[0], TensorProto.BOOL, [])] + float_rows)
    stacked = [e.fresh() for _ in outputs[1:]]
    e("Loop", [e("Squeeze", [chunks, e.const([0])]), ""], stacked, body=graph)

    valid_rows = e("Cast", [e("Not", [e("Equal", [targets, e.const(ignore)])])], to=TensorProto.FLOAT)
    count = e("ReduceSum", [valid_rows, e.const([0])], keepdims=0)  # 0-d, as the exported loss
    e("Div", [e("Squeeze", [e("ReduceSum", [stacked[0]], keepdims=1)]), count], [loss])
    result = {"count": count}
    if with_gradient:
        gradient = e("Reshape", [stacked[1], e.const([-1, hidden])])
        result["gradient"] = e("Slice", [gradient, zero, count_rows, zero])
    return result


def _by_vocabulary_chunks(body: "_Nodes", chunk: str, labels: str, views: list[tuple[str, int, int]], vocab: int,
                          smoothing: float, with_gradient: bool) -> tuple[str, str | None, str | None]:
    """A row chunk's log-probability at each label [rows, 1], the sum of its log-probabilities over the vocabulary
    [rows, 1] (with ``smoothing``), and (``with_gradient``) (softmax - smoothing / vocab) @ W [rows, hidden], from
    the head's chunks of rows W_c (``views``: name, start, end) without a [rows, vocab] tensor: each chunk's
    logits z_c = chunk @ W_c^T are kept, and log-sum-exp is max + log(sum_c sum exp(z_c - max)). Against the whole
    product, concatenating the chunks' logits and a log-softmax over them: no concatenation, no [rows, vocab]
    log-probabilities or probabilities, and W_c read once for the logits and once for the gradient as before."""
    one = body.const([1])
    logits = [(body("Gemm", [chunk, view], transB=1), start, end) for view, start, end in views]
    top = body("Max", [body("ReduceMax", [z], axes=[1], keepdims=1) for z, _, _ in logits])  # [rows, 1]
    total = body("Sum", [body("ReduceSum", [body("Exp", [body("Sub", [z, top])]), one], keepdims=1)
                         for z, _, _ in logits])
    lse = body("Add", [top, body("Log", [total])])
    at_label = []  # each chunk's logit at the labels that fall in it, 0 elsewhere
    for z, start, end in logits:
        shifted = body("Sub", [labels, body.const(start)])
        inside = body("And", [body("GreaterOrEqual", [shifted, body.const(0)]),
                              body("Less", [shifted, body.const(end - start)])])
        index = body("Unsqueeze", [body("Where", [inside, shifted, body.const(0)]), one])
        at_label.append(body("Where", [body("Unsqueeze", [inside, one]),
                                       body("GatherElements", [z, index], axis=1), body.const(0.0, np.float32)]))
    picked = body("Sub", [body("Sum", at_label), lse])
    spread = body("Sub", [body("Sum", [body("ReduceSum", [z, one], keepdims=1) for z, _, _ in logits]),
                          body("Mul", [lse, body.const(float(vocab), np.float32)])]) if smoothing else None
    if not with_gradient:
        return picked, spread, None
    parts = []
    for (z, _, _), (view, _, _) in zip(logits, views):
        prob = body("Exp", [body("Sub", [z, lse])])
        if smoothing:
            prob = body("Sub", [prob, body.const(smoothing / vocab, np.float32)])
        parts.append(body("MatMul", [prob, view]))
    return picked, spread, body("Sum", parts)


class _Nodes:
    """Nodes with fresh names (no "/"), numbered on from ``count``."""

    def __init__(self, count: int = 0):
        self.nodes, self.count = [], count

    def fresh(self) -> str:
        self.count += 1
        return f"{PREFIX}.{self.count}"

    def __call__(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [self.fresh()]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{PREFIX}/{outputs[0]}", **attrs))
        return outputs[0]

    def const(self, value, dtype=np.int64) -> str:
        name = self.fresh()
        return self("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype=dtype), name))


def _through_reshapes(name: str, producer: dict) -> onnx.NodeProto | None:
    node = producer.get(name)
    while node is not None and node.op_type == "Reshape":
        node = producer.get(node.input[0])
    return node


def _without_dead_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose outputs nothing reads, repeatedly (the replaced loss's nodes)."""
    while True:
        read = set(outputs)
        for node in nodes:
            read.update(read_names(node))
        kept = [n for n in nodes if any(out in read for out in n.output if out)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept
