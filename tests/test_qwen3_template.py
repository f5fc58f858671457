"""Qwen3's real tokenizer and chat template (ortlora/data/qwen3-tokenizer) rendered by ortlora's own renderer
(tokenizers plus jinja2's sandbox, no transformers) exactly as transformers renders them: the same text and the
same ids for a plain conversation, thinking (``reasoning_content``), ``enable_thinking=False`` on the generation
prompt and tool calls. A random Qwen3 model made with ``tokenizer="real"`` carries these files.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from ortlora.build.tiny import QWEN3_TOKENIZER_DIR, create_random_model
from ortlora.runtime.tokenizer import TemplateRenderError, Tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> in a city, e.g. Zürich",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}
PLAIN = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "4."},
         {"role": "user", "content": "And 3 + 3?"}]
# Thinking: reasoning_content after the last user turn is rendered as <think>...</think>; before it, dropped.
THINKING = [{"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
            {"role": "user", "content": "Double it."},
            {"role": "assistant", "content": "8.", "reasoning_content": "\nTwice 4 is 8.\n"}]
TOOLS = [{"role": "user", "content": "Weather in Zürich?"},
         {"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}}]},
         {"role": "tool", "content": '{"temp": 3, "sky": "snow <light>"}'},
         {"role": "assistant", "content": "3 °C and light snow.", "reasoning_content": "The tool says 3 °C."}]
CASES = {  # name: (messages, keyword arguments of apply_chat_template)
    "plain conversation, generation prompt": (PLAIN, dict(add_generation_prompt=True)),
    "reasoning_content rendered as thinking": (THINKING, {}),
    "enable_thinking=False on the generation prompt": (PLAIN, dict(add_generation_prompt=True, enable_thinking=False)),
    "enable_thinking=True on the generation prompt": (PLAIN, dict(add_generation_prompt=True, enable_thinking=True)),
    "a tool call, its response and a reply": (TOOLS, dict(tools=[WEATHER])),
}


@pytest.fixture(scope="module")
def reference():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(QWEN3_TOKENIZER_DIR)


def test_the_shipped_files_are_the_published_ones_and_fit_qwen3():
    sums = dict(line.split()[::-1] for line in (QWEN3_TOKENIZER_DIR / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == ["tokenizer.json", "tokenizer_config.json"]
    for name, digest in sums.items():
        assert hashlib.sha256((QWEN3_TOKENIZER_DIR / name).read_bytes()).hexdigest() == digest, name
    ours = Tokenizer(QWEN3_TOKENIZER_DIR)
    # 151,643 BPE tokens + 26 added, the last </think> 151668: every id fits Qwen3's embedding of 151,936 rows.
    assert ours.vocab_size == 151_669 and ours._tok.token_to_id("</think>") == 151_668 < 151_936
    assert (ours.eos_token, ours.eos_id, ours.pad_token, ours.pad_id) == ("<|im_end|>", 151_645, "<|endoftext|>", 151_643)


@pytest.mark.parametrize("case", CASES)
def test_ortlora_renders_qwen3s_template_as_transformers_does(reference, case):
    messages, kwargs = CASES[case]
    theirs = reference.apply_chat_template(messages, tokenize=False, **kwargs)
    ours = Tokenizer(QWEN3_TOKENIZER_DIR).apply_chat_template(messages, **kwargs)
    assert ours == theirs
    assert Tokenizer(QWEN3_TOKENIZER_DIR).encode(ours) == reference(theirs, add_special_tokens=False)["input_ids"]


def test_a_tool_call_with_content_none_fails_in_both(reference):
    """Unlike Qwen2.5's, Qwen3's template reads an assistant turn's content as a string (``content.lstrip``), so a
    tool call with ``"content": null`` fails in transformers too; ortlora says so as a data problem."""
    messages = [TOOLS[0], {**TOOLS[1], "content": None}]
    with pytest.raises(Exception, match="content"):
        reference.apply_chat_template(messages, tools=[WEATHER], tokenize=False)
    with pytest.raises(TemplateRenderError, match="content"):
        Tokenizer(QWEN3_TOKENIZER_DIR).apply_chat_template(messages, tools=[WEATHER])


def test_the_template_renders_what_qwen3_documents(reference):
    """Not only equal to transformers: thinking appears only after the last user turn, and a disabled thinking
    prompt ends in an empty think block."""
    text = Tokenizer(QWEN3_TOKENIZER_DIR).apply_chat_template(THINKING)
    assert "Two and two" not in text and text.endswith("<|im_start|>assistant\n<think>\nTwice 4 is 8.\n</think>\n\n8.<|im_end|>\n")
    prompt = Tokenizer(QWEN3_TOKENIZER_DIR).apply_chat_template(PLAIN, add_generation_prompt=True, enable_thinking=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    calls = Tokenizer(QWEN3_TOKENIZER_DIR).apply_chat_template(TOOLS, tools=[WEATHER])
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}\n</tool_call>' in calls


def test_a_random_qwen3_with_the_real_tokenizer_carries_qwen3s(tmp_path):
    model = create_random_model(tmp_path / "model", "qwen3-0.6b", seed=0, layers=1, dtype="bf16", tokenizer="real",
                                hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (model / name).read_bytes() == (QWEN3_TOKENIZER_DIR / name).read_bytes()
    config = json.loads((model / "config.json").read_text())
    assert (config["model_type"], config["eos_token_id"], config["pad_token_id"]) == ("qwen3", 151_645, 151_643)
    assert config["vocab_size"] >= Tokenizer(model).vocab_size


# What is trained of a Qwen3 conversation: TRL's answer. Qwen3's template is not prefix-preserving (a turn's thinking
# is dropped once the user speaks again), so TRL trains on its own variant of it (trl.get_training_chat_template),
# whose {% generation %} marks each assistant turn: its thinking block (empty when it has none), reply, tool calls
# and end of turn. ortlora's tokens and trained positions must be exactly those, for both revisions of Qwen3's
# template: the one shipped here and the later one TRL knows (which reads content that is not a string as empty).
NO_THINKING = [{"role": "system", "content": "You are terse."}, PLAIN[1], PLAIN[2], PLAIN[3],
               {"role": "assistant", "content": "6."}]
THINK_IN_CONTENT = [PLAIN[1], {"role": "assistant", "content": "<think>\nTwo twos.\n</think>\n\n4."}, PLAIN[3],
                    {"role": "assistant", "content": "6."}]
TRAINED = {  # name: (messages, tools)
    "two thinking turns": (THINKING, None),
    "two turns without thinking, a system prompt": (NO_THINKING, None),
    "thinking written in the content": (THINK_IN_CONTENT, None),
    "a tool call, its response and a reply": (TOOLS, [WEATHER]),
    "a tool call with content null": ([TOOLS[0], {**TOOLS[1], "content": None}, *TOOLS[2:]], [WEATHER]),
}


def qwen3_tokenizer_dir(tmp_path, revision: str):
    """Qwen3's tokenizer with the shipped template ("shipped") or the later revision TRL carries ("trl")."""
    if revision == "shipped":
        return QWEN3_TOKENIZER_DIR
    from trl.chat_template_utils import qwen3_chat_template

    config = json.loads((QWEN3_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": qwen3_chat_template}))
    (tmp_path / "tokenizer.json").write_bytes((QWEN3_TOKENIZER_DIR / "tokenizer.json").read_bytes())
    return tmp_path


def trl_tokens_and_mask(reference, messages, tools) -> tuple[list[int], list[int]]:
    from trl.chat_template_utils import get_training_chat_template, qwen3_chat_template

    reference.chat_template = qwen3_chat_template
    encoded = reference.apply_chat_template(messages, tools=tools, chat_template=get_training_chat_template(reference),
                                            tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


@pytest.mark.parametrize("case, revision", [(case, revision) for case, (messages, _) in TRAINED.items()
                                            for revision in ("shipped", "trl")
                                            # the shipped revision fails on content null, in transformers too (above)
                                            if revision == "trl" or all(m.get("content") is not None for m in messages)])
def test_the_tokens_trained_of_a_qwen3_conversation_are_trls(reference, tmp_path, revision, case):
    from ortlora.runtime.data import IGNORE_INDEX, encode_example

    messages, tools = TRAINED[case]
    tokens, mask = trl_tokens_and_mask(reference, messages, tools)
    assert sum(mask) > 0
    row = {"messages": messages, **({"tools": tools} if tools else {})}
    example, _ = encode_example(row, Tokenizer(qwen3_tokenizer_dir(tmp_path, revision)), 4096)
    assert example.input_ids.tolist() == tokens[:-1]
    # position k is trained to predict token k + 1 where TRL's mask holds that token
    assert example.labels.tolist() == [t if m else IGNORE_INDEX for t, m in zip(tokens[1:], mask[1:])]


def test_what_is_trained_of_a_thinking_turn(tmp_path):
    """Read as a user would: every assistant turn is trained from its <think> to its end of turn, the thinking of
    an earlier turn included; the role header and the user's turns are not."""
    from ortlora.runtime.data import IGNORE_INDEX, encode_example

    tokenizer = Tokenizer(QWEN3_TOKENIZER_DIR)
    example, _ = encode_example({"messages": THINKING}, tokenizer, 4096)
    trained = [(k, t) for k, t in enumerate(example.labels.tolist()) if t != IGNORE_INDEX]
    runs, run = [], []
    for (k, t), following in zip(trained, [*trained[1:], (None, None)]):
        run.append(t)
        if following[0] != k + 1:
            runs.append(tokenizer.decode(run, skip_special_tokens=False))
            run = []
    assert runs == ["<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>\n",
                    "<think>\nTwice 4 is 8.\n</think>\n\n8.<|im_end|>\n"]
    # generation keeps Qwen3's own template: earlier thinking is not in the prompt it writes
    assert "Two and two" not in tokenizer.apply_chat_template(THINKING[:3], add_generation_prompt=True)


def test_a_template_not_prefix_preserving_and_unknown_is_refused_in_one_line(tmp_path):
    from ortlora.runtime.data import BadExample, encode_example

    config = json.loads((QWEN3_TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config["chat_template"] = config["chat_template"].replace("You may call", "You can call")  # unknown to ortlora
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_bytes((QWEN3_TOKENIZER_DIR / "tokenizer.json").read_bytes())
    with pytest.raises(BadExample, match="renders message 1 differently once later messages follow") as error:
        encode_example({"messages": THINKING}, Tokenizer(tmp_path), 4096)
    assert "\n" not in str(error.value)
