"""A merged model (base weights + B @ A * scaling) as an inference ONNX model with no LoRA left in it.

input_ids, attention_mask -> logits, like the artifacts' inference model but with the adapter
folded into the weights, for apps that serve one adapter; ``--ort-format`` adds ``model.ort``, the
format ONNX Runtime's mobile builds load.

The merged weights are written as the merged Hugging Face export writes them (the base model's dtype,
so bf16 rounds as torch rounds), then the graph is traced from the weightless skeleton and the weights
streamed into ``model.onnx.data`` in float32, as the build streams frozen_weights.bin: memory follows
a shard of the merged model, not the model.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ortlora.manifest import Manifest

MODEL = "model.onnx"
WEIGHTS = "model.onnx.data"
MERGED_SHARD_BYTES = 1 << 30  # the merged model is written (and held) a shard at a time


def export(base: Path, manifest: Manifest, weights: dict[str, np.ndarray], out: Path, artifacts: Path,
           ort_format: bool) -> str:
    import onnx
    import torch
    import transformers

    from ortlora.build import frozen_weights
    from ortlora.build.export import CausalLMLogits, export_onnx, load_exported, stamp_ir_version
    from ortlora.build.skeleton import load_skeleton
    from ortlora.errors import OrtloraError
    from ortlora.handoff.merge import write_merged
    from ortlora.weights import stored_tensors, weight_files

    transformers.logging.disable_progress_bar()
    # The merged model is written inside ``out`` (the export's staging directory): a kill leaves it there,
    # and the staging directory of a dead process is removed at the next start.
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=out) as tmp:
        merged = Path(tmp) / "merged"
        merged.mkdir()
        write_merged(base, manifest, weights, merged, artifacts, max_shard_bytes=MERGED_SHARD_BYTES)
        for name in ("config.json", "generation_config.json", *manifest.files["tokenizer"]):
            if (merged / name).is_file():
                shutil.copy2(merged / name, out / name)
        skeleton = load_skeleton(merged)
        example = torch.randint(0, skeleton.model.config.vocab_size, (1, 8))
        export_onnx(CausalLMLogits(skeleton.model, []), (example, torch.ones_like(example)),
                    ["input_ids", "attention_mask"], ["logits"], Path(tmp) / MODEL, fold=True, frozen=skeleton.frozen)
        graph = load_exported(Path(tmp) / MODEL)
        storage = frozen_weights.plan([graph], {name: tuple(t.shape) for name, t in skeleton.frozen.items()})
        frozen_weights.fold(graph, storage)
        places = frozen_weights.layout(storage)
        frozen_weights.write(storage, places, stored_tensors(weight_files(merged)), out / WEIGHTS)
    frozen_weights.attach(graph, frozen_weights.references(places, location=WEIGHTS))
    stamp_ir_version(graph)
    onnx.save(graph, str(out / MODEL))
    summary = f"merged ONNX model {MODEL} with its weights in {WEIGHTS}"
    if ort_format:
        result = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(out / MODEL),
                                 "--output_dir", str(out)], capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise OrtloraError(f"conversion to the ORT format failed: {' '.join(tail)}")
        # The converter also writes a variant for runtime optimisations and operator lists for
        # reduced builds; model.ort is what apps load.
        for leftover in [*out.glob("*.required_operators*.config"), *out.glob("*.with_runtime_opt.ort")]:
            leftover.unlink()
        summary += " and model.ort"
    return summary
