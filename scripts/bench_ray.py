"""Data-parallel steps on Ray against one process: what a step moves and what it costs beyond the compute.

    python scripts/bench_ray.py --artifacts artifacts/qwen2.5-0.5b --workers 2 --batch 2 --seq 128

One step is --workers micro-batches of --batch x --seq (every token trained), as `ortlora-train --workers N`
makes it. Timed, median of --steps after one warm-up: the same N micro-batches accumulated in this process
(all --threads), and on N Ray workers of this machine (--threads / N each). For the Ray step it prints the
slowest worker's compute, the rest (sending the LoRA weights to every worker, the gradient sums back, Ray's
calls), the bytes each way, and from them the model of N machines that the docs give.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import cpu_description, make_batches, vocab_size  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from ortlora.manifest import Manifest
    from ortlora.runtime.cli import make_backend
    from ortlora.runtime.config import TrainConfig
    from ortlora.runtime.distributed import RayBackend
    from ortlora.runtime.trainer import accumulate

    batches = make_batches(vocab_size(args.artifacts), args.batch, args.seq, "plain", args.workers)
    manifest = Manifest.load(args.artifacts)

    def timed(step) -> float:
        times = []
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    name, single = make_backend(TrainConfig(threads=args.threads), args.artifacts, manifest)
    one_process = timed(lambda: accumulate(single, batches))
    single = None  # its memory, before the workers load their own
    ray_backend = RayBackend(TrainConfig(workers=args.workers, threads=max(1, args.threads // args.workers)),
                             args.artifacts)

    def ray_step():
        ray_backend.accumulate(batches)
        ray_backend.set_weights(ray_backend.weights())  # as after AdamW: the next step sends the weights again

    on_ray = timed(ray_step)
    steps = list(ray_backend.steps)[1:]
    slowest = statistics.median(s["slowest_worker"] for s in steps)
    rest = statistics.median(s["seconds"] - s["slowest_worker"] for s in steps)
    out, back = steps[-1]["bytes_out"], steps[-1]["bytes_back"]
    ray_backend.close()

    print(f"{cpu_description()}; {args.artifacts} ({name}), {args.workers} micro-batches of {args.batch} x {args.seq} "
          f"a step, median of {args.steps}")
    print(f"one process, {args.threads} threads:             {one_process:8.3f} s a step")
    print(f"{args.workers} Ray workers here, {max(1, args.threads // args.workers)} thread(s) each:  {on_ray:8.3f} s a step "
          f"(slowest worker {slowest:.3f} s, the rest {rest * 1000:.1f} ms)")
    print(f"moved a step: {out / 2**20:.2f} MiB out (weights to each worker, batches), {back / 2**20:.2f} MiB back "
          "(gradient sums)")
    micro = one_process / args.workers  # one micro-batch on a whole machine
    for n in (2, 4, 8):
        transfer = (out + back) / args.workers * n / 125e6  # 1 Gbit/s, the driver's link carrying every worker's share
        print(f"model, {n} machines like this one on 1 Gbit/s: step {micro + rest + transfer:.3f} s for {n} micro-batches "
              f"= {n * micro / (micro + rest + transfer):.2f}x one machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
