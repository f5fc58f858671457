"""Weight files without torch: hashing, safetensors in any float dtype, and the frozen weights file.

safetensors' numpy API cannot hold bfloat16, the dtype most Qwen2.5 checkpoints are stored in, so
reading and writing go through the file format itself (an 8-byte header length, a JSON header,
then the raw tensors) and bfloat16 is widened to float32 / rounded back by bit arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ortlora.errors import REBUILD, OrtloraError

NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
FLOAT_DTYPES = ("F32", "F16", "BF16")
# numpy has no bfloat16: a bf16 base's weights are mapped as their bits, uint16 marked as bfloat16.
BF16_BITS = np.dtype(np.uint16, metadata={"bfloat16": True})
NUMPY_VIEW = {"bfloat16": BF16_BITS}


def is_bf16(array: np.ndarray) -> bool:
    return bool((array.dtype.metadata or {}).get("bfloat16"))
LORA_DTYPES = ("F16", "BF16", "F32", "F64")  # what a LoRA weight (or an AdamW moment) may be stored as
INTEGER_DTYPES = ("I64", "I32", "I16", "I8", "U8")
# The most header bytes read: safetensors' own limit (MAX_HEADER_SIZE), so a file claiming a header of 100 GB is
# refused before anything is allocated for it.
MAX_HEADER_BYTES = 100_000_000


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def weights_sha256(path: Path) -> str:
    """A hash over the weight files, so later steps can tell that a base model is the one built from."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        digest.update(file.name.encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def byte_length(dtype: str, count: int) -> int:
    """Bytes of ``count`` values of ``dtype`` (numpy's names, and bfloat16 and uint4, which numpy lacks)."""
    if dtype == "uint4":
        return (count + 1) // 2  # two to a byte
    return count * (2 if dtype == "bfloat16" else np.dtype(dtype).itemsize)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32: bfloat16 is the upper half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as torch does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    return np.where(np.isnan(values), 0x7FC0, rounded).astype(np.uint16)


def check_safetensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor of a safetensors file, once safetensors itself has checked the
    header against the file: a damaged, truncated or foreign file is a one-line error naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise OrtloraError(f"{path} is not a readable safetensors file ({e})") from None
    return {name: (s.get_dtype(), s.get_shape()) for name, s in slices.items()}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a safetensors file lies: its bytes are ``length`` bytes from ``offset`` in ``path``."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int

    @property
    def numpy_dtype(self) -> np.dtype:
        """How numpy holds it: bfloat16 as its uint16 bits."""
        return np.dtype(np.uint16 if self.dtype == "BF16" else NUMPY_DTYPES[self.dtype])

    def read(self) -> np.ndarray:
        """The tensor as stored (bfloat16 as its uint16 bits), read into memory of its own: no mapping of the
        file stays behind, so streaming a checkpoint tensor by tensor holds one tensor at a time."""
        dtype = self.numpy_dtype
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = np.fromfile(f, dtype=dtype, count=self.length // dtype.itemsize)
        if data.nbytes != self.length:
            raise OrtloraError(f"{self.path} ends inside its tensors (a truncated copy?)")
        return data.reshape(self.shape)


def stored_tensors(files: list[Path]) -> dict[str, StoredTensor]:
    """Every tensor of the safetensors ``files`` (a checkpoint's shards) by name, from their headers alone."""
    result = {}
    for path in files:
        check_safetensors(path)  # safetensors itself vouches for the header (bounded, data present as declared)
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:  # (safetensors refuses it too; never allocate what a file claims)
                raise OrtloraError(f"{path} is not a readable safetensors file (a header of {size:,} bytes)")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name, info in header.items():
            start, end = info["data_offsets"]
            result[name] = StoredTensor(path, info["dtype"], tuple(info["shape"]), 8 + size + start, end - start)
    return result


def read_safetensors(path: Path) -> Iterator[tuple[str, str, np.ndarray]]:
    """(name, dtype, array) for every tensor of a file; bfloat16 comes as its uint16 bits."""
    tensors = stored_tensors([path])
    unreadable = [f"{name} is {t.dtype}" for name, t in tensors.items() if t.dtype not in NUMPY_DTYPES and t.dtype != "BF16"]
    if unreadable:
        raise OrtloraError(f"{path} holds tensors of a dtype ortlora does not read: {', '.join(unreadable[:3])}")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for name, t in tensors.items():
            yield name, t.dtype, np.frombuffer(data[t.offset: t.offset + t.length], dtype=t.numpy_dtype).reshape(t.shape)


def write_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write ``name -> (dtype, array)``; a BF16 array is given as its uint16 bits."""
    specs = {name: (dtype, array.shape) for name, (dtype, array) in tensors.items()}
    stream_safetensors(path, specs, lambda name: [tensors[name][1]], metadata)


def stream_safetensors(path: Path, specs: dict[str, tuple[str, tuple[int, ...]]],
                       blocks: Callable[[str], Iterable[np.ndarray]], metadata: dict[str, str] | None = None) -> None:
    """Write tensors ``name -> (dtype, shape)`` whose data ``blocks(name)`` yields in order, block by block (BF16
    as uint16 bits), so a tensor need never be whole in memory."""
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        size = int(np.prod(shape, dtype=np.int64)) * (2 if dtype == "BF16" else np.dtype(NUMPY_DTYPES[dtype]).itemsize)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in specs:
            for block in blocks(name):
                f.write(np.ascontiguousarray(block).data)
            start, end = (8 + len(encoded) + o for o in header[name]["data_offsets"])
            if f.tell() != end:
                raise ValueError(f"{name}: the blocks hold {f.tell() - start} bytes, its shape and dtype {end - start}")


def shape_problems(shapes: dict[str, tuple], expected: dict[str, tuple], unexpected: bool = True) -> list[str]:
    """Every expected tensor that is missing or of another shape (with ``unexpected``, every tensor not
    expected too): all of them, so that one error lists them, as mlx-lm's adapter loader does."""
    problems = []
    for name, shape in expected.items():
        if name not in shapes:
            problems.append(f"missing {name}")
        elif tuple(shapes[name]) != tuple(shape):
            problems.append(f"{name} has shape {tuple(shapes[name])}, expected {tuple(shape)}")
    return problems + ([f"unexpected {name}" for name in sorted(set(shapes) - set(expected))] if unexpected else [])


def tensor_problems(tensors: dict[str, np.ndarray], expected: dict[str, tuple]) -> list[str]:
    """``shape_problems`` of arrays, and every expected array that holds NaN or infinity."""
    problems = shape_problems({name: array.shape for name, array in tensors.items()}, expected)
    return problems + [f"{name} holds NaN or infinite values" for name, shape in expected.items()
                       if name in tensors and tensors[name].shape == tuple(shape) and not np.isfinite(tensors[name]).all()]


def header_problems(stored: dict[str, StoredTensor], expected: dict[str, tuple], integers: tuple[str, ...] = ()
                    ) -> list[str]:
    """``shape_problems`` of a file's tensors as its header declares them, and every expected tensor of a dtype
    that cannot hold it: floating point (LORA_DTYPES), or for the names in ``integers`` an integer dtype. Nothing
    is read, so a file declaring gigabytes under a name not expected costs its header alone."""
    problems = shape_problems({name: t.shape for name, t in stored.items()}, expected)
    for name in expected:
        if name in stored and name in integers and stored[name].dtype not in INTEGER_DTYPES:
            problems.append(f"{name} is {stored[name].dtype}, expected an integer")
        elif name in stored and name not in integers and stored[name].dtype not in LORA_DTYPES:
            problems.append(f"{name} is {stored[name].dtype}, expected floating point ({', '.join(LORA_DTYPES)})")
    return problems


def read_expected(path: Path, expected: dict[str, tuple], rename: Callable[[str], str] | None = None
                  ) -> tuple[dict[str, np.ndarray], list[str]]:
    """The ``expected`` tensors (name -> shape) of a safetensors file as float32, and every problem with them.

    The header is checked first (``header_problems``: names, shapes, floating-point dtypes), and the tensors are
    read only when it matches, so nothing unexpected is ever read; then every value must be finite (as float32: a
    float64 beyond its range is infinite). ``rename`` maps a stored name to an expected one (PEFT's adapter name
    in keys); two stored names that map to one are a problem, not one silently winning."""
    stored: dict[str, StoredTensor] = {}
    problems = []
    for name, tensor in stored_tensors([path]).items():
        key = rename(name) if rename else name
        if key in stored:
            problems.append(f"{key} is stored twice (once as {name})")
        stored[key] = tensor
    problems += header_problems(stored, expected)
    if problems:
        return {}, problems
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, not warned about
        tensors = {name: to_float32(stored[name].dtype, stored[name].read()) for name in expected}
    return tensors, [f"{name} holds NaN or infinite values" for name, array in tensors.items()
                     if not np.isfinite(array).all()]


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, float ones (bfloat16 included) as float32."""
    return {name: to_float32(dtype, array) if dtype in FLOAT_DTYPES else array
            for name, dtype, array in read_safetensors(path)}


def to_float32(dtype: str, array: np.ndarray) -> np.ndarray:
    return bf16_to_f32(array) if dtype == "BF16" else array.astype(np.float32)


def from_float32(dtype: str, values: np.ndarray) -> np.ndarray:
    return f32_to_bf16(values) if dtype == "BF16" else values.astype(NUMPY_DTYPES[dtype])


def nonfinite(arrays: dict[str, np.ndarray], block: int = 1 << 22) -> list[str]:
    """The names of the floating-point ``arrays`` that hold NaN or infinity, read ``block`` values at a time so
    that a mapped file is checked with a few megabytes of memory (one pass at memory speed: runtime/frozen.py)."""
    def finite_bf16(bits: np.ndarray) -> bool:
        return bool((np.bitwise_and(bits, 0x7F80) != 0x7F80).all())  # all exponent bits set: infinity or NaN

    def finite_float(values: np.ndarray) -> bool:
        return bool(np.isfinite(values).all())

    bad = []
    for name, array in arrays.items():
        if is_bf16(array):
            finite = finite_bf16
        elif np.issubdtype(array.dtype, np.floating):
            finite = finite_float
        else:
            continue
        flat = array.reshape(-1)
        if not all(finite(flat[i: i + block]) for i in range(0, flat.size, block)):
            bad.append(name)
    return bad


def views_of(weights: dict[str, np.ndarray], views: dict[str, dict]) -> dict[str, np.ndarray]:
    """Each view (name -> {"of": a weight of ``weights``, "rows": [start, end]}, the manifest's frozen_views) as
    those rows of that weight's array: the same memory, no copy."""
    return {name: weights[view["of"]][view["rows"][0]: view["rows"][1]] for name, view in views.items()}


def map_layout(path: Path, layout: dict[str, dict]) -> dict[str, np.ndarray]:
    """Map ``path`` read-only; the array of every weight in ``layout`` (name -> dtype, shape, offset,
    length in bytes), as the manifest describes frozen_weights.bin. A file shorter than the layout (a
    copy cut short) is a one-line error before anything is mapped."""
    needed = max((p["offset"] + p["length"] for p in layout.values()), default=0)
    size = path.stat().st_size
    if size < needed:
        raise OrtloraError(f"{path} is {size:,} bytes, the manifest's layout needs {needed:,} (a truncated copy?); "
                           f"{REBUILD}")
    if not layout:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: data[p["offset"]: p["offset"] + p["length"]] if p["dtype"] == "uint4"  # packed, two to a byte
            else data[p["offset"]: p["offset"] + p["length"]].view(NUMPY_VIEW.get(p["dtype"], p["dtype"]))
            .reshape(p["shape"])
            for name, p in layout.items()}
