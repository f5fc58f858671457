"""The tokenizer shipped in an artifact directory: tokenizers' fast tokenizer plus the chat template.

No transformers, no network: tokenizer.json, tokenizer_config.json and chat_template.jinja are read
as files, and the template is rendered with jinja2 the way transformers renders it, at a bounded cost
(chat_template.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from ortlora.errors import OrtloraError, one_line
from ortlora.files import artifact_file, json_type, read_json, read_text
from ortlora.runtime.chat_template import Budget, TemplateTooCostly, conversation_size, environment
from ortlora.runtime.training_template import training_variant


class TemplateRenderError(OrtloraError):
    """The chat template failed on one conversation: a data problem where the messages are a dataset's line."""


def _token_text(config: dict, key: str, path: Path) -> str | None:
    """A special token of tokenizer_config.json, given as text or as an AddedToken object."""
    value = config.get(key)
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise OrtloraError(f"{path}: {key} must be a string or an object with a string 'content', not {json_type(value)}")
    return text


def _config_template(config: dict, path: Path) -> str | None:
    """The chat template of tokenizer_config.json: a string, or a list of named ones of which "default" is used."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        if template is None:
            raise OrtloraError(f"{path}: chat_template is a list without a template named 'default'")
    if template is not None and not isinstance(template, str):
        raise OrtloraError(f"{path}: chat_template must be a string, not {json_type(template)}")
    return template


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    """A chat template compiled once in jinja's immutable sandbox: a template comes with the model files, so it may
    not reach Python objects or change its inputs."""
    return environment().from_string(template)


class Tokenizer:
    def __init__(self, directory: Path):
        from tokenizers import Tokenizer as FastTokenizer

        path = artifact_file(directory, "tokenizer.json")
        if not path.is_file():
            raise OrtloraError(f"{directory} has no tokenizer.json")
        text = read_text(path)
        try:
            self._tok = FastTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception for any file it cannot parse
            raise OrtloraError(f"{path} is not a tokenizer the tokenizers library can read ({one_line(e)})") from None
        config_path = artifact_file(directory, "tokenizer_config.json")
        config = read_json(config_path) if config_path.is_file() else {}
        self.eos_token = _token_text(config, "eos_token", config_path) or "<|endoftext|>"
        self.pad_token = _token_text(config, "pad_token", config_path) or self.eos_token
        self.eos_id = self._id(self.eos_token)
        self.pad_id = self._id(self.pad_token)
        template_path = artifact_file(directory, "chat_template.jinja")
        if template_path.is_file():
            self.chat_template, self.template_source = read_text(template_path), str(template_path)
        else:
            self.chat_template, self.template_source = _config_template(config, config_path), f"{config_path} (chat_template)"

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

    def _compiled(self, training: bool):
        """The chat template (its training variant if ``training`` and it has one) compiled, and where it comes
        from; a syntax error names its line."""
        if self.chat_template is None:
            raise OrtloraError("this tokenizer has no chat template, so 'messages' data cannot be rendered")
        text, source = (training and training_variant(self.chat_template)) or (self.chat_template, self.template_source)
        from jinja2.exceptions import TemplateSyntaxError

        try:
            return _compile(text), source
        except TemplateSyntaxError as e:
            raise OrtloraError(f"{source} line {e.lineno}: the chat template has a syntax error: {e.message}") from None

    def renders(self, name: str) -> bool:
        """Whether the chat template reads ``name`` at all ("tools", "tool_calls"): a template that never does
        would drop them from the text without a word."""
        return self.chat_template is not None and name in self.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, enable_thinking: bool | None = None,
                            training: bool = False) -> str:
        """The conversation as transformers' ``apply_chat_template(messages, tools=tools, tokenize=False)``
        renders it: keys whose value is None are dropped from each message first (as transformers does, so
        an assistant turn of tool calls may have ``"content": null``), and the template sees ``tools``.
        ``enable_thinking`` (Qwen3's template) is passed only when given, so that ``is defined`` stays false.
        ``training`` renders with the training variant of a template that is not prefix-preserving
        (training_template.py), as transformers renders that variant."""
        template, source = self._compiled(training)
        messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in messages]
        budget = Budget(source, conversation_size((messages, tools)))
        template.environment.budget = budget
        try:
            return template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
                bos_token="",
                **({} if enable_thinking is None else {"enable_thinking": enable_thinking}),
            )
        except TemplateTooCostly:
            raise
        except Exception as e:  # the template is a program from the model's files: whatever it raises, it failed here
            raise TemplateRenderError(f"the chat template failed on these messages ({type(e).__name__}: {one_line(e)})") from None
        finally:
            template.environment.budget = None
