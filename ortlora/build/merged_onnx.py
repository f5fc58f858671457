"""A merged model (base weights + B @ A * scaling) as an inference ONNX model with no LoRA left in it.

input_ids, attention_mask -> logits, like the artifacts' inference model but with the adapter
folded into the weights, for apps that serve one adapter; ``--ort-format`` adds ``model.ort``, the
format ONNX Runtime's mobile builds load.
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


def export(base: Path, manifest: Manifest, weights: dict[str, np.ndarray], out: Path, artifacts: Path,
           ort_format: bool) -> str:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from ortlora.build.export import (
        CausalLMLogits,
        export_onnx,
        load_exported,
        save_model,
        stamp_ir_version,
    )
    from ortlora.errors import OrtloraError
    from ortlora.handoff.merge import write_merged

    transformers.logging.disable_progress_bar()
    # The merged model is written inside ``out`` (the export's staging directory): a kill leaves it there,
    # and the staging directory of a dead process is removed at the next start.
    with tempfile.TemporaryDirectory(prefix=".merged-", dir=out) as tmp:
        merged = Path(tmp) / "merged"
        merged.mkdir()
        write_merged(base, manifest, weights, merged, artifacts, max_shard_bytes=2**62)
        model = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager", dtype=torch.float32).eval()
        for name in ("config.json", "generation_config.json", *manifest.files["tokenizer"]):
            if (merged / name).is_file():
                shutil.copy2(merged / name, out / name)
        example = torch.randint(0, model.config.vocab_size, (1, 8))
        export_onnx(CausalLMLogits(model, []), (example, torch.ones_like(example)), ["input_ids", "attention_mask"],
                    ["logits"], Path(tmp) / MODEL, fold=True)
        graph = load_exported(Path(tmp) / MODEL)
    stamp_ir_version(graph)
    save_model(graph, out / MODEL)  # weights over 1 GiB go to model.onnx.data
    del graph
    summary = f"merged ONNX model {MODEL}"
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
