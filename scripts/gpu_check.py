"""The first GPU run (issue 28, item 3): the portable training graph on WebGPU and CUDA against the CPU provider and
PyTorch + PEFT on the same GPU, in a few minutes, written to one JSON report.

    python scripts/gpu_check.py --wheels WHEELHOUSE [--shape qwen2.5-0.5b] [--out gpu_check.json]

For a machine with an NVIDIA GPU, CUDA 13, PyTorch (with its nvidia-* CUDA packages), transformers, the plain
onnxruntime (1.30) and ortlora's runtime dependencies installed, and no package registry. What it lacks comes from
WHEELHOUSE, a folder of wheels for the machine's Python (see SITES; onnxruntime-gpu 1.31 links CUDA 13), made
elsewhere with ``pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64
-d WHEELHOUSE PACKAGE==VERSION ...``. Each SITES entry is installed without dependencies into a folder of its own
under --work (``pip install --target``), which the workers put ahead of the machine's packages on PYTHONPATH. A
virtual environment would not do: made from a Python that is itself a virtual environment, it would not see that
environment's PyTorch. The CUDA worker's LD_LIBRARY_PATH also holds the CUDA and cuDNN libraries of the machine's
nvidia-* packages. ortlora itself is read from this checkout. onnxruntime-gpu also runs the CPU provider's reference
and takes the WebGPU plugin, which needs libvulkan.so.1 and a Vulkan driver for the GPU.

Steps: a random model of --shape and its artifacts (scripts/bench.py's make_shape, scripts/build_artifacts.py);
then per provider (cpu, cuda, and after PyTorch webgpu: see STEPS), a process of its own: one step of the portable
graph on a seeded batch (2 x 128, a third of the labels ignored) with seeded LoRA weights, its loss and LoRA
gradients against the CPU provider's, the nodes each provider ran; for webgpu and cuda also forward + backward +
AdamW step times and the process's GPU memory (nvidia-smi, sampled every 0.1 s: its peak after each size) at
2 x 128 and 8 x 512; PyTorch + PEFT on the GPU, eager fp32 and bf16 autocast, at the same sizes, its memory read the
same way (and its allocator's peak beside it). A provider that refuses is recorded with its one line, and the rest
goes on. The report is rewritten after each step, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = ((2, 128), (8, 512))
SITES = {  # name -> the wheels it adds over the machine's packages (pip's names), each without its dependencies
    # the build and PyTorch + PEFT: ORT's training package, and the versions pyproject.toml's build extra pins
    # (transformers 5.23 wants regex >= 2025.10.22; onnxruntime-training-cpu imports cerberus)
    "build": ["onnxruntime-training-cpu", "onnx", "transformers", "peft", "regex", "cerberus"],
    # the CPU provider's reference, WebGPU (a plugin of any onnxruntime >= 1.23; 1.31 reports its nodes) and CUDA
    "runtime": ["onnxruntime-gpu", "onnxruntime-ep-webgpu"],
}
# In this order, the report saved after each: the CPU provider's reference first, WebGPU (the least known: its shaders
# compile on first use) last, so that a run cut short by --budget keeps CUDA's and PyTorch's figures.
STEPS = ("cpu", "cuda", "torch", "torch-bf16", "webgpu")


# -- pure helpers (tests/test_plugin_eps.py) ----------------------------------------------------------

def wheel_of(wheels: list[str], package: str) -> str | None:
    """The file name in ``wheels`` of ``package`` (pip's name: dashes; wheel names: underscores), newest first."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = sorted((w for w in wheels if w.endswith(".whl") and re.sub(r"[-_.]+", "_", w.split("-")[0]).lower() == stem),
                   reverse=True)
    return found[0] if found else None


def missing_wheels(wheels: list[str]) -> list[str]:
    """The wheels this check cannot go without (onnxruntime-gpu 1.31 or later: 1.30 does not report the nodes a
    plugin runs)."""
    gpu = wheel_of(wheels, "onnxruntime-gpu")
    new_enough = gpu is not None and tuple(int(p) for p in gpu.split("-")[1].split(".")[:2]) >= (1, 31)
    return ([] if new_enough else ["onnxruntime-gpu>=1.31"]) + [
        p for p in ("onnxruntime-ep-webgpu", "onnxruntime-training-cpu") if not wheel_of(wheels, p)]


def library_dirs(roots: list[Path]) -> list[str]:
    """The folders of shared libraries in the nvidia-* packages under ``roots`` (the ``nvidia`` namespace package's
    folders: nvidia/cu13/lib, nvidia/cudnn/lib, ...), for LD_LIBRARY_PATH."""
    return sorted({str(lib) for root in roots for lib in Path(root).glob("*/lib") if any(lib.glob("*.so*"))})


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


def ort_worker(ep: str, artifacts: Path, out: Path, steps: int, timed: bool) -> dict:
    """One seeded step's loss and gradients into ``out``; with ``timed`` also the timed steps at SIZES (not for the
    CPU provider, the reference: its step times on the GPU machine's processor are no part of the comparison)."""
    import numpy as np
    import onnxruntime

    from ortlora.manifest import Manifest
    from ortlora.runtime.optim import AdamW, AdamWConfig
    from ortlora.runtime.session_backend import OrtSessionBackend

    manifest = Manifest.load(artifacts)
    vocab = json.loads((artifacts / manifest.files["config"]).read_text())["vocab_size"]
    report: dict = {"ep": ep, "onnxruntime": onnxruntime.__version__}
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
        for b, s in SIZES if timed else ():
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
            report[f"{b}x{s}"] = {**timing(times[1:]), "gpu_mb": memory.peak_mb}  # the process's, so far
    report["peak_gpu_mb"] = memory.peak_mb
    return report


def torch_worker(artifacts: Path, autocast: bool, steps: int, device: str = "cuda") -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ortlora.manifest import Manifest

    manifest = Manifest.load(artifacts)
    lora = manifest.lora
    base = AutoModelForCausalLM.from_pretrained(manifest.base_model_dir(artifacts), attn_implementation="eager",
                                                dtype=torch.float32).to(device)
    model = get_peft_model(base, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                            target_modules=lora["targets"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = base.config.vocab_size
    gpu = device == "cuda"
    report: dict = {"system": "torch-bf16" if autocast else "torch", "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if gpu else None}
    with GpuMemory() as memory:
        for b, s in SIZES:
            generator = torch.Generator().manual_seed(1)
            ids = torch.randint(0, vocab, (b, s), generator=generator).to(device)
            labels = torch.roll(ids, -1, 1)
            if gpu:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps + 1):
                if gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if gpu:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            # the process's GPU memory so far (nvidia-smi, as for ONNX Runtime) and the allocator's peak at this size
            report[f"{b}x{s}"] = {**timing(times[1:]), "gpu_mb": memory.peak_mb,
                                  "allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None}
    report["peak_gpu_mb"] = memory.peak_mb
    return report


# -- the driver ----------------------------------------------------------------------------------

def run(command: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``command`` in a process group of its own, all of which is killed if it outlasts ``timeout`` (a worker's own
    children too: the build worker runs scripts/build_artifacts.py)."""
    print("+ " + " ".join(command), flush=True)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as process:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def install_sites(work: Path, wheels: Path) -> dict[str, Path]:
    """Each SITES entry installed from the wheelhouse alone into a folder of its own."""
    sites = {}
    for name, packages in SITES.items():
        site = work / f"site-{name}"
        if not (site / ".complete").is_file():
            done = run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(site), "--find-links", str(wheels), *packages])
            if done.returncode != 0:
                raise SystemExit(f"gpu_check: installing {name} from {wheels} failed: {done.stderr.strip()[-500:]}")
            (site / ".complete").touch()
        sites[name] = site
    return sites


def nvidia_roots() -> list[Path]:
    """The folders of this Python's ``nvidia`` namespace package (PyTorch's CUDA and cuDNN libraries)."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def child(site: Path, *args: str, libraries: list[str] = (), timeout: int = 900) -> dict:
    """This script as a worker with ``site`` ahead of the machine's packages; its last stdout line is JSON, or its
    error is returned."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    if libraries:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libraries, *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    try:
        result = run([sys.executable, __file__, *args], env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return {"error": (lines or ["(no message)"])[-1][:1000]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(name: str, result: dict) -> str:
    if "error" in result:
        unrun = result["error"].startswith(("not run", "timed out"))
        return f"{name:<11} {'' if unrun else 'refused: '}{result['error']}"
    sizes = ", ".join(f"{k} {result[k]['median_ms']:.0f} ms" for k in ("2x128", "8x512") if k in result)
    peak = result.get("peak_gpu_mb") or 0
    versus = (f"; vs CPU loss {result['vs_cpu']['loss_rel']:.1e}, gradients {result['vs_cpu']['grad_rel']:.1e}"
              if "vs_cpu" in result else "")
    return f"{name:<11} {sizes or 'reference step'}; GPU peak {peak:.0f} MB{versus}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, help="the wheelhouse (see above)")
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="installed wheels and temporary files")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per size (after one warm-up step)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--budget", type=float, default=3600,
                        help="seconds for the whole check; a step still running when they are spent is recorded as "
                             "timed out, and the rest as not run (default: 3600)")
    parser.add_argument("--worker", choices=("ort", "torch", "torch-bf16", "build"), help=argparse.SUPPRESS)
    parser.add_argument("--ep", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker == "ort":
        print(json.dumps(ort_worker(args.ep, args.artifacts, args.npz, args.steps, timed=args.ep != "cpu")))
        return 0
    if args.worker in ("torch", "torch-bf16"):
        print(json.dumps(torch_worker(args.artifacts, args.worker == "torch-bf16", args.steps)))
        return 0
    if args.worker == "build":
        sys.path.insert(0, str(ROOT / "scripts"))
        from bench import make_shape  # a random model laid out as the published checkpoint is

        model = make_shape(args.shape)
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_artifacts.py"), "--model", str(model),
                               "--out", str(args.artifacts), "--force"], capture_output=True, text=True)  # in our group
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
    try:
        machine = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]).stdout
    except OSError as error:
        machine = f"(nvidia-smi: {error.strerror})"
    report: dict = {"machine": machine.strip(), "python": sys.version.split()[0], "shape": args.shape, "results": {}}

    def save():
        report["seconds"] = time.perf_counter() - started
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    sites = install_sites(args.work, args.wheels)
    artifacts = ROOT / "artifacts" / args.shape
    report["build"] = child(sites["build"], "--worker", "build", "--shape", args.shape, "--artifacts", str(artifacts),
                            timeout=max(10, int(args.budget - (time.perf_counter() - started))))
    save()
    if "error" in report["build"]:
        print(f"gpu_check: the build failed: {report['build']['error']}", file=sys.stderr)
        return 1
    results = report["results"]
    cuda_libraries = library_dirs(nvidia_roots())
    for step in STEPS:
        left = int(args.budget - (time.perf_counter() - started))
        if left < 10:
            results[step] = {"error": "not run: --budget spent"}
        elif step.startswith("torch"):
            results[step] = child(sites["build"], "--worker", step, "--artifacts", str(artifacts), "--steps",
                                  str(args.steps), timeout=left)
        else:
            results[step] = child(sites["runtime"], "--worker", "ort", "--ep", step, "--artifacts", str(artifacts),
                                  "--npz", str(args.work / f"{step}.npz"), "--steps", str(args.steps),
                                  libraries=cuda_libraries if step == "cuda" else (), timeout=left)
            if step != "cpu" and "error" not in results[step] and "error" not in results["cpu"]:
                import numpy as np

                with np.load(args.work / "cpu.npz") as reference, np.load(args.work / f"{step}.npz") as got:
                    results[step]["vs_cpu"] = compare({k: got[k] for k in got.files},
                                                      {k: reference[k] for k in reference.files})
        print(summary(step, results[step]), flush=True)
        save()
    print(f"report: {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
