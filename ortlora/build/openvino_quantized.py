"""An int8 / int4 base's portable graphs as OpenVINO's provider takes them: exact, the matrices kept compressed.

OpenVINO's CPU plugin multiplies by a compressed matrix itself (a FullyConnected node reading int8 / uint4
weights with their scales) where it finds its weight-decompression pattern on a constant:

    Constant q [rows, in / B, B] -> Convert -> (Subtract zero point) -> Multiply scale [rows, in / B, 1]
        -> Reshape [rows, in] -> MatMul(x, W, transpose_b)                                   (x @ W^T)

The portable graph's spelling is not that pattern (a DequantizeLinear, or Cast then Reshape, and the
empty slices that order each dequantization after its product's other operand, quantize._shape_after), so
OpenVINO refuses it or folds every matrix into a float32 copy. This rewrite (``compressed_products``), applied
to the portable training and eval graphs:

    - drops the ordering slices (OpenVINO compiles the graph whole; they only serve ONNX Runtime's CPU
      provider), as portable_graph.unordered_widening does for a bf16 base;
    - spells each dequantization of a matrix (or of a chunk of the vocabulary's rows) as the pattern above:
      a Reshape of the stored values into blocks, then Cast, Sub, Mul, Reshape back;
    - spells the gathered embedding rows' DequantizeLinear as Cast and Mul (OpenVINO's ONNX reader refuses a
      blocked DequantizeLinear of a computed tensor: "Unsupported input type dynamic");
    - spells each product by a matrix that is not transposed, dy @ W (the backward pass's input gradient),
      as (W^T @ dy^T)^T: a Gemm with transA and transB, then a Transpose.

The last one works around two faults of OpenVINO's CPU plugin (2025.4 in onnxruntime-openvino 1.24.1 and
2026.4 in onnxruntime-ep-openvino 1.8.1 alike). With dy @ W spelled as a MatMul or Gemm by a compressed
matrix, compiling fails ("Incompatible MatMul matrix dimension" in
ConvertFullyConnectedToFullyConnectedCompressed). And a float32 square matrix (q_proj, o_proj) read both as
x @ W^T and as dy @ W, as OpenVINO gets it where ONNX Runtime has folded the dequantizations, gives one of the
two products computed with W transposed, silently (relative error about 1.4; the backward one under 2025.4,
the forward one under 2026.4). With W as the first operand of a transposed product, OpenVINO keeps that
product a MatMul that dequantizes W when it runs (a float32 copy of one matrix at a time), and every product
is exact.

The graphs must reach OpenVINO as written: ONNX Runtime's own graph optimizations would fold each
dequantization of a constant into a float32 copy first (session_backend loads them unoptimized), and
OpenVINO must not quantize the activations of the compressed products (its DYNAMIC_QUANTIZATION_GROUP_SIZE,
on by default: errors of 5e-3; providers.py turns it off for these graphs).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ortlora.build import quantize
from ortlora.build.portable_ops import UnsupportedNode, attrs

PREFIX = "openvino_quantized"


def compressed_products(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a quantized base's portable graph (training or eval) in OpenVINO's spelling (module docstring)."""
    from ortlora.build.portable_graph import _live_nodes

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    stored = {t.name: t for t in graph.initializer}
    nodes = quantize.without_ordering_slices(graph.node)
    producer = {out: node for node in nodes for out in node.output if out}
    constants: dict[str, list[int]] = {}

    def const(label: str, values: list[int]) -> str:
        name = f"{PREFIX}.{label}"
        constants[name] = values
        return name

    def source_matrix(tensor: str) -> str | None:
        """The stored matrix NAME.q (or a vocabulary chunk's row view of one) that ``tensor`` is, else None."""
        return tensor if tensor in stored and len(stored[tensor].dims) == 2 else None

    matrices: dict[str, str] = {}  # dequantized tensor -> the NAME.q it reads
    replaced: dict[str, list[onnx.NodeProto]] = {}  # dequantized tensor -> the nodes that now compute it
    for node in nodes:
        found = _dequantization(node, producer)
        if found is None:
            continue
        out, q, scale, zero_point, block = found
        matrix = source_matrix(q)
        if block is None:
            if matrix is None:  # Cast and Mul of something else than a stored matrix's blocks
                continue
            block = stored[matrix].dims[1] // stored[matrix[: -len(quantize.QUANTIZED)] + quantize.SCALE].dims[1]
        tag = out.replace("/", ".")
        if matrix is not None:  # the weight-decompression pattern, on a constant
            matrices[out] = matrix
            new = [helper.make_node("Reshape", [q, const(f"blocks{block}", [0, -1, block])], [f"{tag}.q_blocks"]),
                   helper.make_node("Cast", [f"{tag}.q_blocks"], [f"{tag}.q_float"], to=TensorProto.FLOAT),
                   helper.make_node("Reshape", [scale, const("column", [0, -1, 1])], [f"{tag}.scale_column"])]
            column, back = const("column", [0, -1, 1]), [const("matrix", [0, -1])]
        else:  # gathered rows, computed when the step runs: any spelling of the same values will do
            new = [helper.make_node("Cast", [q], [f"{tag}.q_float_rows"], to=TensorProto.FLOAT),
                   helper.make_node("Reshape", [f"{tag}.q_float_rows", const(f"flat{block}", [-1, block])],
                                    [f"{tag}.q_float"]),
                   helper.make_node("Reshape", [scale, const("flat_column", [-1, 1])], [f"{tag}.scale_column"]),
                   helper.make_node("Shape", [q], [f"{tag}.shape"])]
            column, back = const("flat_column", [-1, 1]), [f"{tag}.shape"]
        values = f"{tag}.q_float"
        if zero_point:
            new += [helper.make_node("Reshape", [zero_point, column], [f"{tag}.zero_column"]),
                    helper.make_node("Cast", [f"{tag}.zero_column"], [f"{tag}.zero_float"], to=TensorProto.FLOAT),
                    helper.make_node("Sub", [values, f"{tag}.zero_float"], [f"{tag}.q_centered"])]
            values = f"{tag}.q_centered"
        new += [helper.make_node("Mul", [values, f"{tag}.scale_column"], [f"{tag}.blocks"]),
                helper.make_node("Reshape", [f"{tag}.blocks", *back], [out], name=node.name or tag)]
        replaced[out] = new

    result = []
    for node in nodes:
        if node.output and node.output[0] in replaced:
            result += replaced[node.output[0]]
            continue
        read = [k for k, name in enumerate(node.input) if name in matrices]
        result += _transposed_product(node, read) if read else [node]
    shapes = [helper.make_node("Constant", [], [name], name=name,
                               value=helper.make_tensor(name, TensorProto.INT64, [len(v)], v))
              for name, v in sorted(constants.items())]
    del graph.node[:]
    graph.node.extend(_live_nodes(shapes + result, [o.name for o in graph.output]))
    return model


def _dequantization(node: onnx.NodeProto, producer: dict) -> tuple[str, str, str, str, int | None] | None:
    """(output, q, scale, zero point or '', block or None where the shapes tell) if ``node`` ends a dequantization:
    a DequantizeLinear, or quantize._scaled_int8's Reshape(Mul(Cast(Reshape(q, blocks)), Reshape(scale, column)))."""
    if node.op_type == "DequantizeLinear":
        if "block_size" not in attrs(node):
            return None
        zero_point = node.input[2] if len(node.input) > 2 else ""
        return node.output[0], node.input[0], node.input[1], zero_point, attrs(node)["block_size"]
    if node.op_type != "Reshape" or producer.get(node.input[0]) is None or producer[node.input[0]].op_type != "Mul":
        return None
    mul = producer[node.input[0]]
    cast, column = producer.get(mul.input[0]), producer.get(mul.input[1])
    if cast is None or cast.op_type != "Cast" or column is None or column.op_type != "Reshape":
        return None
    blocks = producer.get(cast.input[0])
    if blocks is None or blocks.op_type != "Reshape":
        return None
    return node.output[0], blocks.input[0], column.input[0], "", None


def _transposed_product(node: onnx.NodeProto, read: list[int]) -> list[onnx.NodeProto]:
    """``node``, which reads a dequantized matrix W at the positions ``read``: x @ W^T (Gemm transB) as it is;
    x @ W (MatMul, or Gemm without transB) as (W^T @ x^T)^T."""
    a = attrs(node)
    if node.op_type == "Gemm" and read == [1] and a.get("transB", 0) == 1:
        return [node]
    plain = read == [1] and not a.get("transA", 0) and not a.get("transB", 0) and a.get("alpha", 1.0) == 1.0 \
        and (len(node.input) == 2 or a.get("beta", 1.0) == 0.0)
    if node.op_type not in ("Gemm", "MatMul") or not plain:
        raise UnsupportedNode(f"{node.op_type} {node.name or node.output[0]} reads a quantized matrix in a way this "
                              "rewrite does not spell for OpenVINO")
    transposed = f"{node.output[0]}.transposed".replace("/", ".")
    return [helper.make_node("Gemm", [node.input[1], node.input[0]], [transposed], transA=1, transB=1),
            helper.make_node("Transpose", [transposed], [node.output[0]], perm=[1, 0], name=node.name)]
