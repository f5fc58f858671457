"""The frozen base weights, mapped once from ``frozen_weights.bin`` and shared by a run's sessions.

Every training graph (ORT's training and eval models, the portable training and eval graphs) reads
the frozen weights from that one file as external data. Left to itself, each ONNX Runtime session
maps or copies the file on its own, so a run that evaluates holds the weights twice (measured on the
0.5B shape: peak RSS 3.4 GB training only, 5.5 GB after one evaluation). Handed to the session
options as initializers, one read-only mapping serves them all (3.6 GB after the evaluation), and
ONNX Runtime reads nothing from the file itself. Pre-packing stays off, or ONNX Runtime would keep a
repacked copy of every weight for its matrix products.

Before any session sees them, the float weights are checked for NaN and infinity (a damaged copy of the
right size): one pass of np.isfinite, 4M values at a time, at about 7 GiB/s from the page cache (measured:
0.15 ms for the tiny model; 512 MiB in 0.07 s, so about 0.3 s for Qwen2.5-0.5B's 2 GB of float32). From a
cold disk it reads the pages the sessions would read anyway. ortlora-generate runs the same check.

The pages the check read are then released from the process (``release_pages``): the sessions map back what
they read. A provider that keeps copies of its own (OpenVINO's CPU plugin, a GPU's memory) reads the file while
it compiles and on its first run; the session backend runs such a session once on two tokens when it makes it
and releases the pages again, so a run on OpenVINO does not hold the file beside OpenVINO's copies (0.5B shape,
--precision bf16-all: peak 8.5 -> 5.5 GB; docs/performance.md).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

from ortlora.errors import REBUILD, OrtloraError, listing
from ortlora.manifest import Manifest
from ortlora.weights import is_bf16, map_layout, nonfinite, views_of


def map_frozen_weights(artifacts: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """Every frozen weight by name, as a read-only array over the mapped file (empty for older builds), and every
    row view of one (the manifest's frozen_views, the vocabulary's chunks) as those rows of its array, once
    every float tensor (weights, norms, biases, a quantized base's scales) is checked to hold no NaN or infinity:
    a damaged copy of the right size is refused in one line instead of training or generating on it.

    uint4 tensors (an int4 base) are left out: numpy has no 4-bit type, and ONNX Runtime 1.19 makes no
    OrtValue of one from numpy, so each session maps those from the file itself. Integer weights (int8 /
    int4 bases) can hold no NaN: damage to them, or finite garbage in a float one, is not detected."""
    if not manifest.frozen:
        return {}
    shared = {name: place for name, place in manifest.frozen.items() if place["dtype"] != "uint4"}
    path = Path(artifacts) / manifest.files["frozen_weights"]
    weights = map_layout(path, shared)
    bad = nonfinite(weights)
    if bad:
        raise OrtloraError(f"{path} holds NaN or infinite values in {listing(bad, 3)} (a damaged copy?); {REBUILD}")
    release_pages(path)  # the check read every page; the sessions map back what they read
    return weights | views_of(weights, manifest.frozen_views)


_MADV_DONTNEED = 4  # Linux's value (<sys/mman.h>)


def release_pages(path: Path) -> int:
    """Release the resident pages of every read-only mapping of ``path`` in this process (Linux; elsewhere
    nothing); returns the bytes of the mappings advised.

    madvise(MADV_DONTNEED) on a mapping that cannot be written holds no data of its own: it only unmaps the
    file's pages, which stay in the page cache, and the next read of one maps it back. That covers OpenVINO's
    own mapping of the file (it maps it read-only to build its copies) as well as ortlora's."""
    maps = Path("/proc/self/maps")
    if not sys.platform.startswith("linux") or not maps.exists():
        return 0
    target = str(Path(path).resolve())
    advised = 0
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[5] == target and "w" not in fields[1]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if _madvise(start, end - start, _MADV_DONTNEED) == 0:
                advised += end - start
    return advised


_madvise = ctypes.CDLL(None, use_errno=True).madvise if sys.platform.startswith("linux") else None
if _madvise is not None:
    _madvise.argtypes, _madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int


def share_with(options, weights: dict[str, np.ndarray]) -> list:
    """Give ``weights`` to a SessionOptions as initializers; returns what must outlive its sessions."""
    from onnxruntime import OrtValue

    options.add_session_config_entry("session.disable_prepacking", "1")
    values = []
    for name, array in weights.items():
        value = _bf16_ortvalue(array) if is_bf16(array) else OrtValue.ortvalue_from_numpy(array)
        options.add_initializer(name, value)
        values.append(value)
    return values


# A bf16 base's weights as bfloat16 OrtValues over the mapping. numpy has no bfloat16. The plain package
# (1.20 on) takes numpy's bits with an ONNX type; ONNX Runtime 1.19 makes OrtValues of numpy's types only, but
# takes DLPack tensors, which have a bfloat16: the tensor below describes the mapped bits as one (numpy's own
# DLPack export refuses a read-only mapping). The OrtValue holds the array, and share_with's caller holds the
# OrtValues while sessions run.
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32), ("dtype", _DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]
_KEEP = _DELETER(lambda _: None)  # the memory stays Python's: the OrtValue below keeps it alive
_CPU, _BFLOAT = 1, 4  # DLPack's kDLCPU and kDLBfloat
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16 (the runtime does not import onnx)
_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype, _capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def _bf16_ortvalue(bits: np.ndarray):
    """A bfloat16 OrtValue over ``bits`` (contiguous uint16), no copy."""
    from onnxruntime import OrtValue
    from onnxruntime.capi import _pybind_state as C

    if hasattr(OrtValue, "ortvalue_from_numpy_with_onnx_type"):
        return OrtValue.ortvalue_from_numpy_with_onnx_type(bits, _ONNX_BFLOAT16)

    shape = (ctypes.c_int64 * bits.ndim)(*bits.shape)
    managed = _DLManagedTensor(_DLTensor(bits.ctypes.data, _DLDevice(_CPU, 0), bits.ndim, _DLDataType(_BFLOAT, 16, 1),
                                         shape, None, 0), None, _KEEP)
    capsule = _capsule(ctypes.addressof(managed), b"dltensor", None)
    return OrtValue(C.OrtValue.from_dlpack(capsule, False), (bits, shape, managed))  # kept as long as the value
