"""Datasets: JSON Lines -> token ids with loss masks -> padded, shifted batches.

Each line is one of
    {"text": "..."}                               every token is trained
    {"prompt": "...", "completion": "..."}        only the completion is trained
    {"messages": [{"role": ..., "content": ...}]}  rendered with the chat template; only
                                                  assistant turns are trained
An end-of-sequence token is appended to text and completions (chat templates bring their own).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError
from ortlora.runtime.tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]; labels[t] = token t + 1, or IGNORE_INDEX


@dataclass
class LoadReport:
    path: Path
    examples: int = 0
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: why"

    def summary(self) -> str:
        parts = [f"{self.examples} examples from {self.path}"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to --max-seq-len")
        if self.skipped:
            parts.append(f"{len(self.skipped)} bad lines skipped")
        return ", ".join(parts)


class BadExample(ValueError):
    pass


def _spans(row: dict, tokenizer: Tokenizer) -> tuple[str, list[tuple[int, int]], bool]:
    """Text of the example, the character spans that are trained, and whether to append EOS."""
    if not isinstance(row, dict):
        raise BadExample("expected a JSON object")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadExample("'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadExample(f"message {i} needs string 'role' and 'content'")
        spans = []
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                # The turn's text is what rendering it adds after the prompt that precedes it.
                start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True))
                end = len(tokenizer.apply_chat_template(messages[: i + 1]))
                spans.append((start, end))
        return tokenizer.apply_chat_template(messages), spans, False
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise BadExample("'prompt' and 'completion' must both be strings")
        return prompt + completion, [(len(prompt), len(prompt) + len(completion))], True
    if "text" in row:
        if not isinstance(row["text"], str):
            raise BadExample("'text' must be a string")
        return row["text"], [(0, len(row["text"]))], True
    raise BadExample(f"no 'text', 'prompt'/'completion' or 'messages' field (found: {', '.join(row) or 'nothing'})")


def encode_example(row: dict, tokenizer: Tokenizer, max_seq_len: int) -> tuple[Example, bool]:
    """Tokenise one row; returns the example and whether it was truncated."""
    text, spans, add_eos = _spans(row, tokenizer)
    ids, offsets = tokenizer.encode_with_offsets(text)
    trained = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    if add_eos:
        ids.append(tokenizer.eos_id)
        trained.append(True)
    ids_arr = np.asarray(ids, dtype=np.int64)
    trained_arr = np.asarray(trained, dtype=bool)
    truncated = len(ids_arr) > max_seq_len + 1
    ids_arr, trained_arr = ids_arr[: max_seq_len + 1], trained_arr[: max_seq_len + 1]
    labels = np.where(trained_arr[1:], ids_arr[1:], IGNORE_INDEX)
    if len(ids_arr) < 2 or not (labels != IGNORE_INDEX).any():
        raise BadExample("nothing to learn: every token is masked out" + (" after truncation" if truncated else ""))
    return Example(ids_arr[:-1], labels), truncated


def load_jsonl(path: Path, tokenizer: Tokenizer, max_seq_len: int, on_bad: str = "stop") -> tuple[list[Example], LoadReport]:
    """Read and tokenise a JSON Lines file. on_bad: "stop" raises at the first bad line, "skip" counts it."""
    if not path.is_file():
        raise OrtloraError(f"data file {path} does not exist")
    report = LoadReport(path)
    examples: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadExample(f"not valid JSON ({e.msg})") from None
                example, truncated = encode_example(row, tokenizer, max_seq_len)
            except BadExample as e:
                where = f"{path}:{lineno}: {e}"
                if on_bad == "stop":
                    raise OrtloraError(f"{where} (pass --on-bad-data skip to skip such lines)") from None
                report.skipped.append(where)
                continue
            examples.append(example)
            report.truncated += truncated
    if not examples:
        raise OrtloraError(f"{path} has no usable examples" + (f" ({len(report.skipped)} bad lines)" if report.skipped else ""))
    report.examples = len(examples)
    return examples, report


def pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Concatenate consecutive examples into sequences of at most max_seq_len tokens.

    Labels never cross an example boundary (each example is shifted on its own); attention does,
    as in the usual packing without per-example masks.
    """
    packed: list[Example] = []
    ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    length = 0
    for ex in examples:
        if length + len(ex.input_ids) > max_seq_len and ids:
            packed.append(Example(np.concatenate(ids), np.concatenate(labels)))
            ids, labels, length = [], [], 0
        ids.append(ex.input_ids)
        labels.append(ex.labels)
        length += len(ex.input_ids)
    if ids:
        packed.append(Example(np.concatenate(ids), np.concatenate(labels)))
    return packed


def collate(examples: list[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest example: pad tokens are not attended to and not trained."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(examples), width), dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = ex.input_ids
        attention_mask[row, :n] = 1
        labels[row, :n] = ex.labels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The order of examples in an epoch: a function of (seed, epoch) alone, so resume can rebuild it."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches_in_epoch(examples: list[Example], batch_size: int, epoch: int, seed: int, shuffle: bool, pad_id: int):
    order = epoch_order(len(examples), epoch, seed, shuffle)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def trained_tokens(batch: dict[str, np.ndarray]) -> int:
    return int((batch["labels"] != IGNORE_INDEX).sum())
