#!/usr/bin/env python
"""How far a quantized base's next-token distributions are from the float32 base's, on the same text.

    ortlora-build --model models/qwen2.5-0.5b --out artifacts/qwen2.5-0.5b
    ortlora-build --model models/qwen2.5-0.5b --out artifacts/qwen2.5-0.5b-int4 --base-precision int4
    python scripts/quantization_quality.py artifacts/qwen2.5-0.5b artifacts/qwen2.5-0.5b-int4

Both artifact directories must come from the same model. The text is the shipped chat validation data rendered with
the model's chat template, in batches of --batch conversations cut to --seq-len tokens; every position with
a token after it counts. Printed: the mean KL divergence KL(float32 || quantized) in nats per token, the
share of positions whose most likely next token is the same, and the largest logit difference.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def batches(artifacts: Path, batch: int, seq_len: int, count: int):
    import json

    from ortlora.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(artifacts)
    lines = (resources.files("ortlora.data") / "chat_valid.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [tokenizer.encode(tokenizer.apply_chat_template(json.loads(line)["messages"]))[:seq_len] for line in lines]
    for start in range(0, min(len(rows), batch * count), batch):
        chunk = rows[start: start + batch]
        ids = np.full((len(chunk), max(map(len, chunk))), tokenizer.pad_id, np.int64)
        mask = np.zeros_like(ids)
        for i, row in enumerate(chunk):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        yield ids, mask


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help="artifacts with the float32 base")
    parser.add_argument("quantized", type=Path, help="artifacts of the same model with a quantized base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    from ortlora.manifest import Manifest

    sessions = []
    for directory in (args.reference, args.quantized):
        manifest = Manifest.load(directory)
        sessions.append(ort.InferenceSession(str(directory / manifest.files["inference_model"]),
                                             providers=["CPUExecutionProvider"]))
    kl_sum, agree, positions, worst = 0.0, 0, 0, 0.0
    for ids, mask in batches(args.reference, args.batch, args.seq_len, args.batches):
        reference, quantized = (s.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0] for s in sessions)
        keep = mask[:, 1:].astype(bool)  # positions with a next token
        p_log, q_log = (log_softmax(x[:, :-1][keep].astype(np.float64)) for x in (reference, quantized))
        kl_sum += float((np.exp(p_log) * (p_log - q_log)).sum())
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        positions += int(keep.sum())
        worst = max(worst, float(np.abs(reference - quantized)[mask.astype(bool)].max()))
    precision = Manifest.load(args.quantized).model.get("base_precision", "fp32")
    print(f"{args.quantized} ({precision}) against {args.reference}: {positions} positions, mean KL "
          f"{kl_sum / positions:.5f} nats/token, top-1 agreement {agree / positions:.1%}, largest logit difference "
          f"{worst:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
