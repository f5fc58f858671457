"""The frozen base weights, stored once in one file that every graph reads.

ORT's training and eval models, the portable training and eval graphs, and the inference and
decoder graphs all take their frozen weights from ``frozen_weights.bin`` as external data; ORT's
checkpoint holds only the LoRA weights.
Offsets of large tensors are page-aligned, so ONNX Runtime, or the runtime's own mapping
(runtime/frozen.py, which shares one mapping between a run's sessions), maps the file instead of
copying it. Before, the checkpoint held a second copy of the weights, and loading it cost ORT's
training API 220 MB beyond the weights themselves (0.5B shape).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

from ortlora.weights import map_layout

FROZEN_WEIGHTS = "frozen_weights.bin"
PAGE = 4096


def write(tensors: list[TensorProto], path: Path, base_dir: Path) -> dict[str, TensorProto]:
    """Write the tensors' data into one file; return data-less TensorProtos that point into it.

    ``base_dir``: where tensors that are themselves stored as external data have their files.
    """
    references = {}
    with open(path, "wb") as f:
        for tensor in tensors:
            if tensor.HasField("raw_data") and tensor.data_location != TensorProto.EXTERNAL:
                data = tensor.raw_data
            else:
                data = numpy_helper.to_array(tensor, base_dir=str(base_dir)).tobytes()
            align = PAGE if len(data) >= PAGE else 16
            f.write(b"\0" * (-f.tell() % align))
            reference = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
            reference.data_location = TensorProto.EXTERNAL
            for key, value in (("location", path.name), ("offset", f.tell()), ("length", len(data))):
                reference.external_data.add(key=key, value=str(value))
            f.write(data)
            references[tensor.name] = reference
    return references


def layout(references: dict[str, TensorProto]) -> dict[str, dict]:
    """Where each weight lies in the file, for the manifest: the runtime maps it without onnx."""
    result = {}
    for name, reference in references.items():
        place = {entry.key: entry.value for entry in reference.external_data}
        result[name] = {"dtype": helper.tensor_dtype_to_np_dtype(reference.data_type).name,
                        "shape": list(reference.dims), "offset": int(place["offset"]), "length": int(place["length"])}
    return result


def attach(model: onnx.ModelProto, references: dict[str, TensorProto]) -> int:
    """Turn the graph inputs that are frozen weights into initializers read from the file. Returns how many."""
    graph = model.graph
    moved = [i.name for i in graph.input if i.name in references]
    kept = [i for i in graph.input if i.name not in references]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(references[name] for name in moved)
    return len(moved)


def index(references: dict[str, TensorProto], directory: Path) -> dict[tuple, str]:
    """(content digest, dtype, dims) -> name for every frozen weight in the file (see ``reuse``)."""
    arrays = map_layout(Path(directory) / FROZEN_WEIGHTS, layout(references))
    return {(hashlib.sha1(arrays[name]).digest(), reference.data_type, tuple(reference.dims)): name
            for name, reference in references.items()}


def reuse(model: onnx.ModelProto, references: dict[str, TensorProto], by_content: dict[tuple, str]) -> int:
    """Initializers equal to a frozen weight (same bytes, dtype and dims) become references into the
    file, so graphs exported separately (inference, decoder) store no copy. Returns how many."""
    count = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL or len(tensor.raw_data) < PAGE:
            continue
        name = by_content.get((hashlib.sha1(tensor.raw_data).digest(), tensor.data_type, tuple(tensor.dims)))
        if name is not None:
            own_name = tensor.name
            tensor.CopyFrom(references[name])
            tensor.name = own_name
            count += 1
    return count
