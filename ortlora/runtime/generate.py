"""Text generation on ONNX Runtime with a key/value cache, from the artifacts plus any adapter.

    generator = Generator(Path("artifacts/tiny"), adapter=Path("runs/tiny"))
    result = generator.generate(generator.prompt(messages=[{"role": "user", "content": "Hi"}]),
                                Sampling(max_new_tokens=32), on_text=print)

The prompt goes through the decoder in one pass; every new token then costs one position, its keys
and values appended to the cache. Sampling follows transformers' order: repetition penalty,
temperature, top-k, top-p; temperature 0 is greedy. No torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ortlora.errors import OrtloraError
from ortlora.files import read_json
from ortlora.manifest import REBUILD, Manifest
from ortlora.runtime.backend import onnx_file
from ortlora.runtime.providers import create_session
from ortlora.runtime.tokenizer import Tokenizer


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, besides the end-of-sequence tokens

    def check(self) -> None:
        if self.max_new_tokens <= 0:
            raise OrtloraError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")
        numbers = (self.temperature, self.top_p, self.repetition_penalty)
        if (not all(map(math.isfinite, numbers)) or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1
                or self.repetition_penalty <= 0):
            raise OrtloraError("need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1 and --repetition-penalty > 0, "
                               f"all finite; got {self.temperature}, {self.top_k}, {self.top_p}, {self.repetition_penalty}")


@dataclass
class Generation:
    tokens: list[int]
    text: str
    stop_reason: str  # "eos", "stop string", "length" (--max-new-tokens), "context length" (the model's)
    prompt_tokens: int
    prompt_seconds: float
    generation_seconds: float

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.generation_seconds if self.generation_seconds else float("nan")


def next_token(logits: np.ndarray, history: list[int], s: Sampling, rng: np.random.Generator) -> int:
    """Pick the next token from the last position's logits [vocab]."""
    logits = logits.astype(np.float64)
    if s.repetition_penalty != 1.0 and history:
        seen = np.unique(history)
        scores = logits[seen]
        logits[seen] = np.where(scores > 0, scores / s.repetition_penalty, scores * s.repetition_penalty)
    if s.temperature == 0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the largest (0) to -inf: greedy, no NaN
        logits = (logits - logits.max()) / s.temperature
    if s.top_k:
        kth = np.sort(logits)[-min(s.top_k, logits.size)]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if s.top_p < 1.0:  # the smallest set of most likely tokens whose probability reaches top_p
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < s.top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


class Generator:
    def __init__(self, artifacts: Path, adapter: Path | None = None, ep: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        from ortlora.runtime.checkpoint import find_checkpoint, load_adapter

        self.manifest = Manifest.load(artifacts)
        if "decoder_model" not in self.manifest.files:
            raise OrtloraError(f"{artifacts} has no generation graph (built by an older ortlora); rebuild it with ortlora-build")
        self.tokenizer = Tokenizer(artifacts)
        self.lora = load_adapter(find_checkpoint(adapter), self.manifest) if adapter else {}
        options = ort.SessionOptions()
        options.log_severity_level = 3  # LoRA inputs with defaults are intended
        if threads:
            options.intra_op_num_threads = threads
        decoder = onnx_file(artifacts, self.manifest.files["decoder_model"])
        self.session = create_session(decoder, options, ep)
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past.")]
        self.eos_ids = {self.tokenizer.eos_id} | self._generation_eos(artifacts)
        self.context = self.manifest.context_length(artifacts)

    @staticmethod
    def _generation_eos(artifacts: Path) -> set[int]:
        path = artifacts / "generation_config.json"
        if not path.is_file():
            return set()
        eos = read_json(path, REBUILD).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(type(i) is int for i in ids):
            raise OrtloraError(f"{path}: eos_token_id must be a token id or a list of them, not {eos!r}; {REBUILD}")
        return set(ids)

    def prompt(self, text: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Token ids of a plain prompt, or of chat messages rendered with the chat template."""
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if not text:
            raise OrtloraError("the prompt is empty")
        return self.tokenizer.encode(text)

    def _empty_cache(self) -> dict[str, np.ndarray]:
        return {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past}

    def _run(self, ids: list[int], mask_length: int, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, mask_length), np.int64),
                 **self.lora, **cache}
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        present = {n.replace("present.", "past."): v for n, v in zip(names[1:], outputs[1:])}
        return outputs[0][0, -1], present

    def generate(self, prompt_ids: list[int], sampling: Sampling, on_text: Callable[[str], None] | None = None,
                 use_cache: bool = True) -> Generation:
        sampling.check()
        if len(prompt_ids) >= self.context:
            raise OrtloraError(f"the prompt is {len(prompt_ids):,} tokens and the model takes {self.context:,} in all "
                               "(max_position_embeddings); shorten it to leave room for new tokens")
        # Prompt and new tokens together stay within the context the model was trained for.
        limit = min(sampling.max_new_tokens, self.context - len(prompt_ids))
        rng = np.random.default_rng(sampling.seed)
        start = time.perf_counter()
        logits, cache = self._run(prompt_ids, len(prompt_ids), self._empty_cache())
        prompt_seconds = time.perf_counter() - start
        tokens: list[int] = []
        text, emitted = "", ""
        reason = "length" if limit == sampling.max_new_tokens else "context length"
        start = time.perf_counter()
        while True:
            token = next_token(logits, prompt_ids + tokens, sampling, rng)
            if token in self.eos_ids:
                reason = "eos"
                break
            tokens.append(token)
            text = self.tokenizer.decode(tokens)
            hit = next((s for s in sampling.stop if s in text), None)
            if hit is not None:
                text, reason = text[: text.index(hit)], "stop string"
            # Stream what is settled: a byte-level token can end inside a UTF-8 character ("\ufffd").
            if on_text and not text.endswith("\ufffd") and text.startswith(emitted) and len(text) > len(emitted):
                on_text(text[len(emitted):])
                emitted = text
            if hit is not None or len(tokens) >= limit:
                break
            total = len(prompt_ids) + len(tokens)
            if use_cache:
                logits, cache = self._run([token], total, cache)
            else:  # the whole sequence again: the reference the cache must agree with
                logits, _ = self._run(prompt_ids + tokens, total, self._empty_cache())
        if on_text and text.startswith(emitted) and len(text) > len(emitted):
            on_text(text[len(emitted):])
        return Generation(tokens, text, reason, len(prompt_ids), prompt_seconds, time.perf_counter() - start)
