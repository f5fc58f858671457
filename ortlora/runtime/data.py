"""Datasets: rows -> token ids with loss masks -> padded, shifted batches.

Rows come from JSON Lines here, from the other formats (.json, .csv, .parquet, directories, Hub datasets) in
data_formats.py, with TRL's column names. Each row is one of
    {"text": "..."}                               every token is trained
    {"prompt": "...", "completion": "..."}        only the completion is trained
    {"messages": [{"role": ..., "content": ...}]}  rendered with the chat template (Qwen3's: its
                                                  training variant, training_template.py); only
                                                  assistant turns are trained
    {"messages": [...], "tools": [...]}           the same with function calling (TRL's format): tools are
                                                  JSON-schema function descriptions, assistant turns may
                                                  carry "tool_calls", "tool" turns hold their results
An end-of-sequence token is appended to text and completions (chat templates bring their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ortlora.errors import OrtloraError
from ortlora.files import byte_size, json_type, parse_json
from ortlora.runtime.tokenizer import TemplateRenderError, TemplateTooCostly, Tokenizer

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]; labels[t] = token t + 1, or IGNORE_INDEX
    segments: np.ndarray | None = None  # int64 [n]: 1, 2, ... the packed example each token belongs to


@dataclass
class LoadReport:
    path: str  # the file, or the Hub dataset and split
    examples: int = 0
    truncated: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: why"
    unit: str = "line"  # what the source's numbers count: lines of JSON Lines, rows of other formats

    def summary(self) -> str:
        parts = [f"{self.examples} examples from {self.path}"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to --max-seq-len")
        if self.skipped:
            parts.append(f"{len(self.skipped)} bad {self.unit}s skipped")
        return ", ".join(parts)


class BadExample(ValueError):
    pass


ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL_SHAPE = '{"type": "function", "function": {"name": ..., "arguments": {...}}}'


def check_messages(messages) -> list[dict]:
    """A conversation is a non-empty list of {"role": ..., "content": str} objects (for data lines and
    ortlora-generate --messages alike); raises BadExample saying what is not.

    Roles are system, user, assistant and tool (a tool call's result). An assistant message may carry
    "tool_calls", a list of {"type": "function", "function": {"name": str, "arguments": ...}}, and then
    its content may be empty, null or absent. Returns the messages to render: a copy in which arguments
    given as a JSON string (as OpenAI's API and many datasets give them) are decoded into the object they
    spell, since chat templates write ``arguments | tojson`` and would otherwise quote the string.
    """
    if not isinstance(messages, list) or not messages:
        raise BadExample('\'messages\' must be a non-empty list of {"role": ..., "content": ...} objects')
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadExample(f"message {i} is {json_type(m)}, not an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise BadExample(f"message {i} needs a string 'role', not {json_type(role)}")
        if role not in ROLES:
            raise BadExample(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        calls = m.get("tool_calls")
        if calls is not None and role != "assistant":
            raise BadExample(f"message {i} is a {role!r} message with 'tool_calls'; only assistant messages make tool calls")
        if calls is not None and not isinstance(calls, list):
            raise BadExample(f"message {i}: 'tool_calls' must be a list of {TOOL_CALL_SHAPE} objects, not {json_type(calls)}")
        content = m.get("content")
        if not isinstance(content, str) and not (calls and content is None):
            raise BadExample(f"message {i} needs a string 'content', not {json_type(content)}"
                             + (" (it may be null only in an assistant message with tool calls)" if content is None else ""))
        if calls:
            m = {**m, "tool_calls": [_check_tool_call(call, f"message {i}, tool call {j}") for j, call in enumerate(calls)]}
        checked.append(m)
    return checked


def _check_tool_call(call, where: str) -> dict:
    """One tool call, {"type": "function", "function": {"name", "arguments"}} or, as Qwen2.5's template also
    reads it, {"name", "arguments"}; returned with JSON-string arguments decoded."""
    if not isinstance(call, dict):
        raise BadExample(f"{where} is {json_type(call)}, not an object like {TOOL_CALL_SHAPE}")
    if call.get("type", "function") != "function":
        raise BadExample(f"{where} has type {call.get('type')!r}; only 'function' calls are rendered")
    function = call.get("function", call)
    if not isinstance(function, dict):
        raise BadExample(f"{where}: 'function' must be an object with 'name' and 'arguments', not {json_type(function)}")
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise BadExample(f"{where} needs a non-empty string 'name', not {json_type(function.get('name'))}")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = parse_json(arguments)
        except ValueError as e:
            raise BadExample(f"{where}: 'arguments' is a string that is {e}") from None
    if not isinstance(arguments, dict):
        raise BadExample(f"{where}: 'arguments' must be an object (or a JSON string of one), not {json_type(arguments)}")
    function = {**function, "arguments": arguments}
    return {**call, "function": function} if "function" in call else function


def check_tools(tools) -> list[dict] | None:
    """The tools a conversation may call: a list of JSON-schema function descriptions, each
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}} or the bare
    {"name": ..., ...}, as transformers' apply_chat_template(tools=...) takes them. None: no tools."""
    if tools is None:
        return None
    shape = '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
    if not isinstance(tools, list):
        raise BadExample(f"'tools' must be a list of function descriptions like {shape}, not {json_type(tools)}")
    for j, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise BadExample(f"tool {j} is {json_type(tool)}, not an object like {shape}")
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise BadExample(f"tool {j} needs a non-empty string 'name' (in its 'function' object), as in {shape}")
    return tools


def _render(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
            tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt, tools=tools, training=True)
    except TemplateRenderError as e:
        raise BadExample(str(e)) from None


def _turn_span(messages: list[dict], i: int, full: str, tokenizer: Tokenizer,
               tools: list[dict] | None = None) -> tuple[int, int]:
    """The characters of assistant message ``i`` in ``full``, the whole conversation rendered.

    The turn is what rendering messages[:i + 1] adds to the prompt before it (messages[:i] with the
    generation prompt): its reply, its tool calls and its end of turn. Some templates cannot render that
    prompt: Qwen2.5's reads messages[0], so a conversation that opens with the assistant has none. Then the
    turn starts where its content does: found by rendering the message with a marker for content (an assistant
    message of tool calls alone may have none), provided the text before the marker is the real turn's too.
    """
    upto = _render(tokenizer, messages[: i + 1], tools=tools)
    if not full.startswith(upto):
        raise BadExample(f"the chat template renders message {i} differently once later messages follow, "
                         "so its tokens cannot be told apart (a template that is not prefix-preserving; ortlora has a "
                         "training variant of Qwen3's only)")
    try:
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tools=tools, training=True)
    except TemplateRenderError:
        prompt = None
    if prompt is not None and upto.startswith(prompt):
        return len(prompt), len(upto)
    marker = "\ue000"  # a private-use character; where the data holds one too, the check below fails safe
    try:
        probe = tokenizer.apply_chat_template([*messages[:i], {**messages[i], "content": marker}], tools=tools,
                                                training=True)
    except TemplateRenderError:
        probe = ""
    start = probe.rfind(marker)
    if start < 0 or not upto.startswith(probe[:start]):
        raise BadExample(f"the chat template cannot render the conversation before message {i}, nor does its "
                         "rendering show that message's content, so its tokens cannot be told apart")
    return start, len(upto)


def _tools_rendered(tokenizer: Tokenizer, tools: list[dict] | None, messages: list[dict]) -> None:
    """Refuse tools or tool calls that the chat template would leave out of the text without a word."""
    missing = [name for name, used in (("tools", tools), ("tool_calls", any(m.get("tool_calls") for m in messages)))
               if used and not tokenizer.renders(name)]
    if missing:
        raise BadExample(f"the chat template ({tokenizer.template_source}) never reads {' or '.join(map(repr, missing))}, "
                         "so it cannot render this function-calling example; use a model whose template renders "
                         "tools, such as Qwen2.5's")


def _spans(row, tokenizer: Tokenizer) -> tuple[str, Callable[[int | None], list[tuple[int, int]]], bool]:
    """Text of the example, the character spans that are trained (a function of where the kept tokens end, None
    for the whole text: a truncated conversation's turns past that are never rendered on their own), and whether
    to append EOS."""
    if not isinstance(row, dict):
        raise BadExample(f"expected JSON Lines, one object per line, not {json_type(row)}")
    if "tools" in row and "messages" not in row:
        raise BadExample("'tools' come with 'messages', the conversation that may call them")
    if "messages" in row:
        messages = check_messages(row["messages"])
        tools = check_tools(row.get("tools"))
        _tools_rendered(tokenizer, tools, messages)
        full = _render(tokenizer, messages, tools=tools)

        def turns(end: int | None) -> list[tuple[int, int]]:
            spans = []
            for i, m in enumerate(messages):
                if m["role"] == "assistant":
                    spans.append(_turn_span(messages, i, full, tokenizer, tools))
                    if end is not None and spans[-1][0] >= end:  # a template writes its turns in order
                        break
            return spans

        return full, turns, False
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise BadExample("'prompt' and 'completion' must both be strings")
        return prompt + completion, lambda end: [(len(prompt), len(prompt) + len(completion))], True
    if "text" in row:
        if not isinstance(row["text"], str):
            raise BadExample("'text' must be a string")
        return row["text"], lambda end: [(0, len(row["text"]))], True
    raise BadExample(f"no 'text', 'prompt'/'completion' or 'messages' field (found: {', '.join(row) or 'nothing'})")


# Truncation keeps the first max_seq_len + 1 tokens, so a long text is tokenised a prefix at a time: first
# 64 characters per kept token (a Qwen2.5 token spans 4 characters of English on average, 1 of digits, emoji or
# Chinese, at most 128: a run of spaces), four times more while the kept tokens do not all end in the first half
# of the prefix, and the whole text once a prefix would hold half of it. The tokenizer splits text into words
# (its pre-tokenizer) and tokenises each on its own, so the tokens of the first half are the whole text's (tested
# on runs of one character, where a word is the whole prefix, too): at max_seq_len 2048 a 21 MB line is
# tokenised 131,136 characters at a time instead of whole. Text of up to twice the first prefix (262,272
# characters at max_seq_len 2048) is tokenised whole, as it always was.
PREFIX_CHARS_PER_TOKEN = 64
PREFIX_GROWTH = 4


def encode_prefix(tokenizer: Tokenizer, text: str, keep: int) -> tuple[list[int], list[tuple[int, int]], bool]:
    """The first ``keep`` tokens of ``text`` or all of them if it has no more, their character offsets, and
    whether it has more (then EOS and the rest of the text are cut anyway)."""
    limit = PREFIX_CHARS_PER_TOKEN * keep
    while limit < len(text) // 2:
        ids, offsets = tokenizer.encode_with_offsets(text[:limit])
        if len(ids) > keep and offsets[keep - 1][1] <= limit // 2:
            return ids[:keep], offsets[:keep], True
        limit *= PREFIX_GROWTH
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ids, offsets, False


def encode_example(row: dict, tokenizer: Tokenizer, max_seq_len: int) -> tuple[Example, bool]:
    """Tokenise one row; returns the example and whether it was truncated."""
    text, trained_spans, add_eos = _spans(row, tokenizer)
    ids, offsets, cut = encode_prefix(tokenizer, text, max_seq_len + 1)
    spans = trained_spans(offsets[-1][1] if cut else None)
    trained = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    if add_eos and not cut:
        ids.append(tokenizer.eos_id)
        trained.append(True)
    ids_arr = np.asarray(ids, dtype=np.int64)
    trained_arr = np.asarray(trained, dtype=bool)
    truncated = cut or len(ids_arr) > max_seq_len + 1
    ids_arr, trained_arr = ids_arr[: max_seq_len + 1], trained_arr[: max_seq_len + 1]
    labels = np.where(trained_arr[1:], ids_arr[1:], IGNORE_INDEX)
    if len(ids_arr) < 2 or not (labels != IGNORE_INDEX).any():
        raise BadExample("nothing to learn: every token is masked out" + (" after truncation" if truncated else ""))
    return Example(ids_arr[:-1], labels), truncated


# The longest line a JSON Lines file may hold: a line is read whole before it is parsed, and 64 MiB is over
# 10 million tokens of text, thousands of times what a --max-seq-len keeps. A longer line is one bad line, read
# past a megabyte at a time.
MAX_LINE_BYTES = 64 << 20


class LongLine(bytes):
    """What ``jsonl_lines`` yields for a line longer than MAX_LINE_BYTES: empty, with the line's length;
    ``parse_line`` refuses it."""

    def __new__(cls, length: int):
        line = super().__new__(cls)
        line.length = length
        return line


def parse_line(raw: bytes):
    """One line of a JSON Lines file as its JSON value; BadExample when it is too long, not UTF-8 or not JSON."""
    if isinstance(raw, LongLine):
        raise BadExample(f"the line is {byte_size(raw.length)} long, more than the {byte_size(MAX_LINE_BYTES)} a line "
                         "may hold; split the example, or keep only the start that --max-seq-len keeps anyway")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadExample(f"not UTF-8 text (byte {e.start} of the line is {raw[e.start]:#04x})") from None
    try:
        return parse_json(line)
    except ValueError as e:
        raise BadExample(f"{e}; expected JSON Lines, one object per line") from None


def jsonl_lines(path: Path, what: str = "data file"):
    """(line number, bytes) of every non-blank line of a JSON Lines file (``what`` names it in the error when it
    cannot be read); each line is decoded on its own (parse_line), so that one bad line is one bad example. A
    UTF-8 byte order mark at the start is not part of the first line. A line longer than MAX_LINE_BYTES is not
    read into memory: it comes as a LongLine, which parse_line refuses."""
    try:
        with path.open("rb") as f:
            lineno = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    length = len(raw)
                    while (raw := f.readline(1 << 20)) and not raw.endswith(b"\n"):
                        length += len(raw)
                    yield lineno, LongLine(length + len(raw.rstrip(b"\n")))
                    continue
                raw = raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw
                if raw.strip():
                    yield lineno, raw
    except OSError as e:
        raise OrtloraError(f"{what} {path} cannot be read ({e.strerror or e})") from None


def jsonl_rows(path: Path):
    """(line number, JSON value or the BadExample that says why the line is none) of a JSON Lines file."""
    first = True
    for lineno, raw in jsonl_lines(path):
        try:
            yield lineno, parse_line(raw)
        except BadExample as e:
            if first and raw.lstrip().startswith(b"["):  # a whole file that is one pretty-printed JSON list
                e = BadExample(f"{e}; a file that is one JSON list of rows is read as one when it is named .json")
            yield lineno, e
        first = False


def encode_rows(rows, where: str, tokenizer: Tokenizer, max_seq_len: int, on_bad: str = "stop",
                unit: str = "line") -> tuple[list[Example], LoadReport]:
    """Tokenise (number, row) pairs of one source, ``where`` naming it in ``where:number: what is wrong``; a row may
    be the BadExample its reader found instead. on_bad: "stop" raises at the first bad row, "skip" counts it."""
    report = LoadReport(where, unit=unit)
    examples: list[Example] = []
    for number, row in rows:
        try:
            if isinstance(row, BadExample):
                raise row
            example, truncated = encode_example(row, tokenizer, max_seq_len)
        except TemplateTooCostly as e:  # the template's fault, not the row's: the run stops, naming the row
            raise OrtloraError(f"{where}:{number}: {e}") from None
        except BadExample as e:
            problem = f"{where}:{number}: {e}"
            if on_bad == "stop":
                raise OrtloraError(f"{problem} (pass --on-bad-data skip to skip such {unit}s)") from None
            report.skipped.append(problem)
            continue
        examples.append(example)
        report.truncated += truncated
    if not examples:
        raise OrtloraError(f"{where} has no usable examples" +
                           (f" ({len(report.skipped)} bad {unit}s)" if report.skipped else ""))
    report.examples = len(examples)
    return examples, report


def load_jsonl(path: Path, tokenizer: Tokenizer, max_seq_len: int, on_bad: str = "stop") -> tuple[list[Example], LoadReport]:
    """Read and tokenise a JSON Lines file. on_bad: "stop" raises at the first bad line, "skip" counts it."""
    if not path.is_file():
        raise OrtloraError(f"data file {path} " + ("is not a file" if path.exists() else "does not exist"))
    return encode_rows(jsonl_rows(path), str(path), tokenizer, max_seq_len, on_bad)


def pack(examples: list[Example], max_seq_len: int) -> list[Example]:
    """Concatenate consecutive examples into sequences of at most max_seq_len tokens.

    Each token keeps its example's number (``segments``), which the loss graphs read in the attention mask
    column: an example attends only to itself and its positions restart at 0, so a packed example's loss and
    gradients are those it has alone (export.segment_attention). Labels never cross a boundary either, since
    each example is shifted on its own.
    """
    packed: list[Example] = []
    group: list[Example] = []
    length = 0
    for ex in examples:
        if group and length + len(ex.input_ids) > max_seq_len:
            packed.append(_concatenate(group))
            group, length = [], 0
        group.append(ex)
        length += len(ex.input_ids)
    if group:
        packed.append(_concatenate(group))
    return packed


def _concatenate(group: list[Example]) -> Example:
    return Example(np.concatenate([ex.input_ids for ex in group]), np.concatenate([ex.labels for ex in group]),
                   np.concatenate([np.full(len(ex.input_ids), i, np.int64) for i, ex in enumerate(group, 1)]))


def collate(examples: list[Example], pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest example: pad tokens are not attended to and not trained. The attention mask
    holds each token's segment (1 for an example of its own, 1, 2, ... in a packed sequence; 0 padding)."""
    width = max(len(ex.input_ids) for ex in examples)
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(examples), width), dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = ex.input_ids
        attention_mask[row, :n] = 1 if ex.segments is None else ex.segments
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
