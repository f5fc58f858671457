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
from ortlora.files import artifact_file, read_json
from ortlora.manifest import REBUILD, Manifest
from ortlora.runtime.backend import check_lora_inputs, onnx_file
from ortlora.runtime.data import encode_prefix
from ortlora.runtime.frozen import map_frozen_weights
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
    def __init__(self, artifacts: Path, adapter: Path | None = None, ep: str = "cpu", threads: int | None = None,
                 ep_options: dict | None = None):
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
        map_frozen_weights(artifacts, self.manifest)  # the decoder reads frozen_weights.bin: refuse NaN in it first
        self.session = create_session(decoder, options, ep, ep_options=ep_options, advice="generate with --ep cpu")
        check_lora_inputs(self.session, self.manifest, decoder, required=bool(self.lora))  # the adapter is fed by name
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past.")]
        self.eos_ids = {self.tokenizer.eos_id} | self._generation_eos(artifacts)
        self.context = self.manifest.context_length(artifacts)

    @staticmethod
    def _generation_eos(artifacts: Path) -> set[int]:
        path = artifact_file(artifacts, "generation_config.json")
        if not path.is_file():
            return set()
        eos = read_json(path, REBUILD).get("eos_token_id")
        ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        if not all(type(i) is int for i in ids):
            raise OrtloraError(f"{path}: eos_token_id must be a token id or a list of them, not {eos!r}; {REBUILD}")
        return set(ids)

    def prompt(self, text: str | None = None, messages: list[dict] | None = None,
               tools: list[dict] | None = None) -> list[int]:
        """Token ids of a plain prompt, or of chat messages rendered with the chat template (with the tools
        the model may call, JSON-schema function descriptions, where the template renders them)."""
        if messages is not None:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        if not text:
            raise OrtloraError("the prompt is empty")
        # Tokenised a prefix at a time (data.encode_prefix): a prompt of megabytes costs what the context holds.
        ids, _, more = encode_prefix(self.tokenizer, text, self.context)
        if more:
            raise OrtloraError(f"the prompt is more than {self.context:,} tokens, all the model takes "
                               "(max_position_embeddings); shorten it to leave room for new tokens")
        return ids

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past}

    def _run(self, ids: np.ndarray, mask: np.ndarray, cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
        """ids [batch, new], mask [batch, past + new] -> (the last position's logits [batch, vocab], cache)."""
        outputs = self.session.run(None, {"input_ids": ids, "attention_mask": mask, **self.lora, **cache})
        names = [o.name for o in self.session.get_outputs()]
        present = {n.replace("present.", "past."): v for n, v in zip(names[1:], outputs[1:])}
        return outputs[0][:, -1], present

    def logits(self, ids: list[int], cache: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
        """One sequence's next-token logits [vocab] after ``ids``, which follow ``cache`` (a previous call's) if given."""
        past = 0 if cache is None else next(iter(cache.values())).shape[2]
        logits, cache = self._run(np.asarray([ids], np.int64), np.ones((1, past + len(ids)), np.int64),
                                  self._empty_cache(1) if cache is None else cache)
        return logits[0], cache

    def generate(self, prompt_ids: list[int], sampling: Sampling, on_text: Callable[[str], None] | None = None,
                 use_cache: bool = True) -> Generation:
        """One prompt, its text streamed to ``on_text`` as it settles."""
        return self.generate_batch([prompt_ids], sampling, on_text, use_cache)[0]

    def generate_batch(self, prompts: list[list[int]], sampling: Sampling,
                       on_text: Callable[[str], None] | None = None, use_cache: bool = True) -> list[Generation]:
        """Several prompts at once, left-padded into one batch through the decoder and its cache. Each row stops on
        its own (end of sequence, a stop string, its length limit) and then only waits for the others; its tokens
        are those it gets alone, and with a seed each row samples as it would alone with that seed. The prompt
        and generation times are the batch's. ``on_text`` streams the first row."""
        sampling.check()
        if not prompts:
            return []
        for i, ids in enumerate(prompts):
            which = "the prompt" if len(prompts) == 1 else f"prompt {i}"
            if not ids:
                raise OrtloraError(f"{which} is empty")
            if len(ids) >= self.context:
                raise OrtloraError(f"{which} is {len(ids):,} tokens and the model takes {self.context:,} in all "
                                   "(max_position_embeddings); shorten it to leave room for new tokens")
        rows = [_Row(ids, min(sampling.max_new_tokens, self.context - len(ids)), sampling, on_text if i == 0 else None)
                for i, ids in enumerate(prompts)]
        width = max(len(ids) for ids in prompts)
        ids = np.zeros((len(prompts), width), np.int64)  # left padding: the decoder counts positions from the mask
        mask = np.zeros((len(prompts), width), np.int64)
        for r, prompt in enumerate(prompts):
            ids[r, width - len(prompt):], mask[r, width - len(prompt):] = prompt, 1
        start = time.perf_counter()
        logits, cache = self._run(ids, mask, self._empty_cache(len(prompts)))
        prompt_seconds = time.perf_counter() - start
        start = time.perf_counter()
        while True:
            step = np.array([[row.step(logits[r], self.eos_ids, self.tokenizer)] for r, row in enumerate(rows)], np.int64)
            if all(row.reason for row in rows):
                break
            mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
            if use_cache:
                logits, cache = self._run(step, mask, cache)
            else:  # the whole sequence again: the reference the cache must agree with
                ids = np.concatenate([ids, step], axis=1)
                logits, _ = self._run(ids, mask, self._empty_cache(len(rows)))
        seconds = time.perf_counter() - start
        return [Generation(row.tokens, row.text, row.reason, len(row.prompt), prompt_seconds, seconds) for row in rows]


class _Row:
    """One prompt's generation within a batch: its sampler, tokens, text, streaming and stop."""

    def __init__(self, prompt: list[int], limit: int, sampling: Sampling, on_text: Callable[[str], None] | None):
        self.prompt, self.limit, self.sampling, self.on_text = prompt, limit, sampling, on_text
        self.rng = np.random.default_rng(sampling.seed)
        self.tokens: list[int] = []
        self.text, self.emitted = "", ""
        self.reason = ""  # set when the row is done (Generation.stop_reason)

    def step(self, logits: np.ndarray, eos_ids: set[int], tokenizer: Tokenizer) -> int:
        """Take the next token from ``logits``; returns the token to feed (any, once the row is done)."""
        if self.reason:
            return 0
        token = next_token(logits, self.prompt + self.tokens, self.sampling, self.rng)
        if token in eos_ids:
            self.reason = "eos"
            self._stream(final=True)
            return token
        self.tokens.append(token)
        self.text = tokenizer.decode(self.tokens)
        hit = next((s for s in self.sampling.stop if s in self.text), None)
        if hit is not None:
            self.text, self.reason = self.text[: self.text.index(hit)], "stop string"
        elif len(self.tokens) >= self.limit:
            self.reason = "length" if self.limit == self.sampling.max_new_tokens else "context length"
        self._stream(final=bool(self.reason))
        return token

    def _stream(self, final: bool) -> None:
        # Stream what is settled: a byte-level token can end inside a UTF-8 character ("\ufffd").
        text = self.text
        if self.on_text and (final or not text.endswith("\ufffd")) and text.startswith(self.emitted) \
                and len(text) > len(self.emitted):
            self.on_text(text[len(self.emitted):])
            self.emitted = text
