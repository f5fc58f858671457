"""--precision bf16 against fp32 over a whole run: the same training twice on OpenVINO's provider, the loss curves
compared step by step (means over a window of 10 steps).

    python scripts/bf16_curve.py --artifacts artifacts/tiny --steps 200 [--python .venv-ov/bin/python]

--python is an interpreter with onnxruntime-openvino (it replaces the onnxruntime module, so it lives in an
environment of its own; .ci/run makes .venv-ov). Prints the largest relative difference of the windowed means,
the final eval losses, and whether the final adapters generate the same greedy text for a few prompts (on the CPU
provider of the interpreter running this script); exits 1 when a windowed mean differs by more than --tolerance
(default 1%), or when the bf16 run did not run in bf16 (a CPU without AVX512_BF16 or AMX).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(python: str, artifacts: str, out: Path, steps: int, precision: str, extra: list[str]) -> dict:
    command = [python, "-c", "import sys; from ortlora._entry import train; sys.exit(train())", "--artifacts", artifacts, "--out", str(out), "--ep", "openvino",
               "--precision", precision, "--max-steps", str(steps), "--log-every", "1", "--no-progress",
               "--no-plot", *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"bf16_curve: the {precision} run failed: {(result.stderr.strip() or result.stdout).splitlines()[-1]}")
    return json.loads((out / "summary.json").read_text())


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


def windowed(values: list[float], width: int) -> list[float]:
    return [sum(values[i:i + width]) / width for i in range(len(values) - width + 1)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="artifacts/tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--python", default=str(ROOT / ".venv-ov" / "bin" / "python"))
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per prompt at the end")
    parser.add_argument("extra", nargs="*", help="more ortlora-train options for both runs (after --)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ortlora-bf16-curve-") as work:
        summaries = {p: train(args.python, args.artifacts, Path(work) / p, args.steps, p, args.extra)
                     for p in ("fp32", "bf16")}
        curves = {p: windowed(losses(Path(work) / p), args.window) for p in summaries}
        texts = {p: greedy(args.artifacts, Path(summaries[p]["checkpoint"]), args.new_tokens) for p in summaries}
    if summaries["bf16"]["precision"] != "bf16":
        print(f"the bf16 run ran in {summaries['bf16']['precision']}: {summaries['bf16']['precision_route']}")
        return 1
    diffs = [abs(b - f) / abs(f) for f, b in zip(curves["fp32"], curves["bf16"])]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    print(f"{args.artifacts}, {args.steps} steps on OpenVINO: fp32 {curves['fp32'][0]:.4f} -> {curves['fp32'][-1]:.4f}, "
          f"bf16 {curves['bf16'][0]:.4f} -> {curves['bf16'][-1]:.4f} (means over {args.window} steps)")
    print(f"largest relative difference of the means: {diffs[worst]:.2%} at steps {worst + 1}-{worst + args.window}; "
          f"eval loss fp32 {summaries['fp32']['eval_loss']:.4f}, bf16 {summaries['bf16']['eval_loss']:.4f}; "
          f"wall fp32 {summaries['fp32']['wall_seconds']:.1f} s, bf16 {summaries['bf16']['wall_seconds']:.1f} s")
    same = [a == b for a, b in zip(texts["fp32"], texts["bf16"])]
    print(f"greedy text of the final adapters (CPU provider, {args.new_tokens} new tokens): {sum(same)} of "
          f"{len(same)} prompts the same")
    for prompt, a, b, equal in zip(PROMPTS, texts["fp32"], texts["bf16"], same):
        if not equal:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"  {prompt!r}: tokens differ from the {first + 1}th on")
    return 0 if diffs[worst] <= args.tolerance else 1


PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.", "Name three primary colours.")


def greedy(artifacts: str, adapter: Path, new_tokens: int) -> list[list[int]]:
    """The greedy tokens ``adapter`` generates for each of PROMPTS, on the CPU provider of this interpreter."""
    sys.path.insert(0, str(ROOT))
    from ortlora.runtime.generate import Generator, Sampling

    generator = Generator(Path(artifacts), adapter)
    return [generator.generate(generator.prompt(messages=[{"role": "user", "content": text}]),
                               Sampling(max_new_tokens=new_tokens)).tokens for text in PROMPTS]


if __name__ == "__main__":
    sys.exit(main())
