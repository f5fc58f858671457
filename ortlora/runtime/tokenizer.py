"""The tokenizer shipped in an artifact directory: tokenizers' fast tokenizer plus the chat template.

No transformers, no network: tokenizer.json, tokenizer_config.json and chat_template.jinja are read
as files, and the template is rendered with jinja2 the way transformers renders it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as FastTokenizer

        path = directory / "tokenizer.json"
        if not path.is_file():
            raise OrtloraError(f"{directory} has no tokenizer.json")
        self._tok = FastTokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        self.eos_token = _token_text(config.get("eos_token")) or "<|endoftext|>"
        self.pad_token = _token_text(config.get("pad_token")) or self.eos_token
        self.eos_id = self._id(self.eos_token)
        self.pad_id = self._id(self.pad_token)
        template_path = directory / "chat_template.jinja"
        self.chat_template = template_path.read_text(encoding="utf-8") if template_path.is_file() else config.get("chat_template")
        self._template = None

    def _id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise OrtloraError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self.chat_template is None:
            raise OrtloraError("this tokenizer has no chat template, so 'messages' data cannot be rendered")
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            bos_token="",
        )
