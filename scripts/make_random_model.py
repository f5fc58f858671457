#!/usr/bin/env python
"""A seeded random Qwen2 model of a real model's shape, for benchmarks (no download).

    python scripts/make_random_model.py --shape qwen2.5-0.5b --out models/qwen05b-shape
    python scripts/bench.py --build models/qwen05b-shape --artifacts artifacts/qwen05b --threads 2
"""

import argparse
import sys
from pathlib import Path

from ortlora.build.tiny import SHAPES, create_random_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty")
    create_random_model(args.out, args.shape, args.seed)
    print(f"wrote a random {args.shape}-shaped Qwen2 model to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
