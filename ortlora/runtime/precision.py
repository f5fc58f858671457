"""--precision bf16: the frozen model's matrix products in bf16 (fp32 accumulation) where the provider and the CPU
have them. The LoRA weights, AdamW's state, the loss, gradient accumulation and clipping stay fp32: they live in
numpy, outside the graph, whatever the graph computes in.

Routes, each chosen only where it computes what it says:

- ``--ep openvino``: OpenVINO's ``INFERENCE_PRECISION_HINT`` bf16 (its provider option ``load_config``, a JSON
  object), on a CPU with AVX512_BF16 or AMX; OpenVINO's own fp32 otherwise.
- the CPU provider on Arm64: ONNX Runtime's session option ``mlas.enable_gemm_fastmath_arm64_bfloat16`` (MLAS'
  bf16 kernels), on a CPU with the BF16 extension (Arm v8.6, Apple M2 and later, Graviton 3).
- nothing else yet: the CPU provider on x86-64 has no bf16 products, and the GPU providers take the fp32 graph
  as it is.

Where no route fits, the run says why in one line and trains in fp32, recorded as fp32: never an fp32 run under
a bf16 label.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# bf16: bf16 where PyTorch's autocast rounds to it (the products and what follows from them alone), fp32 where it
# keeps fp32; bf16-all: every node the provider chooses (OpenVINO's own rule: faster, less accurate; performance.md)
PRECISIONS = ("fp32", "bf16", "bf16-all")
ARM64_FASTMATH = "mlas.enable_gemm_fastmath_arm64_bfloat16"  # ONNX Runtime's session option (MLAS, Arm64 only)
OPENVINO_BF16 = json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}})  # OpenVINO's load_config
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo: instructions that multiply bf16 natively


@dataclass(frozen=True)
class Precision:
    """What a run asked for, what runs, and how (or why not), with the options that make it so."""

    asked: str = "fp32"
    runs: str = "fp32"
    how: str = "fp32 products"
    provider_options: dict = field(default_factory=dict)  # merged into --ep's provider options
    session_config: dict = field(default_factory=dict)  # SessionOptions config entries

    def describe(self) -> str:
        return f"precision {self.runs}: {self.how}"


def is_arm64() -> bool:
    return platform.machine().lower() in ("arm64", "aarch64")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel lists them (Linux: x86 'flags', Arm 'Features'); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU multiplies bf16 natively, and what says so (the flag, or what is missing)."""
    if is_arm64():
        if sys.platform == "darwin":
            try:
                found = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                       timeout=5).stdout.strip() == "1"
            except (OSError, subprocess.SubprocessError):
                found = False
            return found, "FEAT_BF16" if found else "no FEAT_BF16 (Apple M1 has none; M2 and later have it)"
        found = "bf16" in cpu_flags()
        return found, "bf16" if found else "no bf16 among the CPU's features (Arm v8.6 and later have it)"
    flags = cpu_flags() & set(X86_BF16_FLAGS)
    if flags:
        return True, " and ".join(sorted(flags))
    return False, f"none of {', '.join(X86_BF16_FLAGS)} among the CPU's flags"


def resolve(asked: str, ep: str) -> Precision:
    """The precision a run on ``ep`` can have for ``asked``."""
    if asked == "fp32":
        return Precision()
    has_bf16, why = cpu_bf16()
    if ep == "openvino":
        if not has_bf16:
            return Precision(asked, "fp32", f"bf16 asked, fp32 runs: this CPU has {why}, so OpenVINO would compute "
                                            "in fp32 anyway")
        where = "on every node it chooses" if asked == "bf16-all" else "where PyTorch's autocast rounds, fp32 elsewhere"
        return Precision(asked, "bf16", f"OpenVINO's INFERENCE_PRECISION_HINT bf16, {where} (the CPU has {why})",
                         provider_options={"load_config": OPENVINO_BF16})
    if ep == "cpu" and is_arm64():
        if not has_bf16:
            return Precision(asked, "fp32", f"bf16 asked, fp32 runs: this Arm64 CPU has {why}")
        return Precision(asked, "bf16", f"ONNX Runtime's {ARM64_FASTMATH} (the CPU has {why})",
                         session_config={ARM64_FASTMATH: "1"})
    if ep == "cpu":
        other = (f"; this CPU has {why}: --ep openvino (pip install onnxruntime-openvino) computes in bf16 on it"
                 if has_bf16 else f"; nor does this CPU ({why})")
        return Precision(asked, "fp32", "bf16 asked, fp32 runs: ONNX Runtime's CPU provider has bf16 products on "
                                        "Arm64 only" + other)
    return Precision(asked, "fp32", f"bf16 asked, fp32 runs: --ep {ep} computes the training graph as it is, in "
                                    "fp32 (a bf16 route for it is not built yet)")


def apply_precision(options, precision: Precision) -> None:
    """Put ``precision``'s session config entries into an ONNX Runtime SessionOptions (either backend's)."""
    for key, value in precision.session_config.items():
        options.add_session_config_entry(key, value)
