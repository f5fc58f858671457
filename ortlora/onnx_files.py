"""Where an ONNX file says its external data lies, read without the ``onnx`` package.

ONNX Runtime opens the file named by a tensor's external-data ``location`` relative to the model, and
1.19 (the training build) follows absolute paths and ``..`` too, so a model file can make it read any
file on the machine. The runtime has no ``onnx`` package, so this walks protobuf's wire format itself:
it visits only the messages that can hold a tensor and steps over every other field by its length
(an initializer's raw data included), which takes milliseconds even for a large graph.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from ortlora.errors import REBUILD, OrtloraError
from ortlora.files import inside

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

# message -> {field number: message it holds}, for every field on a path to a TensorProto (onnx.proto):
#   ModelProto         graph = 7, training_info = 20, functions = 25
#   TrainingInfoProto  initialization = 1, algorithm = 2      FunctionProto  node = 7
#   GraphProto         node = 1, initializer = 5, sparse_initializer = 15
#   NodeProto          attribute = 5
#   AttributeProto     t = 5, g = 6, tensors = 10, graphs = 11, sparse_tensor = 22, sparse_tensors = 23
#   SparseTensorProto  values = 1, indices = 2
#   TensorProto        external_data = 13: StringStringEntryProto key = 1, value = 2
CHILDREN = {
    "model": {7: "graph", 20: "training_info", 25: "function"},
    "training_info": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse_tensor"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse_tensor", 23: "sparse_tensor"},
    "sparse_tensor": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
MAX_DEPTH = 100  # protobuf's own default nesting limit
# A message holds a location only if these bytes occur in it (a submessage is stored inside its parent's
# bytes, and a string as its UTF-8 bytes), so one search in C skips most nodes without decoding them.
LOCATION = b"location"


class Malformed(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise Malformed(f"a number runs past byte {end}")


def _fields(data, start: int, end: int):
    """(field number, wire type, value) of each field of the message in data[start:end]; a
    length-delimited value is given as its (start, end), a number as itself."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _varint(data, pos, end)
        elif wire == LENGTH:
            length, pos = _varint(data, pos, end)
            value, pos = (pos, pos + length), pos + length
        elif wire in (FIXED64, FIXED32):
            value, pos = None, pos + (8 if wire == FIXED64 else 4)
        else:
            raise Malformed(f"field {number} at byte {pos} has wire type {wire}, which ONNX files do not use")
        if pos > end:
            raise Malformed(f"field {number} runs past byte {end}")
        yield number, wire, value


def _location(data, start: int, end: int) -> str | None:
    """The value of an external-data entry whose key is "location"."""
    entry = {}
    for number, wire, value in _fields(data, start, end):
        if wire == LENGTH:
            entry[number] = bytes(data[value[0]:value[1]])
    if entry.get(1) != LOCATION:
        return None
    try:
        return entry.get(2, b"").decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"an external-data location at byte {start} is not UTF-8") from None


def external_data_locations(data) -> list[str]:
    """Every external-data location named in a serialised ModelProto (bytes, or a mapped file)."""
    locations = []
    stack = [("model", 0, len(data), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise Malformed(f"messages nested more than {MAX_DEPTH} deep")
        children = CHILDREN[kind]
        for number, wire, value in _fields(data, start, end):
            child = children.get(number) if wire == LENGTH else None
            if child == "entry":
                location = _location(data, *value)
                if location is not None:
                    locations.append(location)
            elif child is not None and data.find(LOCATION, *value) >= 0:  # else nothing in it names a file
                stack.append((child, *value, depth + 1))
    return locations


def read_external_data_locations(path: Path) -> list[str]:
    """The external-data locations of an ONNX file; a one-line error naming it when it is not one."""
    try:
        with path.open("rb") as f:
            if path.stat().st_size == 0:
                return []  # an empty message: ONNX Runtime says what it lacks
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return external_data_locations(data)
    except OSError as e:
        raise OrtloraError(f"{path} cannot be read ({e.strerror or e})") from None
    except Malformed as e:
        raise OrtloraError(f"{path} is not a valid ONNX file ({e}); {REBUILD}") from None


def check_external_data(path: Path, directory: Path) -> None:
    """Refuse an ONNX file whose external data lies outside ``directory`` (absolute, ``..``, or a symbolic
    link out) or is missing, before ONNX Runtime opens it: locations are relative to the file's own directory."""
    source = f"{path} (external data)"
    for location in dict.fromkeys(read_external_data_locations(path)):
        target = inside(path.parent, location, source)
        if not target.resolve().is_relative_to(Path(directory).resolve()):
            raise OrtloraError(f"{source} names {location!r}, which leads outside {directory}")
        if not target.is_file():
            raise OrtloraError(f"{source} names {location!r}, which is not there; {REBUILD}")
