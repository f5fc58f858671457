"""The first GPU run (issue 28, item 3): the portable training graph on WebGPU and CUDA against the CPU provider and
PyTorch + PEFT on the same GPU, in a few minutes, written to one JSON report.

    python scripts/gpu_check.py --wheels WHEELHOUSE [--shape qwen2.5-0.5b] [--out gpu_check.json]

For a machine with an NVIDIA GPU, CUDA 13, PyTorch and the plain onnxruntime (1.30) installed and no package
registry: everything else comes from WHEELHOUSE, a folder of wheels that travels with the repository:
onnxruntime_ep_webgpu-0.4.0 (needs libvulkan.so.1) with onnxruntime 1.31 or later (1.30 does not report the nodes
a plugin runs), onnxruntime_gpu-1.31.x (links CUDA 13), and for the build onnxruntime_training_cpu-1.19.2,
onnx-1.23.2, transformers-5.23, peft, safetensors, tokenizers, jinja2, tqdm and their dependencies (make it
elsewhere: ``pip download -d WHEELHOUSE -e '.[build,test]' onnxruntime-gpu 'onnxruntime>=1.31'
onnxruntime-ep-webgpu==0.4.0``). Three environments under --work, each seeing the machine's own packages
(--system-site-packages, so PyTorch and its CUDA libraries are the machine's): build (the training package:
builds the artifacts, runs PyTorch + PEFT), webgpu (onnxruntime >= 1.31 and the WebGPU plugin) and cuda
(onnxruntime-gpu over the machine's onnxruntime). ortlora itself is read from this checkout (PYTHONPATH).

Steps: a random model of --shape and its artifacts (scripts/bench.py's make_shape, scripts/build_artifacts.py);
then per provider (cpu, webgpu, cuda), a process of its own: one step of the portable graph on a seeded batch
(2 x 128, a third of the labels ignored) with seeded LoRA weights, its loss and LoRA gradients against the CPU
provider's, the nodes each provider ran, then forward + backward + AdamW step times and the process's peak GPU
memory (nvidia-smi, sampled) at 2 x 128 and 8 x 512; PyTorch + PEFT on the GPU, eager fp32 and bf16 autocast,
at the same sizes. A provider that refuses is recorded with its one line, and the rest goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((2, 128), (8, 512))
ENVIRONMENTS = {  # name -> the wheels it adds (package names as pip spells them), over the machine's packages
    "build": ["onnxruntime-training-cpu", "onnx", "transformers", "peft", "safetensors", "tokenizers", "jinja2", "tqdm"],
    "webgpu": ["onnxruntime>=1.31", "onnxruntime-ep-webgpu", "safetensors", "tokenizers", "jinja2", "tqdm"],
    "cuda": ["onnxruntime-gpu", "safetensors", "tokenizers", "jinja2", "tqdm"],
}
PROVIDERS = {"cpu": "webgpu", "webgpu": "webgpu", "cuda": "cuda"}  # --ep -> the environment it runs in


# -- pure helpers (tests/test_plugin_eps.py) ----------------------------------------------------------

def wheel_of(wheels: list[str], package: str) -> str | None:
    """The file name in ``wheels`` of ``package`` (pip's name: dashes; wheel names: underscores), newest first."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = sorted((w for w in wheels if w.endswith(".whl") and re.sub(r"[-_.]+", "_", w.split("-")[0]).lower() == stem),
                   reverse=True)
    return found[0] if found else None


def missing_wheels(wheels: list[str]) -> list[str]:
    """The plugin and provider wheels this check cannot go without (the WebGPU plugin's onnxruntime: 1.31 or later)."""
    plain = wheel_of(wheels, "onnxruntime")
    new_enough = plain is not None and tuple(int(p) for p in plain.split("-")[1].split(".")[:2]) >= (1, 31)
    return ([] if new_enough else ["onnxruntime>=1.31"]) + [
        p for p in ("onnxruntime-ep-webgpu", "onnxruntime-gpu", "onnxruntime-training-cpu") if not wheel_of(wheels, p)]


def gpu_memory_mb(nvidia_smi_csv: str, pid: int) -> float:
    """The memory (MiB) nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits gives ``pid``."""
    total = 0.0
    for line in nvidia_smi_csv.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].replace(".", "", 1).isdigit():
            total += float(fields[1])
    return total


def compare(got: dict, reference: dict) -> dict:
    """Largest relative difference of the loss and of any LoRA gradient (to the reference's largest entry)."""
    import numpy as np

    loss = abs(float(got["loss"]) - float(reference["loss"])) / max(abs(float(reference["loss"])), 1e-12)
    grads = {name: float(np.abs(np.asarray(got[name]) - np.asarray(reference[name])).max()
                         / max(float(np.abs(np.asarray(reference[name])).max()), 1e-12))
             for name in reference if name != "loss"}
    worst = max(grads, key=grads.get) if grads else ""
    return {"loss_rel": loss, "grad_rel": grads.get(worst, 0.0), "worst_grad": worst}


def timing(seconds: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(seconds), "best_ms": 1e3 * min(seconds), "steps": len(seconds)}


# -- GPU memory, sampled -------------------------------------------------------------------------

class GpuMemory:
    """This process's peak GPU memory by nvidia-smi, sampled every 0.1 s while in use."""

    def __init__(self):
        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.peak_mb = max(self.peak_mb, gpu_memory_mb(out, os.getpid()))
            except (OSError, subprocess.SubprocessError):
                return
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- workers (each in its own process and environment) ---------------------------------------------

def seeded(manifest, vocab: int, batch: int, seq: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -100
    labels[rng.random(labels.shape) < 0.33] = -100
    weights = {p.onnx_name: (0.1 * rng.standard_normal(p.shape)).astype(np.float32) for p in manifest.parameters}
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}, weights


def ort_worker(ep: str, artifacts: Path, out: Path, steps: int) -> dict:
    import numpy as np

    from ortlora.manifest import Manifest
    from ortlora.runtime.optim import AdamW, AdamWConfig
    from ortlora.runtime.session_backend import OrtSessionBackend

    manifest = Manifest.load(artifacts)
    vocab = json.loads((artifacts / manifest.files["config"]).read_text())["vocab_size"]
    report: dict = {"ep": ep}
    with GpuMemory() as memory:
        started = time.perf_counter()
        backend = OrtSessionBackend(artifacts, manifest, ep=ep)
        report.update(load_s=time.perf_counter() - started, providers=backend.providers, route=backend.route)
        batch, weights = seeded(manifest, vocab, 2, 128)
        backend.set_weights(weights)
        loss = backend.train_step(batch)
        np.savez(out, loss=loss, **backend.gradients())
        report["nodes"] = backend.placement
        optimizer = AdamW(AdamWConfig())
        for b, s in SIZES:
            batch, _ = seeded(manifest, vocab, b, s, seed=1)
            times = []
            for _ in range(steps + 1):  # the first is warm-up
                t0 = time.perf_counter()
                backend.zero_grad()
                backend.train_step(batch)
                current = backend.weights()
                optimizer.step(current, backend.gradients(), 1e-4)
                backend.set_weights(current)
                times.append(time.perf_counter() - t0)
            report[f"{b}x{s}"] = timing(times[1:])
    report["peak_gpu_mb"] = memory.peak_mb
    return report


def torch_worker(artifacts: Path, autocast: bool, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ortlora.manifest import Manifest

    manifest = Manifest.load(artifacts)
    lora = manifest.lora
    base = AutoModelForCausalLM.from_pretrained(manifest.base_model_dir(artifacts), attn_implementation="eager",
                                                dtype=torch.float32).cuda()
    model = get_peft_model(base, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                            target_modules=lora["targets"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = base.config.vocab_size
    report: dict = {"system": "torch-bf16" if autocast else "torch", "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name()}
    for b, s in SIZES:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (b, s), generator=generator).cuda()
        labels = torch.roll(ids, -1, 1)
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        report[f"{b}x{s}"] = {**timing(times[1:]), "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20}
    return report


# -- the driver ----------------------------------------------------------------------------------

def run(command: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def make_environments(work: Path, wheels: Path) -> dict[str, Path]:
    """One virtual environment per ENVIRONMENTS entry, over the machine's packages, from the wheelhouse only."""
    pythons = {}
    for name, packages in ENVIRONMENTS.items():
        venv = work / f"venv-{name}"
        python = venv / "bin" / "python"
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
            done = run([str(python), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), *packages])
            if done.returncode != 0:
                raise SystemExit(f"gpu_check: installing {name} from {wheels} failed: {done.stderr.strip()[-500:]}")
        pythons[name] = python
    return pythons


def child(python: Path, *args: str) -> dict:
    """This script as a worker under ``python``; its last stdout line is JSON, or its error is returned."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = run([str(python), __file__, *args], env=env)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return {"error": (lines or ["(no message)"])[-1][:1000]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, help="the wheelhouse (see above)")
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="environments and temporary files")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per size (after one warm-up step)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--worker", choices=("ort", "torch", "torch-bf16", "build"), help=argparse.SUPPRESS)
    parser.add_argument("--ep", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "ort":
        print(json.dumps(ort_worker(args.ep, args.artifacts, args.npz, args.steps)))
        return 0
    if args.worker in ("torch", "torch-bf16"):
        print(json.dumps(torch_worker(args.artifacts, args.worker == "torch-bf16", args.steps)))
        return 0
    if args.worker == "build":
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench import make_shape  # a random model laid out as the published checkpoint is

        model = make_shape(args.shape)
        started = time.perf_counter()
        done = run([sys.executable, str(ROOT / "scripts" / "build_artifacts.py"), "--model", str(model), "--out",
                    str(args.artifacts), "--force"], timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"build failed: {(done.stderr.strip() or done.stdout.strip()).splitlines()[-1]}")
        print(json.dumps({"build_s": time.perf_counter() - started, "model": str(model)}))
        return 0

    if not args.wheels or not args.wheels.is_dir():
        parser.error("--wheels DIR: the folder of wheels (this machine reaches no registry)")
    lacking = missing_wheels([p.name for p in args.wheels.iterdir()])
    if lacking:
        parser.error(f"--wheels {args.wheels} has no wheel of {', '.join(lacking)}")
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"machine": run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                    "--format=csv,noheader"]).stdout.strip(), "shape": args.shape}
    pythons = make_environments(args.work, args.wheels)
    artifacts = ROOT / "artifacts" / args.shape
    report["build"] = child(pythons["build"], "--worker", "build", "--shape", args.shape, "--artifacts", str(artifacts))
    if "error" in report["build"]:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"gpu_check: the build failed: {report['build']['error']}", file=sys.stderr)
        return 1
    results = {}
    for ep, env in PROVIDERS.items():
        npz = args.work / f"{ep}.npz"
        results[ep] = child(pythons[env], "--worker", "ort", "--ep", ep, "--artifacts", str(artifacts), "--npz",
                            str(npz), "--steps", str(args.steps))
    if "error" not in results["cpu"]:
        import numpy as np

        with np.load(args.work / "cpu.npz") as reference:
            cpu = {k: reference[k] for k in reference.files}
        for ep in ("webgpu", "cuda"):
            if "error" not in results[ep]:
                with np.load(args.work / f"{ep}.npz") as got:
                    results[ep]["vs_cpu"] = compare({k: got[k] for k in got.files}, cpu)
    for system in ("torch", "torch-bf16"):
        results[system] = child(pythons["build"], "--worker", system, "--artifacts", str(artifacts),
                                "--steps", str(args.steps))
    report.update(results=results, seconds=time.perf_counter() - started)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        sizes = ", ".join(f"{k} {r[k]['median_ms']:.0f} ms" for k in ("2x128", "8x512") if k in r)
        print(f"{name:<11} " + (f"refused: {r['error']}" if "error" in r else
                                f"{sizes}; GPU peak {r.get('peak_gpu_mb', r.get('8x512', {}).get('peak_gpu_mb', 0)):.0f} MB"
                                + (f"; vs CPU loss {r['vs_cpu']['loss_rel']:.1e}, gradients {r['vs_cpu']['grad_rel']:.1e}"
                                   if "vs_cpu" in r else "")))
    print(f"report: {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
