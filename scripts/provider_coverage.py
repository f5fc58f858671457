"""Which share of the portable training graph CoreML and NNAPI would take, without their hardware.

    python scripts/provider_coverage.py --artifacts artifacts/tiny

ONNX Runtime ships the partitioning rules of its CoreML (NeuralNetwork and MLProgram) and NNAPI
execution providers as tables (onnxruntime.tools.mobile_helpers); this runs its usability checker's
partitioning over the portable training graph, with the graph's own shapes, and prints per provider
how many nodes it would take, into how many partitions, and which operators it would leave to the
CPU. It is ORT's static estimate, not a run on a device: the real split is what a run on the device
reports (``ortlora-train`` prints it at the end, from ORT's profile). Needs the onnx package.
The structure is the same at every model size, so the tiny build answers for the large ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def coverage(model_path: Path, fixed_shapes: bool) -> dict[str, dict]:
    import onnx
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    checks = {
        "CoreML MLProgram": lambda m, f: uc.check_coreml_partitions(m, f, "coreml_supported_mlprogram_ops.md"),
        "CoreML NeuralNetwork": lambda m, f: uc.check_coreml_partitions(m, f, "coreml_supported_neuralnetwork_ops.md"),
        "NNAPI": uc.check_nnapi_partitions,
    }
    report = {}
    for name, check in checks.items():
        info = check(model, not fixed_shapes)
        report[name] = {
            "nodes": info.num_nodes,
            "supported": info.num_supported_nodes,
            "share": round(info.num_supported_nodes / info.num_nodes, 3),
            "partitions": info.num_partitions,
            "unsupported_ops": sorted(info.unsupported_ops),
            "ops_unsupported_for_rank": sorted(info.ops_with_unsupported_rank),
            "nodes_unsupported_for_dynamic_shapes": info.nodes_unsupported_due_to_dynamic_input,
        }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="artifacts/tiny")
    parser.add_argument("--graph", choices=("portable_training_model", "portable_eval_model"), default="portable_training_model")
    parser.add_argument("--json", default=None, help="also write the report to this file")
    args = parser.parse_args(argv)

    import onnx
    import onnxruntime

    from ortlora.manifest import Manifest

    artifacts = Path(args.artifacts)
    source = artifacts / Manifest.load(artifacts).files[args.graph]
    with tempfile.TemporaryDirectory() as tmp:
        # The checker works on a self-contained copy: weights inline (the structure is what counts).
        inline = Path(tmp) / source.name
        onnx.save(onnx.load(str(source)), str(inline))
        reports = {"dynamic shapes": coverage(inline, fixed_shapes=False),
                   "fixed shapes": coverage(inline, fixed_shapes=True)}
    print(f"{source} (onnxruntime {onnxruntime.__version__} partitioning rules)")
    for shapes, report in reports.items():
        print(f"\n{shapes}:")
        for ep, r in report.items():
            print(f"  {ep:<22} {r['supported']:>5}/{r['nodes']} nodes ({100 * r['share']:.0f}%) in {r['partitions']} partitions;"
                  f" left to the CPU: {', '.join(r['unsupported_ops']) or 'nothing'}")
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
