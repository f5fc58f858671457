"""Standard-ONNX spellings of the operators in ORT's gradient graph that plain ONNX Runtime lacks.

One function per operator: it receives the node and an Emitter and adds standard nodes that write the
node's outputs under their own names, so the rest of the graph is untouched. tests/test_portable.py
checks each against ORT's own kernel. portable_graph.py applies them to the whole training model.

The spellings keep to what the execution providers' ONNX readers take, not only to what the ONNX
standard allows: no ScatterND/ScatterElements with a ``reduction`` (OpenVINO's reader refuses
``add``), no reduction to a 0-d scalar (OpenVINO's provider leaves those to the CPU, which splits the
graph), and a few standard operators spelled for providers that lack them or compute them wrongly
(the last section). docs/providers.md lists what each provider was seen to take.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT64_MAX = np.iinfo(np.int64).max


class UnsupportedNode(ValueError):
    """A node of the gradient graph that no rewrite covers (or an attribute value it does not)."""


class Emitter:
    """Collects the standard nodes that replace one node; names are unique per replaced node.

    ``weights``: the dims of the graph's weights (initializers), where a rewrite can use them.

    ``distinct``: tensors known to hold indices without repeats (portable_graph.distinct_positions).
    """

    def __init__(self, node: onnx.NodeProto, weights: dict[str, list[int]] | None = None,
                 distinct: set[str] | frozenset[str] = frozenset()):
        self.node, self.nodes, self._count, self.weights, self.distinct = node, [], 0, weights or {}, distinct
        self._prefix = (node.name or node.output[0]) + "/portable"

    def fresh(self) -> str:
        self._count += 1
        return f"{self._prefix}_{self._count}"

    def __call__(self, op: str, inputs: list[str], outputs: list[str] | None = None, **attrs) -> str:
        """Add a node; returns the name of its first output (a fresh one unless given)."""
        outputs = outputs or [self.fresh()]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.fresh(), **attrs))
        return outputs[0]

    def const(self, value, dtype=np.int64) -> str:
        return self("Constant", [], value=numpy_helper.from_array(np.asarray(value, dtype=dtype), self.fresh()))

    def zeros(self, shape: str) -> str:
        return self("ConstantOfShape", [shape], value=numpy_helper.from_array(np.zeros(1, np.float32)))

    def sum_all(self, x: str, output: str | None = None) -> str:
        """The sum of every element, as a 0-d tensor: ReduceSum keeping the axes, then Squeeze.

        ReduceSum straight to a 0-d tensor is the same number, but OpenVINO's execution provider
        leaves reductions without output dimensions to the CPU, and every such node splits the graph
        into more partitions (reduce_to_scalar below).
        """
        return self("Squeeze", [self("ReduceSum", [x], keepdims=1)], [output] if output else None)

    def transpose_last_two(self, x: str) -> str:
        """[..., m, n] -> [..., n, m] for any rank >= 2, without knowing the rank."""
        shape = self("Shape", [x])
        batch = self("Shape", [x], start=0, end=-2)
        m_n = self("Shape", [x], start=-2)
        as_3d = self("Reshape", [x, self("Concat", [self.const([-1]), m_n], axis=0)])
        swapped = self("Transpose", [as_3d], perm=[0, 2, 1])
        n_m = self("Slice", [shape, self.const([-1]), self.const([-3]), self.const([0]), self.const([-1])])
        return self("Reshape", [swapped, self("Concat", [batch, n_m], axis=0)])


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds (a Loop's body, which reads tensors of the graph around it by name)."""
    return [attribute.g for attribute in node.attribute if attribute.type == onnx.AttributeProto.GRAPH]


def local_names(graph: onnx.GraphProto) -> set[str]:
    """The tensors a (sub)graph defines itself: its inputs, initializers and nodes' outputs."""
    return {i.name for i in graph.input} | {t.name for t in graph.initializer} | \
        {out for node in graph.node for out in node.output}


def read_names(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs and whatever its subgraphs (a Loop's body) read from outside."""
    names = [x for x in node.input if x]
    for inner in subgraphs(node):
        local = local_names(inner)
        names += [x for n in inner.node for x in read_names(n) if x not in local]
    return names


def weight_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """The dims of the graph's weights: its initializers, and the graph inputs of fixed shape (frozen weights
    still read as inputs before frozen_weights.attach)."""
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _input(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _live_output(node: onnx.NodeProto, i: int) -> str:
    return node.output[i] if len(node.output) > i else ""


def _require(condition: bool, node: onnx.NodeProto, what: str) -> None:
    if not condition:
        raise UnsupportedNode(f"{node.op_type} node {node.name!r}: {what} is not supported by the portable graph")


# -- rewrites: one function per operator, (node, emitter) -> nodes added to the emitter -----------

def concat_training(node, e: Emitter) -> None:
    axis = attrs(node)["axis"]
    e("Concat", list(node.input), [node.output[0]], axis=axis)
    if _live_output(node, 1):  # the length of every input along the axis, as SplitTraining wants it
        bounds = {"start": axis} if axis == -1 else {"start": axis, "end": axis + 1}
        lengths = [e("Shape", [x], **bounds) for x in node.input]
        e("Concat", lengths, [node.output[1]], axis=0)


def split_training(node, e: Emitter) -> None:
    e("Split", [node.input[0], _input(node, 1)], list(node.output), axis=attrs(node).get("axis", 0))


def slice_grad(node, e: Emitter) -> None:
    """dX = zeros(shape) with dY written where the forward Slice read.

    The positions are found by slicing a tensor of flat indices with the forward Slice's own
    starts/ends/axes/steps, so every form of Slice is covered.
    """
    dy, shape = node.input[0], node.input[1]
    count = e("ReduceProd", [shape], keepdims=1)
    flat_index = e("Range", [e.const(0), e("Squeeze", [count]), e.const(1)])
    index = e("Reshape", [flat_index, shape])
    picked = e("Slice", [index, *node.input[2:]])
    minus_one = e.const([-1])
    scattered = e("ScatterElements", [e.zeros(count), e("Reshape", [picked, minus_one]), e("Reshape", [dy, minus_one])], axis=0)
    e("Reshape", [scattered, shape], [node.output[0]])


def gather_grad(node, e: Emitter) -> None:
    """dX = zeros(shape) with the rows of dY added at the gathered indices (repeats add up).

    Indices known to be distinct (the labelled positions the loss graph gathers with NonZero, see
    portable_graph.distinct_positions) write each row once: a ScatterND without reduction, exact,
    and what every provider's reader takes (OpenVINO's refuses ScatterND with reduction="add"). Any
    other indices may repeat, and their rows are summed by a one-hot product (gather_grad_one_hot).
    """
    _require(attrs(node).get("axis", 0) == 0, node, "an axis other than 0")
    shape, indices, dy = node.input
    if indices in e.distinct:
        e("ScatterND", [e.zeros(shape), e("Unsqueeze", [indices, e.const([-1])]), dy], [node.output[0]])
    else:
        gather_grad_one_hot(node, e)


def gather_grad_one_hot(node, e: Emitter) -> None:
    """dX = onehot(indices)^T @ dY, with dY's rows flattened: [depth, n] @ [n, rest] -> [depth, rest].

    Equal to a scatter-add: the one-hot entries are exactly 1 and 0, so each product is a row of dY
    or zero, and each output row sums the same rows of dY a scatter-add would (in the matrix
    product's order: the last bit may differ where an index repeats). It holds a [depth, n] matrix
    (156 MB for a 151,936-entry vocabulary and 256 indices), which the portable graph never needs:
    its only gathers with a gradient are at distinct labelled positions, and the embedding's own
    gradient is pruned (no LoRA weight reads it). A non-finite value in dY spreads to every row
    (0 * inf is NaN), where a scatter-add would keep it to its own row; training stops on it either way.
    """
    shape, indices, dy = node.input
    depth = e("Slice", [shape, e.const([0]), e.const([1])])
    flat = e("Reshape", [indices, e.const([-1])])
    flat = e("Where", [e("Less", [flat, e.const(0)]), e("Add", [flat, depth]), flat])  # Gather takes negative indices
    positions = e("Range", [e.const(0), e("Squeeze", [depth]), e.const(1)])
    one_hot = e("Cast", [e("Equal", [e("Unsqueeze", [positions, e.const([1])]), e("Unsqueeze", [flat, e.const([0])])])],
                to=TensorProto.FLOAT)  # [depth, n]
    rest = e("ReduceProd", [e("Concat", [e("Slice", [shape, e.const([1]), e.const([INT64_MAX])]), e.const([1])], axis=0)],
             keepdims=1)  # elements per row; the 1 makes a 1-D data tensor's empty rest multiply to 1
    rows = e("Reshape", [dy, e("Concat", [e("Shape", [flat]), rest], axis=0)])
    e("Reshape", [e("MatMul", [one_hot, rows]), shape], [node.output[0]])


def label_rows(node, e: Emitter) -> tuple[str, str]:
    """The label column [N, 1] (ignored rows pointed at class 0) and each row's weight (1, or 0 if ignored)."""
    label = node.input[2] if node.op_type.endswith("Grad") else node.input[1]
    ignore_index = attrs(node).get("ignore_index")
    if ignore_index is None:
        valid = e("ConstantOfShape", [e("Shape", [label])], value=numpy_helper.from_array(np.ones(1, np.float32)))
    else:
        kept = e("Not", [e("Equal", [label, e.const(ignore_index)])])
        label = e("Where", [kept, label, e.const(0)])  # any class: the row's weight is 0
        valid = e("Cast", [kept], to=TensorProto.FLOAT)
    return e("Unsqueeze", [label, e.const([1])]), valid


def loss_reduction(node) -> str:
    reduction = attrs(node).get("reduction", b"mean")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    _require(reduction in ("mean", "sum", "none"), node, f"reduction {reduction!r}")
    return reduction


def softmax_cross_entropy_loss(node, e: Emitter) -> None:
    """loss = -log_softmax(scores)[label], reduced over rows; output 1 (if used) is the log_softmax.

    Scores are [N, classes], as the loss graph has them. Standard ONNX already has this operator;
    it is spelled out because ONNX Runtime's kernel for it runs on one thread: 215 ms against 13 ms
    for LogSoftmax on a [256, 151936] batch with 2 threads (onnxruntime 1.19; 55 against 18 in 1.32).
    """
    _require(len([i for i in node.input[2:] if i]) == 0, node, "a class weight input")
    reduction = loss_reduction(node)
    log_prob = e("LogSoftmax", [node.input[0]], [_live_output(node, 1) or e.fresh()], axis=1)
    column, valid = label_rows(node, e)
    picked = e("Mul", [e("Squeeze", [e("GatherElements", [log_prob, column], axis=1), e.const([1])]), valid])
    if reduction == "none":
        e("Sub", [e.const(0.0, np.float32), picked], [node.output[0]])
        return
    total = e.sum_all(picked)
    divisor = e("Sub", [e.const(0.0, np.float32), e.sum_all(valid)]) if reduction == "mean" \
        else e.const(-1.0, np.float32)
    e("Div", [total, divisor], [node.output[0]])


def softmax_cross_entropy_loss_grad(node, e: Emitter) -> None:
    """d logits = (softmax - onehot(label)) * dY, zero on ignored rows, / count for 'mean'.

    Written as softmax with 1 subtracted at each row's label (ScatterElements), scaled per row:
    three [N, vocab] tensors, the fewest d logits itself takes. Where d logits only feeds the LM
    head's product, head_gradient.py skips it altogether.
    """
    _require(len([i for i in node.input[3:] if i]) == 0, node, "a weight or bias input")
    dy, log_prob = node.input[:2]
    reduction = loss_reduction(node)
    prob = e("Exp", [log_prob])
    column, valid = label_rows(node, e)
    at_label = e("Sub", [e("GatherElements", [prob, column], axis=1), e.const(1.0, np.float32)])
    diff = e("ScatterElements", [prob, column, at_label], axis=1)
    # 'mean': dY / (labelled rows); 'sum': dY; 'none': dY is per row.
    scale = e("Div", [dy, e.sum_all(valid)]) if reduction == "mean" else dy
    row_scale = e("Mul", [valid, scale])
    e("Mul", [diff, e("Unsqueeze", [row_scale, e.const([1])])], [node.output[0]])


def softmax_grad_13(node, e: Emitter) -> None:
    """Y = softmax(X): dX = Y * (dY - sum(dY * Y, axis))."""
    dy, y = node.input[:2]
    axis = e.const([attrs(node).get("axis", -1)])
    inner = e("ReduceSum", [e("Mul", [dy, y]), axis], keepdims=1)
    e("Mul", [y, e("Sub", [dy, inner])], [node.output[0]])


def log_softmax_grad_13(node, e: Emitter) -> None:
    """Y = log_softmax(X): dX = dY - exp(Y) * sum(dY, axis)."""
    dy, y = node.input[:2]
    axis = e.const([attrs(node).get("axis", -1)])
    e("Sub", [dy, e("Mul", [e("Exp", [y]), e("ReduceSum", [dy, axis], keepdims=1)])], [node.output[0]])


def quick_gelu(node, e: Emitter) -> None:
    """Y = X * sigmoid(alpha * X) (SiLU when alpha is 1)."""
    x = node.input[0]
    alpha = attrs(node).get("alpha", 1.702)
    scaled = x if alpha == 1.0 else e("Mul", [x, e.const(alpha, np.float32)])
    e("Mul", [x, e("Sigmoid", [scaled])], [node.output[0]])


def quick_gelu_grad(node, e: Emitter) -> None:
    """dX = dY * s * (1 + alpha * X * (1 - s)), s = sigmoid(alpha * X)."""
    dy, x = node.input[:2]
    alpha = attrs(node).get("alpha", 1.702)
    scaled = x if alpha == 1.0 else e("Mul", [x, e.const(alpha, np.float32)])
    s = e("Sigmoid", [scaled])
    one = e.const(1.0, np.float32)
    inner = e("Add", [one, e("Mul", [scaled, e("Sub", [one, s])])])
    e("Mul", [dy, e("Mul", [s, inner])], [node.output[0]])


def simplified_layer_norm(node, e: Emitter) -> None:
    """RMSNorm: Y = X * inv * scale, inv = 1 / sqrt(mean(X^2, last axis) + eps); inv is output 1."""
    a = attrs(node)
    _require(a.get("axis", -1) == -1, node, f"axis {a.get('axis')}")
    x, scale = node.input[:2]
    mean_square = e("ReduceMean", [e("Mul", [x, x])], axes=[-1], keepdims=1)
    inv_name = _live_output(node, 1) or e.fresh()
    inv = e("Reciprocal", [e("Sqrt", [e("Add", [mean_square, e.const(a.get("epsilon", 1e-5), np.float32)])])], [inv_name])
    e("Mul", [e("Mul", [x, inv]), scale], [node.output[0]])


def simplified_layer_norm_grad(node, e: Emitter) -> None:
    """dX = inv * (g - x_hat * mean(g * x_hat)), g = dY * scale, x_hat = X * inv (last axis)."""
    a = attrs(node)
    _require(a.get("axis", -1) == -1, node, f"axis {a.get('axis')}")
    _require(not _live_output(node, 1), node, "the gradient of a trainable norm scale")
    dy, x, scale, inv = node.input[:4]
    x_hat = e("Mul", [x, inv])
    g = e("Mul", [dy, scale])
    mean = e("ReduceMean", [e("Mul", [g, x_hat])], axes=[-1], keepdims=1)
    e("Mul", [inv, e("Sub", [g, e("Mul", [x_hat, mean])])], [node.output[0]])


def fused_matmul(node, e: Emitter) -> None:
    """alpha * op(A) @ op(B), op transposing the last two axes where transA/transB say so.

    The backward pass multiplies by every frozen weight transposed (dX = dY @ W^T). Spelled as a
    Transpose of the weight, ONNX Runtime would fold it into a transposed copy of every weight, so
    a 2-D weight B goes into a Gemm with transB=1 instead (A flattened to 2-D around it).
    """
    a = attrs(node)
    _require(not a.get("transBatchA") and not a.get("transBatchB"), node, "transBatchA/transBatchB")
    left, right = node.input[:2]
    left = e.transpose_last_two(left) if a.get("transA") else left
    alpha = a.get("alpha", 1.0)
    if a.get("transB") and len(e.weights.get(right, ())) == 2:
        rows = e("Reshape", [left, e.const([-1, e.weights[right][1]])])
        product = times_weight_transposed(e, rows, right, alpha)
        shape = e("Concat", [e("Shape", [left], start=0, end=-1), e.const([e.weights[right][0]])], axis=0)
        e("Reshape", [product, shape], [node.output[0]])
        return
    right = e.transpose_last_two(right) if a.get("transB") else right
    if alpha == 1.0:
        e("MatMul", [left, right], [node.output[0]])
    else:
        e("Mul", [e("MatMul", [left, right]), e.const(alpha, np.float32)], [node.output[0]])


def dropout_grad(node, e: Emitter) -> None:
    """dX = dY * mask / (1 - ratio). As ORT's kernel, whatever training_mode says: a forward pass
    in evaluation mode has an all-true mask."""
    dy, mask = node.input[:2]
    ratio = _input(node, 2) or e.const(0.5, np.float32)
    one = e.const(1.0, np.float32)
    keep_scale = e("Div", [one, e("Sub", [one, e("Cast", [ratio], to=TensorProto.FLOAT)])])
    e("Mul", [e("Mul", [dy, e("Cast", [mask], to=TensorProto.FLOAT)]), keep_scale], [node.output[0]])


def dropout(node, e: Emitter) -> None:
    """Dropout with a training_mode input: keep = not training or u >= ratio for u ~ U[0, 1),
    Y = X * keep * (1 / (1 - ratio) if training else 1); the mask output is keep.

    ONNX's definition, with the random draw as its own node: OpenVINO's reader refuses Dropout in
    training mode, and its provider takes no random operator, so RandomUniformLike runs on the CPU
    and the rest on the provider. Without a training_mode input Dropout is the identity and stays.
    """
    if not _input(node, 2):
        e.nodes.append(node)
        return
    x = node.input[0]
    ratio = e("Cast", [_input(node, 1) or e.const(0.5, np.float32)], to=TensorProto.FLOAT)
    training = e("Cast", [node.input[2]], to=TensorProto.BOOL)
    drawn = e("RandomUniformLike", [x], dtype=TensorProto.FLOAT)
    keep = e("Or", [e("Not", [training]), e("GreaterOrEqual", [drawn, ratio])], [_live_output(node, 1) or e.fresh()])
    one = e.const(1.0, np.float32)
    factor = e("Where", [training, e("Div", [one, e("Sub", [one, ratio])]), one])
    e("Mul", [e("Mul", [x, e("Cast", [keep], to=TensorProto.FLOAT)]), factor], [node.output[0]])


def scale(node, e: Emitter) -> None:
    x, factor = node.input[:2]
    factor = e("Cast", [factor], to=TensorProto.FLOAT)
    e("Div" if attrs(node).get("scale_down") else "Mul", [x, factor], [node.output[0]])


# -- standard operators, spelled for the providers ------------------------------------------------

# Standard operators that accelerator providers often lack (CoreML takes neither), spelled with
# ones they take: Sum as a chain of Add (the order Sum adds in), Neg as x - (x + x), which is exact
# (doubling is) and needs no constant of the input's type.
def sum_as_adds(node, e: Emitter) -> None:
    total = node.input[0]
    for i, term in enumerate(node.input[1:], start=2):
        total = e("Add", [total, term], [node.output[0]] if i == len(node.input) else None)
    if len(node.input) == 1:
        e("Identity", [total], [node.output[0]])


def neg_as_sub(node, e: Emitter) -> None:
    x = node.input[0]
    e("Sub", [x, e("Add", [x, x])], [node.output[0]])


def reduce_to_scalar(node, e: Emitter) -> None:
    """A reduction over every axis to a 0-d tensor, as the reduction keeping its axes, then Squeeze.

    The same numbers. OpenVINO's execution provider (onnxruntime-openvino 1.24) takes ReduceSum and
    ReduceMean only where the output has a dimension and leaves the others to the CPU provider; each
    such node cuts the graph into more partitions, and at such cuts it failed to hand back tensors
    it had folded to constants (portable_graph.names_without_slash). Reductions with axes, or
    keeping them, stay as they are.
    """
    a = attrs(node)
    reduces_all = len(node.input) < 2 or not node.input[1]  # no axes input (ReduceSum since opset 13)
    if a.get("keepdims", 1) or not reduces_all or "axes" in a or a.get("noop_with_empty_axes", 0):
        e.nodes.append(node)
        return
    kept = {k: v for k, v in a.items() if k != "keepdims"}
    e("Squeeze", [e(node.op_type, [node.input[0]], keepdims=1, **kept)], [node.output[0]])


def size_as_shape_product(node, e: Emitter) -> None:
    """Size(X) as the product of Shape(X), kept 1-D and squeezed to the 0-d count Size gives.

    ORT's gradient of a mean (label smoothing's mean over the vocabulary) divides by Size, whose 0-d
    output OpenVINO's provider leaves to the CPU (see reduce_to_scalar).
    """
    e("Squeeze", [e("ReduceProd", [e("Shape", [node.input[0]])], keepdims=1)], [node.output[0]])


def times_weight_transposed(e: Emitter, rows: str, weight: str, alpha: float = 1.0, output: str | None = None) -> str:
    """rows @ W^T for a 2-D frozen weight W: a Gemm with transB=1, or for a square W, (W @ rows^T)^T.

    The backward pass multiplies by every frozen weight transposed (dX = dY @ W^T) while the forward
    pass multiplies by it as it is. OpenVINO's CPU plugin (2025.4, in onnxruntime-openvino 1.24)
    gets the transposed product wrong when W is square (q_proj and o_proj): it gives dY @ W, as if
    it reused the copy of W it repacked for the forward product (seen on a two-node graph, x @ W and
    Gemm(dY, W, transB=1); non-square weights come out right). Spelled with W untransposed on
    the left, the product is right on every provider; the price is two transposes of the activations
    ([rows, hidden]; ONNX Runtime's CPU provider folds the first into its matrix product), where a
    Transpose of W itself would make ONNX Runtime fold a transposed copy of every weight.
    """
    dims = e.weights.get(weight, [])
    if len(dims) != 2 or dims[0] != dims[1]:
        return e("Gemm", [rows, weight], [output] if output else None, transB=1, alpha=alpha)
    product = e("MatMul", [weight, e("Transpose", [rows], perm=[1, 0])])
    if alpha == 1.0:
        return e("Transpose", [product], [output] if output else None, perm=[1, 0])
    return e("Mul", [e("Transpose", [product], perm=[1, 0]), e.const(alpha, np.float32)], [output] if output else None)


def gemm(node, e: Emitter) -> None:
    """A Gemm by a square frozen weight transposed (ORT's gradient of x @ W) as times_weight_transposed;
    any other Gemm as it is."""
    a = attrs(node)
    weight = node.input[1]
    dims = e.weights.get(weight, [])
    square = len(dims) == 2 and dims[0] == dims[1]
    if not (square and a.get("transB") and not a.get("transA") and (len(node.input) < 3 or not node.input[2])):
        e.nodes.append(node)
        return
    times_weight_transposed(e, node.input[0], weight, a.get("alpha", 1.0), node.output[0])


# Standard operators that some node spellings or providers need spelled otherwise; rewrite_node
# leaves a node of these types as it is where its function says so.
PROVIDER_SPELLINGS: dict[str, Callable[[onnx.NodeProto, Emitter], None]] = {
    "Sum": sum_as_adds,
    "Neg": neg_as_sub,
    "ReduceSum": reduce_to_scalar,
    "ReduceMean": reduce_to_scalar,
    "Size": size_as_shape_product,
    "Gemm": gemm,
}

REWRITES: dict[str, Callable[[onnx.NodeProto, Emitter], None]] = {
    **PROVIDER_SPELLINGS,
    "ConcatTraining": concat_training,
    "SplitTraining": split_training,
    "SliceGrad": slice_grad,
    "GatherGrad": gather_grad,
    "SoftmaxCrossEntropyLoss": softmax_cross_entropy_loss,
    "SoftmaxCrossEntropyLossGrad": softmax_cross_entropy_loss_grad,
    "SoftmaxGrad_13": softmax_grad_13,
    "LogSoftmaxGrad_13": log_softmax_grad_13,
    "QuickGelu": quick_gelu,
    "QuickGeluGrad": quick_gelu_grad,
    "SimplifiedLayerNormalization": simplified_layer_norm,
    "SimplifiedLayerNormalizationGrad": simplified_layer_norm_grad,
    "FusedMatMul": fused_matmul,
    "Dropout": dropout,
    "DropoutGrad": dropout_grad,
    "Scale": scale,
}


def is_standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type not in REWRITES


def rewrite_node(node: onnx.NodeProto, weights: dict[str, list[int]] | None = None,
                 distinct: set[str] | frozenset[str] = frozenset()) -> list[onnx.NodeProto]:
    """The standard nodes that compute ``node``'s outputs (the node itself if it is standard).

    ``weights``: dims of the graph's initializers by name, which some rewrites use. ``distinct``:
    tensors known to hold indices without repeats.
    """
    if is_standard(node):
        return [node]
    if node.op_type not in REWRITES:
        raise UnsupportedNode(f"{node.domain}.{node.op_type} (node {node.name!r}) has no portable rewrite")
    emitter = Emitter(node, weights, distinct)
    REWRITES[node.op_type](node, emitter)
    return emitter.nodes
