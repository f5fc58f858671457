"""A trained adapter in ONNX Runtime's own adapter format (``.onnx_adapter``), for per-request swapping.

The artifacts' inference and decoder graphs take every LoRA weight as an input whose initializer (the
untrained LoRA, B = 0) is its default, so without an adapter they run the base model. An ``.onnx_adapter``
file holds one adapter's weights under those input names; ONNX Runtime (>= 1.20) feeds them per run:

    adapter = onnxruntime.LoraAdapter()
    adapter.Load("adapter.onnx_adapter")
    options = onnxruntime.RunOptions()
    options.add_active_adapter(adapter)
    session.run(None, {"input_ids": ..., "attention_mask": ...}, options)   # no adapter: leave it out

and onnxruntime-genai loads the same file with ``og.Adapters`` (genai.py). The file is a flatbuffer
(onnxruntime/lora/adapter_format/adapter_schema.fbs, format version 1, identifier "TORT"):

    Adapter   { format_version: int, adapter_version: int, model_version: int, parameters: [Parameter] }
    Parameter { name: string, dims: [int64], data_type: TensorDataType (FLOAT = 1), raw_data: [uint8] (align 8) }

It is written here with the ``flatbuffers`` package (a dependency of every onnxruntime package), not with
``onnxruntime.AdapterFormat``, which only ONNX Runtime >= 1.20 has: so the training build (1.19.2) exports
too. tests/test_onnx_adapter.py reads the file back with ONNX Runtime 1.32's own AdapterFormat and runs it.

The adapter only means something on the graph it was trained with (rank, alpha and the LoRA formula are
in the graph): ``model_version`` holds the first 28 bits of the artifacts' id, for an app to check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError, listing
from ortlora.manifest import Manifest

ADAPTER_FILE = "adapter.onnx_adapter"
FORMAT_VERSION = 1  # onnxruntime/lora/adapter_format_version.h: kAdapterFormatVersion
IDENTIFIER = b"TORT"
FLOAT = 1  # TensorDataType: ONNX's TensorProto.FLOAT
GRAPHS = ("decoder", "inference")  # the graphs an adapter is fed to, by their manifest io names


def check_exportable(manifest: Manifest) -> None:
    """Refuse, in one line, artifacts whose adapters this format cannot carry to their graphs."""
    precision = manifest.model.get("base_precision", "fp32")
    if precision not in ("fp32", "bf16"):
        raise OrtloraError(f"these artifacts have a quantized base ({precision}); --to onnx-adapter and genai take fp32 "
                           "and bf16 bases only for now: use --to peft, merged or onnx")
    graphs = [g for g in GRAPHS if g in manifest.io]
    if "decoder" not in graphs:
        raise OrtloraError("these artifacts have no generation graph (built by an older ortlora); rebuild them with ortlora-build")
    # Every trained tensor (A, B, DoRA's magnitude, whatever the build made trainable) must be an input
    # of every graph the adapter is for, or ONNX Runtime refuses the run ("invalid input name").
    missing = [f"{p.onnx_name} ({g})" for g in graphs for p in manifest.parameters
               if p.onnx_name not in manifest.io[g]["inputs"]]
    if missing:
        raise OrtloraError(f"the artifacts' graphs do not take every adapter tensor as an input, so an .onnx_adapter "
                           f"cannot hold this adapter: {listing(missing)}")


def model_version(manifest: Manifest) -> int:
    """The artifacts' id as a non-negative int32: the first 7 hex digits (28 bits)."""
    try:
        return int(manifest.artifact_id[:7], 16)
    except ValueError:
        return 0


def adapter_bytes(tensors: dict[str, np.ndarray], adapter_version: int = 1, model_version: int = 0) -> bytes:
    """The .onnx_adapter flatbuffer of float32 ``tensors`` (name -> array), in the given order."""
    try:
        import flatbuffers
    except ImportError:  # every onnxruntime package depends on it
        raise OrtloraError("writing an .onnx_adapter needs the flatbuffers package: pip install flatbuffers") from None

    data_size = sum(np.asarray(t).nbytes for t in tensors.values())
    builder = flatbuffers.Builder(data_size + 1024 + 256 * len(tensors))
    parameters = []
    for name, tensor in tensors.items():
        tensor = np.ascontiguousarray(tensor, dtype="<f4")
        name_offset = builder.CreateString(name)
        dims = builder.CreateNumpyVector(np.asarray(tensor.shape, dtype="<i8"))
        # raw_data is declared force_align 8: pad so that the bytes start on an 8-byte boundary of the buffer.
        raw = tensor.reshape(-1).view(np.uint8)
        builder.Prep(8, raw.size)
        raw_data = builder.CreateNumpyVector(raw)
        builder.StartObject(4)
        builder.PrependUOffsetTRelativeSlot(0, name_offset, 0)
        builder.PrependUOffsetTRelativeSlot(1, dims, 0)
        builder.PrependInt32Slot(2, FLOAT, 0)
        builder.PrependUOffsetTRelativeSlot(3, raw_data, 0)
        parameters.append(builder.EndObject())
    builder.StartVector(4, len(parameters), 4)
    for offset in reversed(parameters):
        builder.PrependUOffsetTRelative(offset)
    vector = builder.EndVector()
    builder.StartObject(4)
    builder.PrependInt32Slot(0, FORMAT_VERSION, 0)
    builder.PrependInt32Slot(1, adapter_version, 0)
    builder.PrependInt32Slot(2, model_version, 0)
    builder.PrependUOffsetTRelativeSlot(3, vector, 0)
    builder.Finish(builder.EndObject(), file_identifier=IDENTIFIER)
    return bytes(builder.Output())


def write_adapter(manifest: Manifest, weights: dict[str, np.ndarray], path: Path) -> int:
    """Write the adapter ``weights`` (by ONNX name, from load_adapter) to ``path``; returns its size in bytes."""
    check_exportable(manifest)
    data = adapter_bytes({p.onnx_name: weights[p.onnx_name] for p in manifest.parameters},
                         model_version=model_version(manifest))
    path.write_bytes(data)
    return len(data)


def export(manifest: Manifest, weights: dict[str, np.ndarray], staging: Path) -> str:
    """``ortlora-export --to onnx-adapter``: the adapter file alone, for the artifacts' graphs or a --to genai folder."""
    size = write_adapter(manifest, weights, staging / ADAPTER_FILE)
    return f"ONNX Runtime adapter {ADAPTER_FILE} ({len(weights)} tensors, {size:,} bytes)"
