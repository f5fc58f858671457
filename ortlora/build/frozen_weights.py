"""The frozen base weights, stored once in one file that every graph reads.

ORT's training and eval models, the portable training and eval graphs, and the inference and
decoder graphs all take their frozen weights from ``frozen_weights.bin`` as external data; ORT's
checkpoint holds only the LoRA weights. Offsets of large tensors are page-aligned, so ONNX Runtime,
or the runtime's own mapping (runtime/frozen.py, which shares one mapping between a run's
sessions), maps the file instead of copying it.

Graphs and weights travel apart. The exports read every frozen weight as a graph input named after
the checkpoint's tensor (skeleton.py), so no graph ever holds a value, and then:

    plan     how each weight is stored: float32, transposed to [in, out] where every graph reads it
             only through a Transpose (a linear layer's weight), as the checkpoint has it otherwise
    fold     points a graph at the stored form (a Transpose of a weight becomes the stored tensor)
    write    streams the checkpoint into the file, one tensor at a time, in blocks
    attach   turns the graph's weight inputs into initializers that reference the file

The build's memory therefore follows the largest tensor, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ortlora.build import quantize
from ortlora.weights import StoredTensor, byte_length, f32_to_bf16, to_float32

FROZEN_WEIGHTS = "frozen_weights.bin"
PAGE = 4096
TRANSPOSED = ".T"  # suffix of a weight stored transposed: model.layers.0.mlp.up_proj.weight.T is [in, out]
BLOCK_BYTES = 64 << 20  # float32 written per block while streaming
VOCABULARY_MATRICES = ("embed_tokens.weight", "lm_head.weight")  # Qwen2's [vocab, hidden] matrices


@dataclass(frozen=True)
class Stored:
    """One weight of frozen_weights.bin: the checkpoint tensor it holds and how."""

    source: str  # the checkpoint's tensor name
    shape: tuple[int, ...]  # as the graphs read it (float32; a quantized one after dequantization)
    transposed: bool
    precision: str = "fp32"  # "bf16": bfloat16; "int8" / "int4": stored as NAME.q and NAME.scale (quantize.py)
    block: int = 0  # inputs that share a scale, where quantized


def plan(graphs: list[onnx.ModelProto], shapes: dict[str, tuple[int, ...]], precision: str = "fp32",
         block: int = quantize.BLOCK_SIZE) -> dict[str, Stored]:
    """Stored name -> Stored for every frozen weight (checkpoint name -> shape), in the order given.

    In float32, a matrix that every graph reads only through Transpose(perm=[1, 0]) is stored transposed,
    so its products read it as it lies (the exporter's constant folding did the same with the values in
    hand). Quantized (``precision`` int8 or int4, blocks of ``block`` inputs), matrices keep the
    checkpoint's [out, in] and are quantized. The vocabulary matrices are int8 even in an int4 base: they
    are read by rows (the embedding by the input's tokens, the LM head by the head gradient's labels), and
    ONNX Runtime gathers no int4, so an int4 one would be dequantized whole for a few rows (7B's untied
    head: 2.2 GB of float32 for each use). In bf16 (``precision`` bf16), matrices are laid out as in
    float32 and stored as bfloat16, but for the vocabulary matrices, which keep [vocab, hidden] to be read
    by rows and in chunks of rows (quantize.dequantize_per_use); norms and biases stay float32.
    """
    readers: dict[str, list[onnx.NodeProto]] = {name: [] for name in shapes}
    for model in graphs:
        for node in model.graph.node:
            for name in node.input:
                if name in readers:
                    readers[name].append(node)
    storage = {}
    for source, shape in shapes.items():
        nodes = readers[source]
        if quantize.is_quantized(shape, precision):  # (the builder checked that ``block`` divides every width)
            by_rows = any(n.op_type == "Gather" for n in nodes) or source.endswith(VOCABULARY_MATRICES)
            storage[source] = Stored(source, tuple(shape), False, "int8" if by_rows else precision, block)
            continue
        matrix_precision = precision if precision == quantize.BF16 and len(shape) == 2 else "fp32"
        by_rows = matrix_precision == quantize.BF16 and source.endswith(VOCABULARY_MATRICES)
        transposed = len(shape) == 2 and bool(nodes) and all(_is_matrix_transpose(n) for n in nodes) and not by_rows
        name = source + TRANSPOSED if transposed else source
        storage[name] = Stored(source, tuple(shape[::-1]) if transposed else tuple(shape), transposed,
                               matrix_precision)
    return storage


def fold(model: onnx.ModelProto, storage: dict[str, Stored]) -> None:
    """Make ``model``, which reads the frozen weights as inputs named after the checkpoint, read their stored
    form: a Transpose of a weight stored transposed becomes the stored tensor, and a product with the
    transpose of one stored as it is (the tied LM head, which is also the embedding) a Gemm with transB=1,
    so no graph makes a transposed copy of a weight. The weights stay graph inputs (see ``attach``)."""
    graph = model.graph
    by_source = {stored.source: name for name, stored in storage.items()}
    renamed: dict[str, str] = {}  # Transpose output -> the weight stored transposed
    transpose_of: dict[str, str] = {}  # Transpose output -> a weight stored as it is
    nodes = []
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in by_source:
            name = by_source[node.input[0]]
            if not storage[name].transposed:
                transpose_of[node.output[0]] = name
            else:
                renamed[node.output[0]] = name
            continue
        nodes.append(node)
    folded = []
    for node in nodes:
        for k, name in enumerate(node.input):
            node.input[k] = renamed.get(name, name)
        if node.op_type == "MatMul" and node.input[1] in transpose_of:
            folded.extend(_product_with_transposed(node, transpose_of[node.input[1]], storage))
            continue
        if any(name in transpose_of for name in node.input):
            raise RuntimeError(f"{node.op_type} node {node.name} reads a transposed frozen weight; only MatMul may")
        folded.append(node)
    del graph.node[:]
    graph.node.extend(folded)
    inputs = []
    for value in graph.input:
        name = by_source.get(value.name)
        if name is None:
            inputs.append(value)
        elif any(name in node.input for node in folded):
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, storage[name].shape))
    del graph.input[:]
    graph.input.extend(inputs)


def _is_matrix_transpose(node: onnx.NodeProto) -> bool:
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    return node.op_type == "Transpose" and perm == [1, 0]


def _product_with_transposed(node: onnx.NodeProto, weight: str, storage: dict[str, Stored]) -> list[onnx.NodeProto]:
    """``x @ W.T`` for x of any rank as Gemm(rows of x, W, transB=1), reshaped back: W [out, in] is read as it is."""
    out_features, in_features = storage[weight].shape
    states, result, name = node.input[0], node.output[0], node.name or weight
    # Shape constants as Constant nodes: initializers would become (external) training parameters.
    const = [helper.make_node("Constant", [], [f"{name}/tied_{n}"], name=f"{name}/tied_{n}",
                              value=numpy_helper.from_array(np.array(v, np.int64)))
             for n, v in (("rows", [-1, in_features]), ("vocab", [out_features]))]
    return [
        *const,
        helper.make_node("Reshape", [states, f"{name}/tied_rows"], [f"{name}/tied_rows_out"], name=f"{name}/tied_reshape"),
        helper.make_node("Gemm", [f"{name}/tied_rows_out", weight], [f"{name}/tied_gemm_out"], transB=1,
                         name=f"{name}/tied_gemm"),
        helper.make_node("Shape", [states], [f"{name}/tied_shape_out"], start=0, end=-1, name=f"{name}/tied_shape"),
        helper.make_node("Concat", [f"{name}/tied_shape_out", f"{name}/tied_vocab"], [f"{name}/tied_logits_shape"],
                         axis=0, name=f"{name}/tied_concat"),
        helper.make_node("Reshape", [f"{name}/tied_gemm_out", f"{name}/tied_logits_shape"], [result],
                         name=f"{name}/tied_logits"),
    ]


def layout(storage: dict[str, Stored]) -> dict[str, dict]:
    """Where each stored tensor lies in the file (dtype, shape, offset, length in bytes), as the manifest
    records it: the runtime maps the file without onnx. A quantized weight NAME is NAME.q (int8, or for int4
    uint4 two to a byte) and NAME.scale (float32), and for int4 NAME.zero_point (uint4, all 8). Tensors of a
    page or more start on a page."""
    result, end = {}, 0
    for name, entry in _entries(storage):
        dtype, shape = entry
        count = int(np.prod(shape, dtype=np.int64))
        length = byte_length(dtype, count)
        align = PAGE if length >= PAGE else 16
        offset = end + (-end % align)
        result[name] = {"dtype": dtype, "shape": list(shape), "offset": offset, "length": length}
        end = offset + length
    return result


def _entries(storage: dict[str, Stored]):
    """(file entry name, (dtype, shape)) for every tensor of the file, in order."""
    for name, stored in storage.items():
        if stored.precision in ("fp32", quantize.BF16):
            yield name, ("float32" if stored.precision == "fp32" else "bfloat16", stored.shape)
        else:
            rows, width = stored.shape
            yield name + quantize.QUANTIZED, (quantize.STORED[stored.precision], stored.shape)
            yield name + quantize.SCALE, ("float32", (rows, width // stored.block))
            if stored.precision == "int4":
                yield name + quantize.ZERO_POINT, ("uint4", (rows, width // stored.block))


def references(places: dict[str, dict], location: str = FROZEN_WEIGHTS,
               views: dict[str, dict] | None = None) -> dict[str, TensorProto]:
    """Data-less TensorProtos that point into the file ``location``, one per weight of ``layout``; an int4
    matrix's bytes also as NAME.packed, uint8 [out, in / block, block / 2], the same bytes as MatMulNBits reads
    them; and one per row view of ``views`` (quantize.row_views: name -> the weight it is of, its rows), at
    its rows' bytes."""
    result = {}

    def point(name: str, dtype: str, dims: list[int], place: dict) -> None:
        reference = TensorProto(name=name, data_type=quantize.ONNX_TYPES[dtype], dims=dims)
        reference.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", place["offset"]), ("length", place["length"])):
            reference.external_data.add(key=key, value=str(value))
        result[name] = reference

    for name, place in places.items():
        point(name, place["dtype"], place["shape"], place)
        if place["dtype"] == "uint4" and name.endswith(quantize.QUANTIZED):
            matrix = name[: -len(quantize.QUANTIZED)]
            rows, width = place["shape"]
            blocks = places[matrix + quantize.SCALE]["shape"][1]
            point(matrix + quantize.PACKED, "uint8", [rows, blocks, width // blocks // 2], place)
    for name, view in (views or {}).items():
        place = places[view["of"]]
        (start, end), row = view["rows"], place["length"] // place["shape"][0]
        point(name, place["dtype"], [end - start, *place["shape"][1:]],
              {"offset": place["offset"] + start * row, "length": (end - start) * row})
    return result


def write(storage: dict[str, Stored], places: dict[str, dict], tensors: dict[str, StoredTensor], path: Path,
          progress=None) -> None:
    """Stream every stored weight from the checkpoint's ``tensors`` into ``path``, at the offsets of ``places``.

    One checkpoint tensor is in memory at a time, as stored (bf16: half its float32 size); it is widened
    to float32 (or, for a bf16 base, kept as bfloat16 bits, or rounded to them from another dtype as torch
    rounds) and, where stored transposed, transposed, or quantized, in blocks of about BLOCK_BYTES of
    float32. ``progress(bytes)`` is called after each block with the bytes it wrote.
    """
    with open(path, "wb") as f:

        def put(entry: str, data: np.ndarray) -> None:
            if f.tell() < places[entry]["offset"]:
                f.write(b"\0" * (places[entry]["offset"] - f.tell()))
            f.write(np.ascontiguousarray(data).data)
            if progress is not None:
                progress(data.nbytes)

        for name, stored in storage.items():
            source = tensors[stored.source]
            values = source.read()
            if stored.transposed:
                values = values.T
            row_bytes = 4 * int(np.prod(values.shape[1:], dtype=np.int64))
            rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
            scales = []
            for start in range(0, values.shape[0], rows):
                if stored.precision == quantize.BF16:  # a bf16 checkpoint's bits as they are; others rounded
                    bits = values[start: start + rows]
                    put(name, bits if source.dtype == "BF16" else f32_to_bf16(to_float32(source.dtype, bits)))
                    continue
                block = to_float32(source.dtype, values[start: start + rows])
                if stored.precision == "fp32":
                    put(name, block)
                    continue
                q, scale = quantize.quantize(block, stored.precision, stored.block)
                put(name + quantize.QUANTIZED, quantize.pack_uint4(q) if stored.precision == "int4" else q)
                scales.append(scale)
            if scales:
                scale = np.concatenate(scales)
                put(name + quantize.SCALE, scale)
                if stored.precision == "int4":
                    put(name + quantize.ZERO_POINT, quantize.pack_uint4(np.zeros(scale.shape, np.int8)))
            del values


def attach(model: onnx.ModelProto, references: dict[str, TensorProto], fused_products: bool = False) -> int:
    """Turn the graph inputs that are frozen weights into initializers read from the file; a quantized
    matrix NAME is read through a DequantizeLinear of NAME.q and NAME.scale at each use, or in a graph
    without gradients (``fused_products``) an int4 one by MatMulNBits, and a bfloat16 one through a Cast to
    float32 at each use (quantize.dequantize_per_use). Returns how many initializers were added."""
    graph = model.graph
    quantized = {}
    for value in graph.input:
        q = references.get(value.name + quantize.QUANTIZED)
        if value.name in references and references[value.name].data_type == TensorProto.BFLOAT16:
            quantized[value.name] = (quantize.BF16, 0)
        elif q is not None:
            blocks = references[value.name + quantize.SCALE].dims[1]
            quantized[value.name] = (quantize.PRECISION_OF[q.data_type], q.dims[1] // blocks)
    if quantized:
        quantize.dequantize_per_use(model, quantized, fused_products)
    moved = [i.name for i in graph.input if i.name in references]
    kept = [i for i in graph.input if i.name not in references]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(references[name] for name in moved)
    return len(moved)
