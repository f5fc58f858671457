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

from ortlora.weights import StoredTensor, to_float32

FROZEN_WEIGHTS = "frozen_weights.bin"
PAGE = 4096
TRANSPOSED = ".T"  # suffix of a weight stored transposed: model.layers.0.mlp.up_proj.weight.T is [in, out]
BLOCK_BYTES = 64 << 20  # float32 written per block while streaming


@dataclass(frozen=True)
class Stored:
    """One weight of frozen_weights.bin: the checkpoint tensor it holds and how."""

    source: str  # the checkpoint's tensor name
    shape: tuple[int, ...]  # as stored, in float32
    transposed: bool


def plan(graphs: list[onnx.ModelProto], shapes: dict[str, tuple[int, ...]]) -> dict[str, Stored]:
    """Stored name -> Stored for every frozen weight (checkpoint name -> shape), in the order given.

    A matrix that every graph reads only through Transpose(perm=[1, 0]) is stored transposed, so its
    products read it as it lies (the exporter's constant folding did the same with the values in hand).
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
        transposed = len(shape) == 2 and bool(nodes) and all(_is_matrix_transpose(n) for n in nodes)
        name = source + TRANSPOSED if transposed else source
        storage[name] = Stored(source, tuple(shape[::-1]) if transposed else tuple(shape), transposed)
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
    """Where each weight lies in the file (dtype, shape, offset, length in bytes), as the manifest records it:
    the runtime maps the file without onnx. Tensors of a page or more start on a page."""
    result, end = {}, 0
    for name, stored in storage.items():
        length = 4 * int(np.prod(stored.shape, dtype=np.int64))
        align = PAGE if length >= PAGE else 16
        offset = end + (-end % align)
        result[name] = {"dtype": "float32", "shape": list(stored.shape), "offset": offset, "length": length}
        end = offset + length
    return result


def references(places: dict[str, dict], location: str = FROZEN_WEIGHTS) -> dict[str, TensorProto]:
    """Data-less TensorProtos that point into the file ``location``, one per weight of ``layout``."""
    result = {}
    for name, place in places.items():
        reference = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=place["shape"])
        reference.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", place["offset"]), ("length", place["length"])):
            reference.external_data.add(key=key, value=str(value))
        result[name] = reference
    return result


def write(storage: dict[str, Stored], places: dict[str, dict], tensors: dict[str, StoredTensor], path: Path,
          progress=None) -> None:
    """Stream every stored weight from the checkpoint's ``tensors`` into ``path``, at the offsets of ``places``.

    One checkpoint tensor is in memory at a time, as stored (bf16: half its float32 size); it is widened
    to float32 and, where stored transposed, transposed in blocks of about BLOCK_BYTES.
    ``progress(bytes)`` is called after each block.
    """
    with open(path, "wb") as f:
        for name, stored in storage.items():
            source = tensors[stored.source]
            values = source.read()
            if stored.transposed:
                values = values.T
            row_bytes = 4 * int(np.prod(values.shape[1:], dtype=np.int64))
            rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
            f.write(b"\0" * (places[name]["offset"] - f.tell()))
            for start in range(0, values.shape[0], rows):
                block = np.ascontiguousarray(to_float32(source.dtype, values[start: start + rows]), dtype=np.float32)
                f.write(block.data)
                if progress is not None:
                    progress(block.nbytes)
            del values


def attach(model: onnx.ModelProto, references: dict[str, TensorProto]) -> int:
    """Turn the graph inputs that are frozen weights into initializers read from the file. Returns how many."""
    graph = model.graph
    moved = [i.name for i in graph.input if i.name in references]
    kept = [i for i in graph.input if i.name not in references]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(references[name] for name in moved)
    return len(moved)
