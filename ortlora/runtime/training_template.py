"""Training variants of chat templates that are not prefix-preserving.

Training on a conversation needs each assistant turn to render the same whatever follows it, so that its tokens
can be found in the whole conversation's (data.py's ``_turn_span``). Qwen3's template breaks that on purpose: it
writes a turn's thinking (``<think>...</think>``) only after the last user message, so a reply's text changes
once the user speaks again. For such a template ortlora renders training data with a variant that keeps every
turn's thinking block, as TRL's training template for Qwen3 does, and trains each assistant turn whole: its
thinking block (empty when the turn has none), its reply, its tool calls and its end of turn. Generation keeps the
model's own template.

Templates are known by the SHA-256 of their text; a template not listed here renders training data as it is, and
a conversation it writes differently once later messages follow is refused in one line (data.py).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

# SHA-256 of a model's chat template -> (its name, the training variant in ortlora/data/training-templates)
VARIANTS = {
    # Qwen3's template as first published (the one in ortlora/data/qwen3-tokenizer)
    "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5": ("Qwen3", "qwen3.jinja"),
    # its later revision, which reads content that is not a string as empty text
    "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8": ("Qwen3", "qwen3.jinja"),
}


@functools.lru_cache(maxsize=8)
def training_variant(template: str | None) -> tuple[str, str] | None:
    """(the variant's text, where it comes from) for a known template that is not prefix-preserving, else None."""
    if template is None:
        return None
    known = VARIANTS.get(hashlib.sha256(template.encode()).hexdigest())
    if known is None:
        return None
    name, file = known
    text = resources.files("ortlora.data").joinpath("training-templates", file).read_text(encoding="utf-8")
    return text, f"ortlora's training variant of {name}'s chat template ({file})"
