#!/usr/bin/env python
"""A seeded random Qwen2.5 or Qwen3 model of a published model's shape, for benchmarks and tests (no download).

    python scripts/make_random_model.py --shape qwen2.5-0.5b --out models/qwen05b-shape
    python scripts/bench.py --build models/qwen05b-shape --artifacts artifacts/qwen05b --threads 2
    python scripts/make_random_model.py --shape qwen3-0.6b --layers 2 --out models/qwen3-06b-2l

Laid out as the published Qwen2.5 checkpoints are (bf16, sharded, Qwen2.5's tokenizer and chat template),
a 2-layer cut of the 0.5B shape in 4 shards:

    python scripts/make_random_model.py --shape qwen2.5-0.5b --layers 2 --dtype bf16 --max-shard-size 100MB \\
        --tokenizer real --out models/qwen05b-2l-published
"""

import argparse
import sys
from pathlib import Path

from ortlora.build.model_dir import ARCHITECTURES
from ortlora.build.tiny import DTYPES, SHAPES, TOKENIZERS, create_random_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None, help="keep the first N layers of the shape (default: all)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="stored dtype of the weights (default: fp32)")
    parser.add_argument("--max-shard-size", default=None,
                        help="split the weights into model-0000k-of-0000n.safetensors files of at most this size, "
                             "with model.safetensors.index.json, e.g. 5GB or 100MB (default: one model.safetensors)")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="tiny",
                        help="tiny: trained on the shipped data; real: the published tokenizer and chat template, "
                             "Qwen2.5's with its generation config (ortlora/data/qwen2.5-tokenizer) for the qwen2.5 "
                             "shapes, Qwen3's (ortlora/data/qwen3-tokenizer) for the qwen3 shapes (default: tiny)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty")
    try:
        create_random_model(args.out, args.shape, args.seed, layers=args.layers, dtype=args.dtype,
                            max_shard_size=args.max_shard_size, tokenizer=args.tokenizer)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    layers = f"{args.layers}-layer cut of a " if args.layers else ""
    kind = ARCHITECTURES[SHAPES[args.shape].get("model_type", "qwen2")].name
    print(f"wrote a random {layers}{args.shape}-shaped {kind} model ({args.dtype}, {args.tokenizer} tokenizer) "
          f"to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
