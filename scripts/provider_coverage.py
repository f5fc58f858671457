"""Which execution providers run the portable training graph, how much of it, how exactly and how fast.

    python scripts/provider_coverage.py --artifacts artifacts/tiny                # every provider here
    python scripts/provider_coverage.py --artifacts artifacts/tiny --providers openvino --steps 20
    python scripts/provider_coverage.py --artifacts artifacts/tiny --static       # CoreML / NNAPI estimate
    python scripts/provider_coverage.py --artifacts artifacts/tiny --providers ggml --provider-option partial=1

Run mode (the default), with the installed onnxruntime: for every available execution provider
(or those named), a process of its own creates a session of ``portable_training.onnx`` with
``[provider, CPU]`` as ``ortlora-train --backend ort-session`` does (frozen weights handed over
from one mapping, memory pattern off), runs one step on a seeded batch with seeded LoRA weights,
reads from ONNX Runtime's profile which provider ran each node, then times ``--steps`` more steps.
The report gives per provider: nodes run by each provider (a compiling provider such as OpenVINO
shows up as fused subgraphs, the CPU's share as the graph's own nodes, by operator), the loss and
every LoRA gradient against the CPU provider's (largest absolute and relative difference), the
load time, the best and median step time, and the process's peak resident memory. Installed plugin
providers (onnxruntime-ep-NAME, onnxruntime-ggml) are run too, each registered and selected on its device
as ``ortlora-train --ep NAME`` does (ortlora/runtime/providers.py), with ortlora's options for it.

Static mode (``--static``): ONNX Runtime ships the partitioning rules of its CoreML (NeuralNetwork
and MLProgram) and NNAPI execution providers as tables (onnxruntime.tools.mobile_helpers); this runs
its usability checker's partitioning over the graph, with the graph's own shapes, and prints how many
nodes each would take, into how many partitions, and which operators it would leave to the CPU. It
is ORT's estimate, not a run on a device. Needs the onnx package. The structure is the same at every
model size, so the tiny build answers for the large ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU = "CPUExecutionProvider"
# The options ortlora-train passes (ortlora/runtime/providers.py), so that gradients are fp32:
# OpenVINO's CPU device defaults to FP32 in onnxruntime-openvino 1.24, its GPU device to FP16.
# OpenVINO's own thread count (num_of_threads) is added from --threads.
PROVIDER_OPTIONS = {"OpenVINOExecutionProvider": {"device_type": "CPU", "precision": "FP32"}}


# -- static: ORT's own partitioning rules for CoreML and NNAPI ---------------------------------

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


def static_report(source: Path, out_json: str | None) -> int:
    import onnx
    import onnxruntime

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
    if out_json:
        Path(out_json).write_text(json.dumps(reports, indent=2) + "\n")
    return 0


# -- run: one process per provider --------------------------------------------------------------

def seeded_batch(vocab: int, batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Random tokens, next-token labels, a random third of them ignored (as masked prompts are)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -100
    labels[rng.random(labels.shape) < 0.33] = -100
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def seeded_weights(manifest, seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    """Non-zero A and B (B is zero at init, which would make every A gradient zero)."""
    rng = np.random.default_rng(seed)
    return {p.onnx_name: (scale * rng.standard_normal(p.shape)).astype(np.float32) for p in manifest.parameters}


def placement(profile_path: str) -> dict[str, dict[str, int]]:
    """Provider -> operator -> nodes run, from an ONNX Runtime profile (then deleted)."""
    path = Path(profile_path)
    try:
        events = json.loads(path.read_text())
    finally:
        path.unlink(missing_ok=True)
    seen: dict[str, dict[str, str]] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and args.get("provider"):
            name = event["name"].removesuffix("_kernel_time").removesuffix("_fence_before").removesuffix("_fence_after")
            seen.setdefault(args["provider"], {})[name] = args.get("op_name", "?")
    result = {}
    for provider, nodes in seen.items():
        ops: dict[str, int] = {}
        for op in nodes.values():
            ops[op] = ops.get(op, 0) + 1
        result[provider] = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    return result


def run_one(args) -> int:
    """The child: one session with [provider, CPU], one profiled step, then timed steps."""
    import onnxruntime as ort

    from ortlora.manifest import Manifest
    from ortlora.runtime.frozen import map_frozen_weights, share_with
    from ortlora.runtime.providers import options_for, resolve

    artifacts = Path(args.artifacts)
    manifest = Manifest.load(artifacts)
    graph = artifacts / (args.file or manifest.files["portable_training_model"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.enable_mem_pattern = False
    options.intra_op_num_threads = args.threads
    frozen = map_frozen_weights(artifacts, manifest)
    keep = share_with(options, frozen)
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"provider-coverage-{os.getpid()}")
    provider = args.child
    extra = dict(item.partition("=")[::2] for item in args.provider_option)
    target = None if provider in ort.get_available_providers() else resolve(provider)  # a plugin's --ep name
    if target is not None:
        provider_options = options_for(target, args.threads, None, extra)
        options.add_provider_for_devices(list(target.devices), provider_options)
        provider = target.provider
    else:
        provider_options = dict(PROVIDER_OPTIONS.get(provider, {}))
        if provider == "OpenVINOExecutionProvider" and args.threads:
            provider_options["num_of_threads"] = str(args.threads)
        provider_options.update(extra)
    providers = None if target else [(provider, provider_options)] + ([CPU] if provider != CPU else [])

    started = time.perf_counter()
    session = ort.InferenceSession(str(graph), options, providers=providers)
    load_s = time.perf_counter() - started
    config = json.loads((artifacts / "config.json").read_text())
    feeds = seeded_batch(config["vocab_size"], args.batch, args.seq, args.seed)
    feeds.update(seeded_weights(manifest, args.seed))
    outputs = [o.name for o in session.get_outputs()]

    started = time.perf_counter()
    first = session.run(outputs, feeds)
    first_s = time.perf_counter() - started
    nodes = placement(session.end_profiling())
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        session.run(outputs, feeds)
        times.append(time.perf_counter() - started)
    np.savez(args.out, **dict(zip(outputs, first)))
    report = {
        "provider": provider, "provider_options": provider_options, "session_providers": session.get_providers(),
        "plugin": target.route if target else None,
        # ONNX Runtime's Python API retries with the CPU provider alone when a provider fails to start; a plugin
        # that takes no node stays in the list and runs nothing
        "fell_back": provider not in session.get_providers() or provider != CPU and provider not in nodes,
        "nodes": nodes, "load_s": load_s, "first_step_s": first_s,
        "best_step_s": min(times) if times else None, "median_step_s": float(np.median(times)) if times else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    Path(args.out).with_suffix(".json").write_text(json.dumps(report))
    del keep
    return 0


def compare(got: dict, reference: dict) -> dict[str, float]:
    """Largest absolute and relative difference of the loss and of any LoRA gradient."""
    loss_abs = abs(float(got["loss"]) - float(reference["loss"]))
    grad_abs, grad_rel, worst = 0.0, 0.0, ""
    for name in reference:
        if name == "loss":
            continue
        diff = float(np.abs(got[name] - reference[name]).max())
        rel = diff / max(float(np.abs(reference[name]).max()), 1e-12)
        grad_abs = max(grad_abs, diff)
        if rel > grad_rel:
            grad_rel, worst = rel, name
    return {"loss_abs": loss_abs, "loss_rel": loss_abs / max(abs(float(reference["loss"])), 1e-12),
            "grad_abs": grad_abs, "grad_rel": grad_rel, "worst_grad": worst}


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_report(args) -> int:
    import onnxruntime as ort

    from ortlora.runtime.providers import plugins

    available = ort.get_available_providers()
    installed = sorted(plugins())  # plugin packages, by --ep name; each child registers its own
    wanted = available + installed if not args.providers else [
        p if p.endswith("ExecutionProvider") or p in installed else _provider_name(p) for p in args.providers.split(",")]
    missing = [p for p in wanted if p not in available and p not in installed]
    if missing:
        print(f"not available in onnxruntime {ort.__version__}: {', '.join(missing)} (it has {', '.join(available)}; "
              f"plugins: {', '.join(installed) or 'none'})", file=sys.stderr)
        return 2
    order = [CPU] + [p for p in wanted if p != CPU]  # the CPU provider is the reference
    reports, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # interleaved rounds: the machine's noise hits every provider alike
            for provider in order:
                out = Path(tmp) / f"{provider}-{round_}.npz"
                command = [sys.executable, __file__, "--artifacts", args.artifacts, "--child", provider, "--out", str(out),
                           "--steps", str(args.steps), "--threads", str(args.threads), "--batch", str(args.batch),
                           "--seq", str(args.seq), "--seed", str(args.seed)]
                command += ["--file", args.file] if args.file else []
                for item in args.provider_option:
                    command += ["--provider-option", item]
                child = subprocess.run(command, capture_output=True, text=True)
                if child.returncode != 0:
                    reports[provider] = {"error": _last_error(child.stderr)}
                    continue
                report = json.loads(out.with_suffix(".json").read_text())
                previous = reports.get(provider)
                if previous and "error" not in previous:  # keep the best of the rounds
                    for key in ("load_s", "best_step_s", "median_step_s", "peak_rss_mb"):
                        report[key] = min(report[key], previous[key])
                reports[provider] = report
                with np.load(out) as data:
                    results[provider] = {k: data[k] for k in data.files}
    for provider, report in reports.items():
        if provider in results and CPU in results:
            report["vs_cpu"] = compare(results[provider], results[CPU])

    print(f"{args.artifacts}: onnxruntime {ort.__version__}, {cpu_model()}, {args.threads} threads, "
          f"batch {args.batch}x{args.seq}, {args.steps} timed steps, best of {args.rounds} rounds")
    for provider, r in reports.items():
        print(f"\n{provider}")
        if "error" in r:
            print(f"  failed: {r['error']}")
            continue
        if r.get("plugin"):
            print(f"  {r['plugin']}, options {r['provider_options']}")
        if r["fell_back"]:
            print(f"  {provider} did not start or took no node (options {r['provider_options']}); ONNX Runtime ran the "
                  "CPU provider alone")
        for ran_on, ops in r["nodes"].items():
            listing = ", ".join(f"{op} {n}" for op, n in ops.items())
            print(f"  {ran_on}: {sum(ops.values())} nodes ({listing})")
        if provider != CPU and "vs_cpu" in r:
            d = r["vs_cpu"]
            print(f"  vs CPU: loss abs {d['loss_abs']:.2e} rel {d['loss_rel']:.2e}; gradients abs {d['grad_abs']:.2e}"
                  f" rel {d['grad_rel']:.2e} (largest: {d['worst_grad']})")
        print(f"  load {r['load_s']:.2f} s, first step {1000 * r['first_step_s']:.1f} ms, step best "
              f"{1000 * r['best_step_s']:.1f} ms, median {1000 * r['median_step_s']:.1f} ms, peak RSS {r['peak_rss_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "onnxruntime": ort.__version__, "reports": reports},
                                              indent=2) + "\n")
    return 1 if any("error" in r or r.get("fell_back") for r in reports.values()) else 0


def _provider_name(short: str) -> str:
    from ortlora.runtime.providers import PROVIDERS

    return PROVIDERS.get(short, short)


def _last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    fail = [line for line in lines if "FAIL" in line or "Error" in line or "error" in line]
    return (fail or lines or ["(no message)"])[-1][:2000]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="artifacts/tiny")
    parser.add_argument("--static", action="store_true", help="ORT's static CoreML / NNAPI estimate instead of runs")
    parser.add_argument("--graph", choices=("portable_training_model", "portable_eval_model"), default="portable_training_model",
                        help="(--static) which graph to check")
    parser.add_argument("--providers", default="", help="comma-separated, short (openvino) or full names; default: all available")
    parser.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra option for the provider under test (repeatable)")
    parser.add_argument("--file", default=None, help="another training graph in the artifact directory (for experiments)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the profiled one")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; the best is kept")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        return run_one(args)
    if args.static:
        from ortlora.manifest import Manifest

        artifacts = Path(args.artifacts)
        return static_report(artifacts / Manifest.load(artifacts).files[args.graph], args.json)
    return run_report(args)


if __name__ == "__main__":
    sys.exit(main())
