"""A quantized frozen base: blockwise int8 or int4 matrices, dequantized where each product uses them.

Every frozen matrix (the linear layers' weights, the embedding and an untied LM head) is stored as
the checkpoint lays it out, [out, in], in blocks of ``block`` consecutive inputs that share a float32
scale: symmetric, q = round(w / scale) with scale = max |w| / qmax over the block (qmax 127 for int8,
7 for int4). The norms and biases stay float32. ``frozen_weights.bin`` holds ``NAME.q`` and ``NAME.scale``
([out, in / block]) for each matrix: int8, or int4 stored as q + 8 in uint4 (two to a byte) with
``NAME.zero_point`` 8, which is also the layout of ONNX Runtime's MatMulNBits.

In the graphs, each reader of a matrix gets a DequantizeLinear (opset 21, block_size, axis 1) of its
own: the forward product, and in the training graph the backward's input-gradient product too
(``dequantize_per_use``), so no float32 copy of a matrix lives longer than the product that needs it. The
vocabulary-sized int8 matrices are read in chunks of rows, each scaled by a Cast and a Mul (the same values,
1.4 to 2.7x faster than ONNX Runtime's blocked DequantizeLinear).
The embedding's Gather reads quantized rows and dequantizes those alone. ONNX Runtime computes the
products in float32 on the dequantized values: loss and gradients equal PyTorch's on the same
dequantized weights (tests/test_quantized.py).

Why axis 1 and [out, in]: blocks must run along the product's inner dimension, and ONNX Runtime
(1.19.2 and 1.32.0 alike) dequantizes blocked int4 along axis 0 wrongly (errors of the size of a
quantization step; axis 1 is exact), so matrices are not stored transposed as the float32 base is.

A bf16 base (``--base-precision bf16``) stores each matrix as bfloat16, laid out as the float32 base lays it
out (transposed where every reader transposes it) but for the vocabulary matrices, which keep [vocab, hidden]
so that they are read by rows and in chunks as the int8 ones are. Each reader gets a Cast to float32 of its
own (``_widened``), ordered after the product's other operand as the dequantizations are: bfloat16 widens to
float32 exactly, so ONNX Runtime computes on the very values PyTorch computes on after ``weight.float()``.

A vocabulary matrix's chunks of rows are initializers of their own, row views of the same bytes of
``frozen_weights.bin`` (``row_views``; the manifest's ``frozen_views``): ONNX Runtime's Slice copies, so slicing
the whole matrix cost a copy of every chunk before it was widened (0.5B bf16 base: 129 ms a step). The chunked
loss reads a float32 head by the same views (chunked_loss.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ortlora.build.portable_ops import read_names, subgraphs

PRECISIONS = ("fp32", "bf16", "int8", "int4")
BF16 = "bf16"
BLOCK_SIZE = 32
OPSET = 21  # DequantizeLinear with block_size
QMAX = {"int8": 127, "int4": 7}
# How each precision is stored: int4 as unsigned 4-bit values q + 8 with zero point 8, the layout ONNX Runtime's
# MatMulNBits reads, so the generation graphs multiply by the very bytes the training graphs dequantize.
STORED = {"int8": "int8", "int4": "uint4"}
ONNX_TYPES = {"int8": TensorProto.INT8, "uint4": TensorProto.UINT4, "uint8": TensorProto.UINT8,
              "float32": TensorProto.FLOAT, "bfloat16": TensorProto.BFLOAT16}
PRECISION_OF = {TensorProto.INT8: "int8", TensorProto.UINT4: "int4"}
ZERO_POINT = ".zero_point"  # uint4 [out, in / block], all 8
PACKED = ".packed"  # an int4 matrix's bytes as uint8 [out, in / block, block / 2], for MatMulNBits
QUANTIZED = ".q"
SCALE = ".scale"
INT8_SHAPES = "quantize/int8"  # Constants of the shapes _scaled_int8 reshapes to
BF16_SHAPE = "quantize/bf16/matrix"  # the Constant [0, -1] _widened reshapes to


def is_quantized(shape: tuple[int, ...], precision: str) -> bool:
    """Whether a frozen weight of ``shape`` is quantized (int8 / int4): matrices are, vectors (norms, biases)
    are not."""
    return precision in QMAX and len(shape) == 2


def quantize(values: np.ndarray, precision: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows [rows, in] -> (q int8 [rows, in], scale float32 [rows, in / block])."""
    rows, width = values.shape
    blocks = values.reshape(rows, width // block, block)
    scale = np.abs(blocks).max(axis=2) / np.float32(QMAX[precision])
    scale[scale == 0] = 1.0  # an all-zero block: any scale gives back zeros
    q = np.rint(blocks / scale[:, :, None]).clip(-QMAX[precision] - (precision == "int4"), QMAX[precision])
    return q.astype(np.int8).reshape(rows, width), scale.astype(np.float32)


def dequantize(q: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    rows, width = q.shape
    return (q.reshape(rows, width // block, block).astype(np.float32) * scale[:, :, None]).reshape(rows, width)


def pack_uint4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] -> their unsigned form q + 8, two to a byte, the first in the low four bits
    (ONNX's UINT4 layout, and MatMulNBits' with its default zero point 8)."""
    pairs = (q.astype(np.int16) + 8).astype(np.uint8).reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).astype(np.uint8)


def unpack_uint4(packed: np.ndarray, count: int) -> np.ndarray:
    """The inverse of pack_uint4: the signed values."""
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:count]
    return (values.astype(np.int16) - 8).astype(np.int8)


# Reductions whose axes moved from an attribute to an input at opset 18 (ReduceSum did at 13).
AXES_AS_INPUT = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                 "ReduceLogSumExp", "ReduceSumSquare")


def raise_opset(model: onnx.ModelProto) -> None:
    """Bring the model's standard operators to OPSET, which DequantizeLinear's blocks need.

    Between the export's opset 17 and 21, the only change our graphs meet is that reductions take
    their axes as an input from 18 on; every other operator they use only gained types. ONNX's own
    version converter does the same but stops at the contrib operators of ORT's training graphs. Nodes
    added later in the opset-17 spelling (portable_ops' rewrites) are brought along by calling it again.
    """
    next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = OPSET
    _axes_as_inputs(model.graph)


def _axes_as_inputs(graph: onnx.GraphProto) -> None:
    """raise_opset's rewrite of ``graph`` and of its subgraphs (the chunked loss's Loop body)."""
    nodes = []
    for node in graph.node:
        for inner in subgraphs(node):
            _axes_as_inputs(inner)
        axes = next((a for a in node.attribute if a.name == "axes"), None)
        if node.domain in ("", "ai.onnx") and node.op_type in AXES_AS_INPUT and axes is not None:
            name = f"{node.name or node.output[0]}/axes"
            nodes.append(helper.make_node("Constant", [], [name], name=name,
                                          value=helper.make_tensor(name, TensorProto.INT64, [len(axes.ints)], axes.ints)))
            node.attribute.remove(axes)
            node.input.append(name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _zero_point(name: str, matrices: dict[str, tuple[str, int]]) -> list[str]:
    return [name + ZERO_POINT] if matrices[name][0] == "int4" else []


def _nbits_product(node: onnx.NodeProto, k: int, matrix: tuple[str, int]) -> bool:
    """A Gemm computing x @ W^T with an int4 matrix W (no bias, no scaling), in blocks MatMulNBits takes."""
    precision, block = matrix
    if precision != "int4" or node.op_type != "Gemm" or k != 1 or len(node.input) != 2 or block < 16 or block & (block - 1):
        return False
    return (_attr(node, "transB", 0) == 1 and not _attr(node, "transA", 0) and _attr(node, "alpha", 1.0) == 1.0)


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def dequantize_per_use(model: onnx.ModelProto, matrices: dict[str, tuple[str, int]], fused_products: bool = False) -> int:
    """Replace every read of a quantized matrix (the graph input NAME; ``matrices``: NAME -> (precision,
    block)) by a DequantizeLinear of NAME.q and NAME.scale of its own; a Gather of rows (the embedding)
    gathers quantized rows and their scales and dequantizes those. The NAME inputs become NAME.q and
    NAME.scale inputs (and NAME.zero_point for int4), and the model goes to OPSET.

    ``fused_products`` (graphs without gradients: inference, generation): an int4 matrix's product x @ W^T
    is ONNX Runtime's MatMulNBits on its bytes (NAME.packed), which dequantizes inside the product instead of
    writing a float32 copy of the matrix first (0.5B int4 generation, 2 threads: 1.3 -> 3.6 tokens/s; then
    9.2 with the int8 LM head's chunks scaled by Cast and Mul, _scaled_int8; fp32 base 14.0).
    Returns how many readers were rewritten."""
    if any(precision != BF16 for precision, _ in matrices.values()):
        raise_opset(model)  # bf16 matrices need nothing past the export's opset
    graph = model.graph
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    count, shape_constants, packed, int8_blocks, viewed = 0, {}, set(), set(), set()

    def rewrite(graph_nodes) -> list[onnx.NodeProto]:
        nonlocal count
        nodes = []
        for node in graph_nodes:
            for inner in subgraphs(node):  # a Loop's body (chunked_loss) reads the matrices from outside
                rewritten = rewrite(inner.node)
                del inner.node[:]
                inner.node.extend(rewritten)
            for k, name in enumerate(node.input):
                if name not in matrices:
                    continue
                count += 1
                out, block = f"{name}/dequantized_{count}", matrices[name][1]
                # Gathered rows are dequantized alone. ONNX Runtime gathers no int4, which is why the vocabulary
                # matrices, the ones read by rows, are int8 in an int4 base (frozen_weights.plan); an int4 matrix
                # that is gathered all the same is dequantized whole.
                if node.op_type == "Gather" and k == 0 and _attr(node, "axis", 0) == 0 and matrices[name][0] == BF16:
                    nodes += [helper.make_node("Gather", [name, node.input[1]], [f"{out}/rows"], axis=0),
                              helper.make_node("Cast", [f"{out}/rows"], [node.output[0]], to=TensorProto.FLOAT, name=out)]
                    node = None
                    break
                if node.op_type == "Gather" and k == 0 and _attr(node, "axis", 0) == 0 and matrices[name][0] != "int4":
                    rows_q, rows_scale = f"{name}/rows_{count}.q", f"{name}/rows_{count}.scale"
                    nodes += [helper.make_node("Gather", [name + QUANTIZED, node.input[1]], [rows_q], axis=0),
                              helper.make_node("Gather", [name + SCALE, node.input[1]], [rows_scale], axis=0),
                              helper.make_node("DequantizeLinear", [rows_q, rows_scale], [node.output[0]], axis=-1,
                                               block_size=block, name=out)]
                    node = None
                    break
                scale = name + SCALE
                anchor = next((x for j, x in enumerate(node.input) if j != k and x and x not in matrices), None)
                if fused_products and _nbits_product(node, k, matrices[name]):
                    out_features, in_features = shapes[name]
                    nodes.append(helper.make_node("MatMulNBits", [node.input[0], name + PACKED, name + SCALE],
                                                  [node.output[0]], name=out, domain="com.microsoft", K=in_features,
                                                  N=out_features, bits=4, block_size=block, accuracy_level=0))
                    packed.add(name)
                    node = None
                    break
                if anchor is not None and matrices[name][0] in ("int8", BF16) and _chunkable(node, k, shapes[name][0]):
                    nodes += _product_in_row_chunks(node, name, matrices[name], anchor, shapes[name][0], out)
                    viewed.add(name)
                    node = None
                    break
                if matrices[name][0] == BF16:
                    if anchor is None:
                        nodes.append(helper.make_node("Cast", [name], [out], to=TensorProto.FLOAT, name=out))
                    else:
                        nodes += _widened(name, out, anchor)
                        shape_constants[BF16_SHAPE] = [0, -1]
                    node.input[k] = out
                    continue
                if anchor is not None and matrices[name][0] == "int8":  # DequantizeLinear's values, faster
                    nodes += [*_shape_after(f"{INT8_SHAPES}/blocks{block}", anchor, out, f"{out}/blocks_shape"),
                              *_scaled_int8(name + QUANTIZED, name + SCALE, out, f"{out}/blocks_shape",
                                            f"{INT8_SHAPES}/column", f"{INT8_SHAPES}/matrix")]
                    int8_blocks.add(block)
                    node.input[k] = out
                    continue
                if anchor is not None:  # run the dequantization when the product's other operand is ready (see below)
                    scale = f"{out}/scale"
                    nodes += [*_shape_after(f"{name}/scale_shape", anchor, out, f"{out}/shape"),
                              helper.make_node("Reshape", [name + SCALE, f"{out}/shape"], [scale])]
                    shape_constants[f"{name}/scale_shape"] = [shapes[name][0], shapes[name][1] // block]
                nodes.append(helper.make_node("DequantizeLinear", [name + QUANTIZED, scale, *_zero_point(name, matrices)],
                                              [out], axis=1, block_size=block, name=out))
                node.input[k] = out
            if node is not None:
                nodes.append(node)
        return nodes

    nodes = rewrite(graph.node)
    # A DequantizeLinear of initializers alone may run at any time, and ONNX Runtime runs such nodes early:
    # every float32 matrix then lived from the start of the step to its product (0.5B int4: 4.9 GB peak, more
    # than the float32 base's 3.3). Reading the scales through a Reshape to their own shape, whose shape
    # input includes an empty slice of the other operand's Shape, ties each one to its product (the scales,
    # since ONNX Runtime 1.19 reshapes no int4).
    # An int8 matrix is read the same way, through a Reshape of its quantized values to [rows, blocks, block]
    # whose shape ends in that empty slice (_scaled_int8).
    shape_constants.update({f"{INT8_SHAPES}/blocks{block}": [0, -1, block] for block in int8_blocks})
    if int8_blocks:
        shape_constants.update({f"{INT8_SHAPES}/column": [0, -1, 1], f"{INT8_SHAPES}/matrix": [0, -1]})
    constants = [helper.make_node("Constant", [], [name], name=name,
                                  value=helper.make_tensor(name, TensorProto.INT64, [len(dims)], dims))
                 for name, dims in sorted(shape_constants.items())]
    del graph.node[:]
    graph.node.extend(constants + nodes)
    inputs = []
    for value in graph.input:
        if value.name not in matrices:
            inputs.append(value)
            continue
        out_features, in_features = shapes[value.name]
        precision, block = matrices[value.name]
        views = [(row_view(value.name, start, end), end - start)
                 for start, end in row_chunks(out_features)] if value.name in viewed else []
        if precision == BF16:
            inputs += [helper.make_tensor_value_info(name, TensorProto.BFLOAT16, [rows, in_features])
                       for name, rows in [(value.name, out_features), *views]]
            continue
        inputs += [value for view, rows in views for value in (
            helper.make_tensor_value_info(view + QUANTIZED, ONNX_TYPES[STORED[precision]], [rows, in_features]),
            helper.make_tensor_value_info(view + SCALE, TensorProto.FLOAT, [rows, in_features // block]))]
        inputs += [helper.make_tensor_value_info(value.name + QUANTIZED, ONNX_TYPES[STORED[precision]],
                                                 [out_features, in_features]),
                   helper.make_tensor_value_info(value.name + SCALE, TensorProto.FLOAT,
                                                 [out_features, in_features // block])]
        if precision == "int4":
            inputs.append(helper.make_tensor_value_info(value.name + ZERO_POINT, TensorProto.UINT4,
                                                        [out_features, in_features // block]))
        if value.name in packed:
            inputs.append(helper.make_tensor_value_info(value.name + PACKED, TensorProto.UINT8,
                                                        [out_features, in_features // block, block // 2]))
    # A matrix read in chunks alone (an untied head outside the training graphs) is no input of its own, only its
    # row views are: of the stored tensors, the graph keeps the ones a node reads.
    read = {name for node in graph.node for name in read_names(node)}
    others = {value.name for value in graph.input if value.name not in matrices}
    del graph.input[:]
    graph.input.extend(value for value in inputs if value.name in others or value.name in read)
    return count


# A matrix with this many rows or more (the vocabulary's) is dequantized for its products a chunk of rows
# at a time: whole, Qwen2.5's head is 545 MB of float32 at 0.5B and 2.2 GB at 7B, held in the forward pass
# and again in the backward.
CHUNK_ROWS = 16384


def row_chunks(rows: int) -> list[tuple[int, int]]:
    """The [start, end) row ranges a matrix of ``rows`` rows is read in: chunks of CHUNK_ROWS, for a matrix of
    at least two chunks (the vocabulary's), else none."""
    if rows < 2 * CHUNK_ROWS:
        return []
    return [(start, min(start + CHUNK_ROWS, rows)) for start in range(0, rows, CHUNK_ROWS)]


def row_view(name: str, start: int, end: int) -> str:
    """The name of the rows [start, end) of the stored matrix NAME (for an int8 one, of NAME.q and NAME.scale
    both: ``row_view(NAME, ...) + QUANTIZED``)."""
    return f"{name}.rows{start}_{end}"


def row_views(places: dict[str, dict]) -> dict[str, dict]:
    """View name -> {"of": stored tensor, "rows": [start, end]} for every chunk of rows of the vocabulary-sized
    matrices stored [vocab, hidden] (which _product_in_row_chunks and the chunked loss read in chunks): a float32
    or bf16 matrix NAME, or an int8 one's NAME.q and NAME.scale."""
    views = {}
    for name, place in places.items():
        suffix = next((s for s in (QUANTIZED, SCALE) if name.endswith(s)
                       and places.get(name[: -len(s)] + QUANTIZED, {}).get("dtype") == "int8"), "")
        if not (suffix or place["dtype"] in ("bfloat16", "float32")) or len(place["shape"]) != 2:
            continue
        matrix = name[: len(name) - len(suffix)]
        for start, end in row_chunks(place["shape"][0]):
            views[row_view(matrix, start, end) + suffix] = {"of": name, "rows": [start, end]}
    return views


def chunks_by_matrix(views: dict[str, dict]) -> dict[str, list[tuple[str, int, int]]]:
    """Matrix (a graph's input name) -> its row views as (name, start, end), from ``row_views``' result: a bf16
    matrix's views, or an int8 one's by the name whose .q and .scale they are."""
    result: dict[str, list[tuple[str, int, int]]] = {}
    for name, view in views.items():
        if not name.endswith(SCALE):
            matrix, (start, end) = view["of"].removesuffix(QUANTIZED), view["rows"]
            result.setdefault(matrix, []).append((row_view(matrix, start, end), start, end))
    return result


def _chunkable(node: onnx.NodeProto, k: int, rows: int) -> bool:
    if not row_chunks(rows) or k != 1 or node.op_type not in ("Gemm", "MatMul", "FusedMatMul"):
        return False
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    plain = not a.get("transA", 0) and not a.get("transBatchA", 0) and not a.get("transBatchB", 0) \
        and a.get("alpha", 1.0) == 1.0
    return plain and len(node.input) == 2 and (node.op_type == "Gemm" or not a.get("transB", 0))


def _product_in_row_chunks(node: onnx.NodeProto, name: str, matrix: tuple[str, int], anchor: str, rows: int,
                           out: str) -> list[onnx.NodeProto]:
    """``node``'s product with the int8 or bf16 matrix NAME ([rows, in]; ``matrix``: its precision and block)
    from chunks of CHUNK_ROWS rows, each dequantized (or widened) just before its product: with transB
    (A @ NAME^T, the LM head) the chunks' outputs are concatenated; without (A @ NAME, the head's input
    gradient) A's matching columns are multiplied and summed. Each chunk is read from its row view
    (``row_view``, an initializer of its own over the same bytes), through Reshapes whose shapes end in an
    empty slice of ``anchor``'s Shape (see dequantize_per_use), so it is neither folded into a copy nor run early."""
    transposed = _attr(node, "transB", 0) == 1
    nodes = [helper.make_node("Shape", [anchor], [f"{out}/after"], start=0, end=0)]

    def const(label: str, values: list[int]) -> str:
        nodes.append(helper.make_node("Constant", [], [f"{out}/{label}"], name=f"{out}/{label}",
                                      value=helper.make_tensor(f"{out}/{label}", TensorProto.INT64, [len(values)], values)))
        return f"{out}/{label}"

    def after(label: str, values: list[int]) -> str:
        nodes.append(helper.make_node("Concat", [const(label, values), f"{out}/after"], [f"{out}/{label}_after"], axis=0))
        return f"{out}/{label}_after"

    if matrix[0] == BF16:
        whole = after("matrix", [0, -1])
    else:
        shapes = after("blocks", [0, -1, matrix[1]]), after("column", [0, -1, 1]), const("matrix", [0, -1])
    last = const("last", [-1])
    parts = []
    for c, (start, end) in enumerate(row_chunks(rows)):
        view, w = row_view(name, start, end), f"{out}/w{c}"
        if matrix[0] == BF16:
            nodes += [helper.make_node("Reshape", [view, whole], [f"{out}/bits{c}"]),
                      helper.make_node("Cast", [f"{out}/bits{c}"], [w], to=TensorProto.FLOAT)]
        else:
            nodes += _scaled_int8(view + QUANTIZED, view + SCALE, w, *shapes)
        part = f"{out}/part{c}"
        if transposed:
            nodes.append(helper.make_node("Gemm", [node.input[0], w], [part], transB=1))
        else:
            columns = f"{out}/columns{c}"
            nodes += [helper.make_node("Slice", [node.input[0], const(f"start{c}", [start]), const(f"end{c}", [end]),
                                                 last], [columns]),
                      helper.make_node("MatMul", [columns, w], [part])]
        parts.append(part)
    nodes.append(helper.make_node("Concat" if transposed else "Sum", parts, [node.output[0]], name=node.name or out,
                                  **({"axis": -1} if transposed else {})))
    return nodes


def _shape_after(shape: str, anchor: str, out: str, result: str) -> list[onnx.NodeProto]:
    """``result``: the constant ``shape`` with an empty slice of ``anchor``'s Shape after it, the same values
    known only once ``anchor`` is computed. A Reshape to it runs after ``anchor``, and is not folded."""
    return [helper.make_node("Shape", [anchor], [f"{out}/after"], start=0, end=0),
            helper.make_node("Concat", [shape, f"{out}/after"], [result], axis=0)]


def without_ordering_slices(nodes) -> list[onnx.NodeProto]:
    """The nodes with every Concat input that is an empty slice of a Shape (``_shape_after``) left out, for
    providers that compile a graph whole (OpenVINO): the order only serves ONNX Runtime's CPU provider."""
    empty = {n.output[0] for n in nodes
             if n.op_type == "Shape" and _attr(n, "start", None) == 0 and _attr(n, "end", None) == 0}
    result = []
    for node in nodes:
        if node.op_type == "Concat" and set(node.input) & empty:
            kept = [x for x in node.input if x not in empty]
            axis = _attr(node, "axis", None)
            node = helper.make_node("Concat", kept, list(node.output), name=node.name, axis=axis) if len(kept) > 1 \
                else helper.make_node("Identity", kept, list(node.output), name=node.name)
        result.append(node)
    return result


def _widened(name: str, out: str, anchor: str) -> list[onnx.NodeProto]:
    """The bf16 matrix NAME as float32 (exact: bfloat16 is float32's upper half), read through a Reshape to its
    own shape whose shape input ends in an empty slice of ``anchor``'s Shape, so that ONNX Runtime neither
    folds the Cast into a float32 copy at load nor runs it before the product's other operand is ready."""
    return [*_shape_after(BF16_SHAPE, anchor, out, f"{out}/shape"),
            helper.make_node("Reshape", [name, f"{out}/shape"], [f"{out}/bits"]),
            helper.make_node("Cast", [f"{out}/bits"], [out], to=TensorProto.FLOAT, name=out)]


def _scaled_int8(q: str, scale: str, out: str, blocks: str, column: str, matrix: str) -> list[onnx.NodeProto]:
    """int8 rows q [rows, in] and their scales [rows, in / block] -> float32 [rows, in], as DequantizeLinear with
    block_size computes them (float(q) * scale, the same bits), spelled as Cast and a broadcast Mul: ONNX Runtime's
    blocked DequantizeLinear takes 7.3 ms for a [4864, 896] int8 matrix here, Cast and Mul 2.7 to 5.4 ms (it varies
    between runs; scripts/bench_quantized_products.py). ``blocks``, ``column``, ``matrix``: the shapes
    [0, -1, block], [0, -1, 1], [0, -1]. ``q`` or ``blocks`` must not be a constant (here: a shape that ends in an
    empty slice of the step's anchor), or ONNX Runtime would fold the Cast into a float32 copy."""
    return [helper.make_node("Reshape", [q, blocks], [f"{out}/q_blocks"]),
            helper.make_node("Cast", [f"{out}/q_blocks"], [f"{out}/q_float"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [scale, column], [f"{out}/scale_column"]),
            helper.make_node("Mul", [f"{out}/q_float", f"{out}/scale_column"], [f"{out}/blocks"]),
            helper.make_node("Reshape", [f"{out}/blocks", matrix], [out], name=out)]


def _attr(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
