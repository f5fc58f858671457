"""Generation speed: ortlora-generate's decoder with key/value cache against transformers + PEFT.

    python scripts/bench_generate.py --artifacts artifacts/tiny --adapter runs/tiny
    python scripts/bench_generate.py --artifacts artifacts/qwen05b --prompt-tokens 128 --new-tokens 32 --threads 2
    python scripts/bench_generate.py --artifacts artifacts/qwen05b --batch 1,4,16 --threads 2

Both generate greedily from the same prompt tokens (with no end-of-sequence token, so both produce exactly
--new-tokens), each in its own process; printed: prompt processing and generation tokens/s (median
of --repeats), and whether the two produced the same tokens. --batch B: B different prompts at once
(ortlora's generate_batch, transformers' generate on a [B, prompt] batch); tokens/s count every row's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompt_ids(artifacts: Path, count: int, batch: int = 1) -> list[list[int]]:
    import numpy as np

    from ortlora.runtime.tokenizer import Tokenizer

    vocab = Tokenizer(artifacts).vocab_size
    return np.random.default_rng(0).integers(3, vocab, size=(batch, count)).tolist()


def run_ortlora(args) -> dict:
    from ortlora.runtime.generate import Generator, Sampling

    generator = Generator(Path(args.artifacts), Path(args.adapter) if args.adapter else None, threads=args.threads)
    generator.eos_ids = set()  # exactly --new-tokens on both sides
    results = {}
    for batch in args.batch:
        prompts = prompt_ids(Path(args.artifacts), args.prompt_tokens, batch)
        runs = [generator.generate_batch(prompts, Sampling(max_new_tokens=args.new_tokens)) for _ in range(args.repeats)]
        results[batch] = {"prompt_s": [r[0].prompt_seconds for r in runs],
                          "generate_s": [r[0].generation_seconds for r in runs], "tokens": [g.tokens for g in runs[-1]]}
    import onnxruntime

    return {"runs": results, "version": f"onnxruntime {onnxruntime.__version__}"}


def run_transformers(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ortlora.manifest import Manifest

    torch.set_num_threads(args.threads or os.cpu_count())
    artifacts = Path(args.artifacts)
    model = AutoModelForCausalLM.from_pretrained(Manifest.load(artifacts).base_model_dir(artifacts), dtype=torch.float32)
    if args.adapter:
        from peft import PeftModel

        from ortlora.runtime.checkpoint import find_checkpoint

        model = PeftModel.from_pretrained(model, find_checkpoint(Path(args.adapter)))
    model.eval()
    # No end-of-sequence token, as on ortlora's side: min_new_tokens would instead forbid it (a different
    # greedy choice where it is the most likely token).
    exact = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
    # generate() merges the model's own defaults (generation_config.json: Qwen2.5's repetition penalty 1.1, its
    # sampling, its eos) into any settings that are left at their defaults: replace them instead.
    model.generation_config = exact
    results = {}
    for batch in args.batch:
        ids = torch.tensor(prompt_ids(artifacts, args.prompt_tokens, batch))
        prompt_s, generate_s = [], []
        with torch.no_grad():
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=True)
                prompt_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids))
                # generate() includes the prompt pass: take it out to compare per-token decoding.
                generate_s.append(time.perf_counter() - t0 - prompt_s[-1])
        results[batch] = {"prompt_s": prompt_s, "generate_s": generate_s, "tokens": out[:, ids.shape[1]:].tolist()}
    return {"runs": results, "version": f"torch {torch.__version__}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", default="artifacts/tiny")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=lambda t: [int(b) for b in t.split(",")], default=[1],
                        help="prompts at once, or several sizes: 1,4,16 (default: 1)")
    parser.add_argument("--worker", choices=("ortlora", "transformers"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_ortlora(args) if args.worker == "ortlora" else run_transformers(args)))
        return 0

    results = {}
    for worker in ("ortlora", "transformers"):
        command = [sys.executable, __file__, "--worker", worker, *[a for a in (argv or sys.argv[1:])]]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{worker} failed: {done.stderr.strip().splitlines()[-1:]}")
            return 1
        results[worker] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.artifacts}: {args.prompt_tokens} prompt tokens, {args.new_tokens} new tokens, greedy, "
          f"threads {args.threads or os.cpu_count()}, median of {args.repeats}")
    print(f"{'batch':>5}  {'system':<14}{'prompt tok/s':>14}{'generate tok/s':>16}  same tokens  version")
    for batch in args.batch:
        runs = {name: r["runs"][str(batch)] for name, r in results.items()}
        same = runs["ortlora"]["tokens"] == runs["transformers"]["tokens"]
        for name, r in runs.items():
            print(f"{batch:>5}  {name:<14}{batch * args.prompt_tokens / statistics.median(r['prompt_s']):>14,.0f}"
                  f"{batch * args.new_tokens / statistics.median(r['generate_s']):>16,.1f}  {str(same):<11}  "
                  f"{results[name]['version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
