"""Training-step benchmark: ortlora's backends against PyTorch + PEFT on the same machine, in one run.

    python scripts/bench.py --artifacts artifacts/tiny
    python scripts/bench.py --artifacts artifacts/qwen05b --data masked --steps 5 --threads 2
    python scripts/bench.py --build path/to/model --artifacts artifacts/qwen05b --targets all-linear
    python scripts/bench.py --shape qwen2.5-1.5b --threads 2 --batch 2 --seq 128

Each system runs in its own process (so peak memory is its own) on the same seeded batches:
ort-training (ORT's training API), ort-session (the portable training graph in an InferenceSession,
optionally under another interpreter with --plain-python, e.g. the newest plain onnxruntime) and
torch (PyTorch + PEFT in eager mode, the same base weights, LoRA settings and thread count). A step
is what the trainer does: forward, backward and an AdamW update of the LoRA weights. torch-gc is torch with
gradient checkpointing (``gradient_checkpointing_enable()``: each layer recomputed in the backward pass),
what PyTorch users turn on for large batches; torch-bf16 is torch under bf16 autocast, the one switch PyTorch
users turn on for bf16 hardware; ov-fp32, ov-bf16 and ov-bf16-all are ort-session on OpenVINO's provider
(onnxruntime-openvino, in its own environment: --ov-python, default .venv-ov) in fp32 and with ``--precision bf16``'s
and ``bf16-all``'s routes. Those
run when asked (--systems). Printed: median
step time after warm-up, trained tokens/s, peak resident memory, load time, and the ratio to torch;
with --build, first the time and peak memory of building the artifacts (ortlora-build, once per model).
--shape NAME does all of it for a published shape: it writes a random model laid out as the published
checkpoint is (bf16, shards of at most 4 GB, Qwen2.5's tokenizer) into models/NAME unless it is there,
builds artifacts/NAME from it and runs the benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# torch-gc: with gradient checkpointing; torch-bf16: under torch.autocast("cpu", torch.bfloat16); ov-fp32 / ov-bf16 /
# ov-bf16-all: the portable graph on OpenVINO's provider (--ov-python), in fp32 or with --precision bf16's or bf16-all's route
SYSTEMS = ("ort-training", "ort-session", "torch", "torch-gc", "torch-bf16", "ov-fp32", "ov-bf16", "ov-bf16-all")


def make_batches(vocab: int, batch: int, seq: int, data: str, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """plain: every position trained; masked: the first half of each row is a prompt (label -100)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        ids = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int64)
        labels = ids[:, 1:].copy()  # already shifted: position t holds token t + 1
        if data == "masked":
            labels[:, : seq // 2] = -100
        batches.append({"input_ids": ids[:, :-1].copy(), "attention_mask": np.ones((batch, seq), np.int64), "labels": labels})
    return batches


def vocab_size(artifacts: Path) -> int:
    from ortlora.manifest import Manifest

    return json.loads((artifacts / Manifest.load(artifacts).files["config"]).read_text())["vocab_size"]


def probe_weights(manifest) -> dict[str, np.ndarray]:
    """The LoRA weights --accuracy compares every system at: seeded, A and B non-zero (the build's B is zero, which
    would leave every A's gradient zero)."""
    rng = np.random.default_rng(3)
    return {p.onnx_name: (0.02 * rng.standard_normal(p.shape)).astype(np.float32) for p in manifest.parameters}


ACCURACY_BATCHES = 4  # one batch's loss error is one rounded number: too noisy alone to rank two systems by


def accuracy(directory: Path, systems: list[str]) -> dict[str, dict[str, float]]:
    """Each system's loss and LoRA gradients against PyTorch + PEFT in fp32 (the torch system) on the first
    ACCURACY_BATCHES batches, as relative errors pooled over them: the loss's root mean square, and the means of the
    largest and of the median gradient error. Empty without the torch system."""
    def load(system):
        path = directory / f"{system}.npz"
        if not path.exists():
            return None
        cases = {}
        for key, value in np.load(path).items():  # "K:name", K the batch ("name" alone: one batch, an older run)
            k, name = key.split(":", 1) if ":" in key else ("0", key)
            cases.setdefault(int(k), {})[name] = value
        return [cases[k] for k in sorted(cases)]

    reference = load("torch")
    if reference is None:
        return {}
    result = {}
    for system in systems:
        cases = load(system)
        if system == "torch" or cases is None:
            continue
        losses, largest, median = [], [], []
        for values, ref in zip(cases, reference):  # the batches both ran
            grads = [float(np.abs(values[n] - ref[n]).max() / max(np.abs(ref[n]).max(), 1e-12)) for n in ref if n != "loss"]
            losses.append(abs(float(values["loss"]) - float(ref["loss"])) / abs(float(ref["loss"])))
            largest.append(max(grads))
            median.append(float(np.median(grads)))
        result[system] = {"loss": float(np.sqrt(np.mean(np.square(losses)))), "largest": float(np.mean(largest)),
                          "median": float(np.mean(median))}
    return result


def accuracy_rows(errors: dict[str, dict[str, float]]) -> list[str]:
    """accuracy()'s figures, bf16 systems also as a multiple of PyTorch's bf16 autocast's (torch-bf16) where it ran."""
    if not errors:
        return ["accuracy: needs the torch system (PyTorch + PEFT in fp32) as the reference"]
    autocast = errors.get("torch-bf16")
    rows = [f"accuracy on the first {ACCURACY_BATCHES} batches, relative to PyTorch + PEFT fp32 (loss's root mean square"
            " / mean of the largest / mean of the median LoRA gradient's)"
            + (", and as a multiple of torch-bf16's" if autocast else "")]
    for system, mine in errors.items():
        ratio = (" (" + " / ".join(f"{mine[k] / autocast[k]:.2f}x" for k in mine) + ")"
                 if autocast and "bf16" in system and system != "torch-bf16" else "")
        rows.append(f"  {system:<12} " + " / ".join(f"{v:.2e}" for v in mine.values()) + ratio)
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_flops(config: dict, lora: dict, batch: int, seq: int, labelled: int) -> dict[str, float]:
    """Matrix-multiply FLOPs of one LoRA training step (forward + backward), by part.

    Frozen weights get no weight gradient, but every activation gradient down to the first LoRA
    layer is needed: linear layers cost their forward twice (forward, input gradient), attention
    three times (QK^T and AV forward; four products backward), the LM head twice over the labelled
    positions only, and LoRA's small products three times (forward, input and weight gradients).
    The last layer's output projection and MLP run at the labelled positions only (export.py).
    """
    h, layers, inter, vocab = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = h // heads
    kv = config["num_key_value_heads"] * head_dim
    tokens = batch * seq
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    before_attention = ("q_proj", "k_proj", "v_proj")

    def rows(name: str) -> int:  # rows a projection runs at, summed over the layers
        return tokens * layers if name in before_attention else tokens * (layers - 1) + labelled

    linear = 2 * sum(rows(n) * i * o for n, (i, o) in shapes.items())
    attention = 4 * batch * heads * seq * seq * head_dim * layers
    head = 2 * labelled * h * vocab
    targets = shapes if lora["targets"] == ["all-linear"] else {t: shapes[t] for t in lora["targets"]}
    adapters = 2 * lora["rank"] * sum(rows(n) * (i + o) for n, (i, o) in targets.items())
    parts = {"linear": 2 * linear, "attention": 3 * attention, "lm_head": 2 * head, "lora": 3 * adapters}
    return {**parts, "total": sum(parts.values())}


def matmul_gflops(rows: int, inner: int, cols: int, threads: int | None, repeats: int = 20) -> float:
    """The machine's fp32 matrix-multiply rate through ONNX Runtime (MLAS), on one layer-sized product."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [rows, inner]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [inner, cols])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [rows, cols])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((rows, inner), np.float32), "b": rng.standard_normal((inner, cols), np.float32)}
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return 2 * rows * inner * cols / statistics.median(times) / 1e9


# -- workers: one system each, in its own process ------------------------------------------------

def run_ort(system: str, args) -> dict:
    from ortlora.manifest import Manifest
    from ortlora.runtime.optim import AdamW, AdamWConfig

    artifacts = Path(args.artifacts)
    start = time.perf_counter()
    manifest = Manifest.load(artifacts)
    precision = None
    if system == "ort-training":
        from ortlora.runtime.backend import OrtTrainingBackend

        backend = OrtTrainingBackend(artifacts, manifest, threads=args.threads)
    elif system.startswith("ov-"):
        from ortlora.runtime.precision import resolve
        from ortlora.runtime.session_backend import OrtSessionBackend

        precision = resolve(system[3:], "openvino")  # bf16 only where this CPU has it: the result says which ran
        backend = OrtSessionBackend(artifacts, manifest, ep="openvino", threads=args.threads, precision=precision)
    else:
        from ortlora.runtime.session_backend import OrtSessionBackend

        backend = OrtSessionBackend(artifacts, manifest, threads=args.threads)
    load = time.perf_counter() - start
    vocab = vocab_size(artifacts)
    batches = make_batches(vocab, args.batch, args.seq, args.data, args.warmup + args.steps)
    if args.accuracy:  # before any step: the loss and gradients at probe_weights, then back to the build's weights
        initial, found = backend.weights(), {}
        for k, batch in enumerate(make_batches(vocab, args.batch, args.seq, args.data, ACCURACY_BATCHES)):
            backend.set_weights(probe_weights(manifest))
            backend.zero_grad()
            found[f"{k}:loss"] = backend.train_step(batch)
            found.update({f"{k}:{name}": value for name, value in backend.gradients().items()})
        np.savez(Path(args.accuracy) / f"{system}.npz", **found)
        backend.set_weights(initial)
    optimizer = AdamW(AdamWConfig())
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        backend.zero_grad()
        loss = backend.train_step(batch)
        weights = backend.weights()
        optimizer.step(weights, backend.gradients(), 1e-4)
        backend.set_weights(weights)
        times.append(time.perf_counter() - t0)
    import onnxruntime

    version = f"onnxruntime {onnxruntime.__version__}" + (f", {precision.runs}" if precision else "")
    return {"load_s": load, "step_s": times[args.warmup:], "loss": loss, "peak_rss_mb": peak_rss_mb(),
            "version": version, "nodes": getattr(backend, "placement", None)}


def run_torch(args) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ortlora.manifest import Manifest

    torch.set_num_threads(args.threads or os.cpu_count())
    manifest = Manifest.load(Path(args.artifacts))
    source = manifest.base_model_dir(Path(args.artifacts))
    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager", dtype=torch.float32)
    lora = manifest.lora
    if args.worker == "torch-gc":  # recompute each layer in the backward pass, as users turn on for large batches
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                            target_modules=lora["targets"], init_lora_weights="gaussian"))
    model.train()
    load = time.perf_counter() - start

    def forward_backward(batch):
        ids, mask, labels = (torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "labels"))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.worker == "torch-bf16"):
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100,
                                   label_smoothing=manifest.label_smoothing)
        loss.backward()
        return loss

    vocab = vocab_size(Path(args.artifacts))
    batches = make_batches(vocab, args.batch, args.seq, args.data, args.warmup + args.steps)
    if args.accuracy:  # as run_ort: the loss and gradients at probe_weights, by ONNX name, then the initial weights
        params = dict(model.named_parameters())
        keys = {p.onnx_name: p.peft_name.replace(f".lora_{p.kind}.weight", f".lora_{p.kind}.default.weight")
                for p in manifest.parameters}  # PEFT's module names carry the adapter's
        initial = {name: params[key].detach().clone() for name, key in keys.items()}
        found = {}
        for k, batch in enumerate(make_batches(vocab, args.batch, args.seq, args.data, ACCURACY_BATCHES)):
            with torch.no_grad():
                for name, value in probe_weights(manifest).items():
                    params[keys[name]].copy_(torch.from_numpy(value))
            found[f"{k}:loss"] = float(forward_backward(batch))
            found.update({f"{k}:{name}": params[key].grad.float().numpy() for name, key in keys.items()})
            model.zero_grad(set_to_none=True)
        np.savez(Path(args.accuracy) / f"{args.worker}.npz", **found)
        with torch.no_grad():
            for name, key in keys.items():
                params[key].copy_(initial[name])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss = forward_backward(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"load_s": load, "step_s": times[args.warmup:], "loss": float(loss), "peak_rss_mb": peak_rss_mb(),
            "version": f"torch {torch.__version__}" + (", bf16 autocast" if args.worker == "torch-bf16" else "")}


# -- the driver ------------------------------------------------------------------------------------

def cpu_description() -> str:
    """The CPU model and the vector extensions that decide its matmul rates (figures differ by CPU family)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return f"CPU: {platform.processor() or platform.machine()}"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
    return f"CPU: {model}, {os.cpu_count()} cores; {' '.join(f for f in wanted if f in flags) or 'no AVX2'}"


def make_shape(shape: str) -> Path:
    """models/SHAPE: a random model of a published shape, laid out as the published checkpoint is."""
    from ortlora.build.tiny import SHAPES, create_random_model

    if shape not in SHAPES or shape == "tiny":
        sys.exit(f"bench: --shape must be one of {', '.join(s for s in sorted(SHAPES) if s != 'tiny')}")
    path = ROOT / "models" / shape
    if not (path / "config.json").is_file():
        print(f"writing a random {shape} model (bf16, 4 GB shards) to {path} ...", flush=True)
        create_random_model(path, shape, dtype="bf16", max_shard_size="4GB", tokenizer="real")
    return path


def run_build(args) -> dict:
    """Build --artifacts from --build with ortlora-build; its wall time and peak resident memory."""
    source = ["--tiny"] if args.build == "tiny" else ["--model", args.build]
    command = [sys.executable, str(ROOT / "scripts" / "build_artifacts.py"), *source, "--out", args.artifacts,
               "--targets", args.targets, "--rank", str(args.rank), "--force", "--base-precision", args.base_precision]
    if args.base_precision in ("int8", "int4"):  # the blocks of a quantized base; other builds refuse the option
        command += ["--block-size", str(args.block_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"bench: the build failed: {(result.stderr.strip() or result.stdout.strip()).splitlines()[-1]}")
    # The build is this process's first child, so the children's peak is the build's.
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def measure(system: str, args) -> dict:
    python = args.plain_python if system == "ort-session" and args.plain_python else sys.executable
    if system.startswith("ov-"):
        python = args.ov_python
    command = [python, __file__, "--worker", system, "--artifacts", args.artifacts, "--batch", str(args.batch),
               "--seq", str(args.seq), "--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.accuracy:
        command += ["--accuracy", args.accuracy]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode == -9:  # SIGKILL: on Linux, the kernel's out-of-memory killer as a rule
        return {"error": "killed (SIGKILL; out of memory, as a rule: see dmesg)"}
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="artifacts/tiny", help="an ortlora-build artifact directory")
    parser.add_argument("--systems", default="ort-training,ort-session,torch",
                        help="comma-separated, from " + ", ".join(SYSTEMS) + " (default: the first three)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--data", choices=("plain", "masked"), default="plain",
                        help="plain: every position trained; masked: first half of each sequence is a masked prompt")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every system this many times, interleaved, and keep each one's best median "
                             "(shared machines are noisy: a neighbour's load only ever slows a round down)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for every system (default: all cores)")
    parser.add_argument("--plain-python", default=None, help="interpreter that runs ort-session (e.g. .venv-ort/bin/python)")
    parser.add_argument("--ov-python", default=str(ROOT / ".venv-ov" / "bin" / "python"),
                        help="interpreter with onnxruntime-openvino that runs the ov- systems (default: .venv-ov's)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--build", metavar="MODEL", default=None,
                        help="first build --artifacts from this model directory ('tiny': the built-in model), timed")
    parser.add_argument("--shape", default=None, help="a published shape (qwen2.5-0.5b ... qwen2.5-7b): make a random "
                        "bf16, sharded model of it in models/SHAPE if missing, then --build it into artifacts/SHAPE")
    parser.add_argument("--base-precision", choices=("fp32", "bf16", "int8", "int4"), default="fp32",
                        help="the frozen base of the --build / --shape (default: fp32); torch stays fp32")
    parser.add_argument("--block-size", type=int, default=32, help="block size of a quantized base (default: 32)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="LoRA targets of the --build (default: q_proj,v_proj)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the --build (default: 8)")
    parser.add_argument("--accuracy", metavar="DIR", default=None,
                        help="also compare every system's loss and LoRA gradients on the first 4 batches (at seeded "
                             "non-zero LoRA weights) with the torch system's, keeping them in DIR")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_torch(args) if args.worker.startswith("torch") else run_ort(args.worker, args)))
        return 0

    if args.accuracy:
        Path(args.accuracy).mkdir(parents=True, exist_ok=True)
    if args.shape:
        suffix = "" if args.base_precision == "fp32" else f"-{args.base_precision}"
        args.build, args.artifacts = str(make_shape(args.shape)), f"artifacts/{args.shape}{suffix}"
    build = run_build(args) if args.build else None
    tokens = {"plain": args.batch * args.seq, "masked": args.batch * (args.seq - args.seq // 2)}[args.data]
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for system in args.systems.split(","):
            r = measure(system, args)
            best = results.get(system)
            if best is None or "error" in best or ("step_s" in r and statistics.median(r["step_s"]) < statistics.median(best["step_s"])):
                results[system] = r
    from ortlora.manifest import Manifest

    artifacts = Path(args.artifacts)
    manifest = Manifest.load(artifacts)
    config = json.loads((artifacts / manifest.files["config"]).read_text())
    flops = step_flops(config, manifest.lora, args.batch, args.seq, tokens)
    rate = max(matmul_gflops(args.batch * args.seq, config["hidden_size"], config["intermediate_size"], args.threads)
               for _ in range(3))
    torch_step = statistics.median(results["torch"]["step_s"]) if "step_s" in results.get("torch", {}) else None
    torch_rss = results.get("torch", {}).get("peak_rss_mb")
    print(f"\n{cpu_description()}")
    print(f"{args.artifacts}: batch {args.batch} x {args.seq}, {args.data} data ({tokens} trained tokens a step), "
          f"threads {args.threads or os.cpu_count()}, median of {args.steps} steps after {args.warmup} warm-up"
          + (f", best of {args.rounds} rounds" if args.rounds > 1 else ""))
    if build:
        print(f"build (ortlora-build {args.targets}, r={args.rank}; once per model): {build['seconds']:.1f} s, "
              f"peak {build['peak_rss_mb']:,.0f} MB. PyTorch + PEFT has no build step: its set-up is its load time")
    print(f"{'system':<14}{'step ms':>10}{'tokens/s':>11}{'peak MB':>10}{'load s':>8}{'step/torch':>12}{'mem/torch':>11}  version")
    for system, r in results.items():
        if "error" in r:
            print(f"{system:<14}failed: {r['error']}")
            continue
        step = statistics.median(r["step_s"])
        ratio = f"{step / torch_step:.2f}" if torch_step else "-"
        mem = f"{r['peak_rss_mb'] / torch_rss:.2f}" if torch_rss else "-"
        print(f"{system:<14}{step * 1e3:>10.1f}{tokens / step:>11,.0f}{r['peak_rss_mb']:>10,.0f}{r['load_s']:>8.1f}"
              f"{ratio:>12}{mem:>11}  {r['version']}")
    bound = flops["total"] / (rate * 1e9)
    print(f"matmul FLOPs a step: {flops['total'] / 1e9:.1f} G (" + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in flops.items()
                                                                   if k != "total") + ")")
    print(f"measured fp32 matmul rate ({args.batch * args.seq}x{config['hidden_size']} @ {config['hidden_size']}x"
          f"{config['intermediate_size']}, ONNX Runtime): {rate:.1f} GFLOP/s, so a step takes at least {bound * 1e3:.1f} ms")
    for system, r in results.items():
        if "step_s" in r:
            print(f"  {system}: {bound / statistics.median(r['step_s']):.0%} of that limit")
    errors = accuracy(Path(args.accuracy), list(results)) if args.accuracy else None
    if args.accuracy:
        print("\n".join(accuracy_rows(errors)))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "results": results, "flops": flops,
                                               "matmul_gflops": rate, "build": build, "accuracy": errors},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
