"""Function-calling data ({"messages": [...], "tools": [...]}) rendered as transformers renders it with Qwen2.5's
real chat template, trained on the assistant's calls and replies only, and refused in one line when malformed.

The reference is transformers' ``apply_chat_template(messages, tools=tools)`` on the files in
ortlora/data/qwen2.5-tokenizer (Qwen2.5-0.5B-Instruct's tokenizer and template). Its ``tojson`` keeps key order
and non-ASCII text and escapes no HTML, where jinja's own filter sorts keys and writes \\u003c and \\u00fc.
"""

from __future__ import annotations

import copy as copying
import json
from pathlib import Path

import numpy as np
import pytest

from ortlora.build.tiny import QWEN25_TOKENIZER_DIR
from ortlora.errors import OrtloraError
from ortlora.runtime import generate_cli
from ortlora.runtime.data import IGNORE_INDEX, BadExample, encode_example, load_jsonl
from ortlora.runtime.tokenizer import Tokenizer

QWEN25 = QWEN25_TOKENIZER_DIR
TOOLS_DATA = Path(__file__).parents[1] / "ortlora" / "data" / "tools_train.jsonl"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> in a city, e.g. Zürich",
    "parameters": {"type": "object", "properties": {"zcity": {"type": "string"}, "a<b": {"type": "integer"},
                                                    "unit": {"type": "string", "enum": ["°C", "°F"]}},
                   "required": ["zcity"]}}}
CONVERT = {"type": "function", "function": {
    "name": "convert", "description": "Convert & round an amount",
    "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "amount": {"type": "number"}}}}}


def call(name: str, arguments, as_string: bool = False) -> dict:
    return {"type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False) if as_string else arguments}}


ZURICH = {"zcity": "Zürich", "a<b": 1, "unit": "°C"}  # keys not in alphabetical order, non-ASCII, '<'
ROWS = {
    "dict arguments, no system message": {
        "messages": [{"role": "user", "content": "Wetter in Zürich?"},
                     {"role": "assistant", "content": None, "tool_calls": [call("get_weather", ZURICH)]},
                     {"role": "tool", "content": '{"temp": 3, "sky": "Schnee <leicht>"}'},
                     {"role": "assistant", "content": "3 °C und leichter Schnee in Zürich."}],
        "tools": [WEATHER]},
    "JSON-string arguments, system message": {
        "messages": [{"role": "system", "content": "Réponds en français."},
                     {"role": "user", "content": "Convertis 20 € en yens."},
                     {"role": "assistant", "content": "", "tool_calls": [call("convert", {"to": "JPY", "amount": 20},
                                                                              as_string=True)]},
                     {"role": "tool", "content": "3240"},
                     {"role": "assistant", "content": "20 € font environ 3 240 ¥."}],
        "tools": [WEATHER, CONVERT]},
    "several calls in one turn, consecutive tool responses, content beside the calls": {
        "messages": [{"role": "user", "content": "Zürich and Genève, and 5 CHF in EUR?"},
                     {"role": "assistant", "content": "Looking these up.",
                      "tool_calls": [call("get_weather", ZURICH), call("get_weather", {"zcity": "Genève"}, as_string=True),
                                     call("convert", {"to": "EUR", "amount": 5})]},
                     {"role": "tool", "content": "9 °C"}, {"role": "tool", "content": "12 °C"},
                     {"role": "tool", "content": "5.3"},
                     {"role": "assistant", "content": "Zürich 9 °C, Genève 12 °C; 5 CHF is 5.30 EUR."},
                     {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You're welcome."}],
        "tools": [WEATHER, CONVERT]},
    "flat tool call without the function wrapper, bare function schema": {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                     {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"zcity": "Oslo"}}]},
                     {"role": "tool", "content": "-4 °C"}, {"role": "assistant", "content": "-4 °C."}],
        "tools": [WEATHER["function"]]},
    "tools offered but not called": {
        "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        "tools": [WEATHER]},
    "tool calls without tools": {
        "messages": [{"role": "user", "content": "Weather in Rome?"},
                     {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"zcity": "Rome"})]},
                     {"role": "tool", "content": "20 °C"}, {"role": "assistant", "content": "20 °C."}]},
}


def reference_messages(messages: list[dict]) -> list[dict]:
    """What we hand transformers: arguments as objects, as its docs ask (a JSON string would be quoted whole)."""
    messages = copying.deepcopy(messages)
    for m in messages:
        for c in m.get("tool_calls") or []:
            function = c.get("function", c)
            if isinstance(function["arguments"], str):
                function["arguments"] = json.loads(function["arguments"])
    return messages


@pytest.fixture(scope="module")
def qwen() -> Tokenizer:
    return Tokenizer(QWEN25)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN25)


def hf_ids(hf, messages, tools, **kwargs) -> list[int]:
    return hf.apply_chat_template(reference_messages(messages), tools=tools, return_dict=False, **kwargs)


def trained_text(tokenizer: Tokenizer, labels: np.ndarray) -> str:
    return tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=False)


@pytest.mark.parametrize("case", list(ROWS))
def test_rendering_and_token_ids_equal_transformers(qwen, hf, case):
    row = ROWS[case]
    tools = row.get("tools")
    reference = hf.apply_chat_template(reference_messages(row["messages"]), tools=tools, tokenize=False)
    example, truncated = encode_example(copying.deepcopy(row), qwen, 4096)
    full = np.append(example.input_ids, example.labels[-1])
    assert not truncated
    assert qwen.decode(full, skip_special_tokens=False) == reference
    assert full.tolist() == hf_ids(hf, row["messages"], tools)
    prompt = qwen.apply_chat_template(reference_messages(row["messages"][:2]), add_generation_prompt=True, tools=tools)
    assert prompt == hf.apply_chat_template(reference_messages(row["messages"][:2]), tools=tools, tokenize=False,
                                            add_generation_prompt=True)


def test_tojson_keeps_key_order_and_text_as_transformers_does(qwen, hf):
    row = ROWS["dict arguments, no system message"]
    text = qwen.apply_chat_template(row["messages"], tools=row["tools"])
    assert '{"name": "get_weather", "arguments": {"zcity": "Zürich", "a<b": 1, "unit": "°C"}}' in text
    assert '"description": "Weather <now> in a city, e.g. Zürich"' in text
    assert "\\u" not in text and '"a<b": {"type": "integer"}' in text
    # jinja's builtin tojson (what a plain jinja2 environment renders) differs: sorted keys, \u escapes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    plain.globals["raise_exception"] = lambda m: None
    jinja_text = plain.from_string(qwen.chat_template).render(messages=row["messages"], tools=row["tools"])
    assert '{"a\\u003cb": 1, "unit": "\\u00b0C", "zcity": "Z\\u00fcrich"}' in jinja_text


def test_json_string_arguments_render_as_the_object_they_spell(qwen, hf):
    """transformers quotes a string whole ("arguments": "{\\"to\\": ...}"); ortlora decodes it first, so a
    dataset that stores arguments as JSON strings (as OpenAI's API returns them) trains the object form."""
    as_dict = {"messages": [{"role": "user", "content": "x"},
                            {"role": "assistant", "content": None, "tool_calls": [call("convert", {"to": "€", "amount": 2})]}],
               "tools": [CONVERT]}
    as_string = copying.deepcopy(as_dict)
    as_string["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"to": "€", "amount": 2}'
    a, _ = encode_example(as_dict, qwen, 1024)
    b, _ = encode_example(as_string, qwen, 1024)
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
    quoted = hf.apply_chat_template(as_string["messages"], tools=[CONVERT], tokenize=False)
    assert '"arguments": "{\\"to\\": \\"€\\", \\"amount\\": 2}"' in quoted  # what we do not train


def expected_labels(hf, messages: list[dict], tools) -> list[int]:
    """Labels derived from transformers alone: assistant turn i is the tokens that rendering messages[:i + 1]
    adds to messages[:i] with the generation prompt (its calls, reply, <|im_end|> and newline)."""
    full = hf_ids(hf, messages, tools)
    trained = np.zeros(len(full), dtype=bool)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = hf_ids(hf, messages[:i], tools, add_generation_prompt=True)
        upto = hf_ids(hf, messages[: i + 1], tools)
        assert upto[: len(prompt)] == prompt and full[: len(upto)] == upto
        trained[len(prompt): len(upto)] = True
    return [t if keep else IGNORE_INDEX for t, keep in zip(full[1:], trained[1:])]


@pytest.mark.parametrize("case", list(ROWS))
def test_labels_are_the_assistant_turns_and_never_tool_results(qwen, hf, case):
    row = ROWS[case]
    example, _ = encode_example(copying.deepcopy(row), qwen, 4096)
    assert example.labels.tolist() == expected_labels(hf, row["messages"], row.get("tools"))
    trained = trained_text(qwen, example.labels)
    assert "<tool_response>" not in trained and "<tools>" not in trained and "<|im_start|>" not in trained
    assert trained.count("<|im_end|>") == sum(m["role"] == "assistant" for m in row["messages"])
    # every token from <tool_response> through </tool_response> is untrained (labels[t - 1] predicts token t)
    text = qwen.decode(np.append(example.input_ids, example.labels[-1]), skip_special_tokens=False)
    _, offsets = qwen.encode_with_offsets(text)
    spans = [(s, text.index("</tool_response>", s) + len("</tool_response>"))
             for s in range(len(text)) if text.startswith("<tool_response>", s)]
    assert len(spans) == sum(m["role"] == "tool" for m in row["messages"])
    inside = [t for t, (start, _) in enumerate(offsets) if any(s <= start < e for s, e in spans)]
    assert bool(inside) == bool(spans) and (example.labels[np.asarray(inside, dtype=int) - 1] == IGNORE_INDEX).all()


def test_an_assistant_tool_call_turn_is_trained_from_its_first_call(qwen):
    row = ROWS["dict arguments, no system message"]
    example, _ = encode_example(copying.deepcopy(row), qwen, 4096)
    assert trained_text(qwen, example.labels) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"zcity": "Zürich", "a<b": 1, "unit": "°C"}}\n'
        "</tool_call><|im_end|>\n3 °C und leichter Schnee in Zürich.<|im_end|>\n")


def test_a_conversation_opening_with_a_tool_call_trains_that_call(qwen, hf):
    """Qwen2.5's template reads messages[0], so no prompt renders before a first assistant turn; the turn is then
    found by its content, and a turn of tool calls alone has none (the marker in data._turn_span)."""
    messages = [{"role": "assistant", "content": None, "tool_calls": [call("get_weather", ZURICH)]},
                {"role": "tool", "content": "3 °C"}, {"role": "assistant", "content": "3 °C."}]
    example, _ = encode_example({"messages": copying.deepcopy(messages), "tools": [WEATHER]}, qwen, 4096)
    assert np.append(example.input_ids, example.labels[-1]).tolist() == hf_ids(hf, messages, [WEATHER])
    assert trained_text(qwen, example.labels) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"zcity": "Zürich", "a<b": 1, "unit": "°C"}}\n'
        "</tool_call><|im_end|>\n3 °C.<|im_end|>\n")


def tool_row(**change) -> dict:
    row = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", {"zcity": "Oslo"})]},
                        {"role": "tool", "content": "-4 °C"}, {"role": "assistant", "content": "-4 °C."}],
           "tools": [WEATHER]}
    for where, value in change.items():
        target = row
        *path, last = where.split("__")
        for key in path:
            target = target[int(key) if key.isdigit() else key]
        target[int(last) if last.isdigit() else last] = value
    return row


BAD_ROWS = {
    "tools not a list": (tool_row(tools={"get_weather": {}}), "'tools' must be a list of function descriptions"),
    "tools a JSON string": (tool_row(tools=json.dumps([WEATHER])), "'tools' must be a list of function descriptions like"),
    "a tool without a name": (tool_row(tools=[{"type": "function", "function": {"parameters": {}}}]),
                              "tool 0 needs a non-empty string 'name'"),
    "a tool not an object": (tool_row(tools=["get_weather"]), "tool 0 is a string, not an object"),
    "tools without messages": ({"tools": [WEATHER], "text": "hi"}, "'tools' come with 'messages'"),
    "unknown role": (tool_row(messages__2__role="function"),
                     "message 2 has role 'function'; expected one of system, user, assistant, tool"),
    "tool_calls not a list": (tool_row(messages__1__tool_calls={"name": "get_weather"}),
                              "message 1: 'tool_calls' must be a list of"),
    "tool call not an object": (tool_row(messages__1__tool_calls=["get_weather(Oslo)"]),
                                "message 1, tool call 0 is a string, not an object"),
    "tool call without a name": (tool_row(messages__1__tool_calls=[{"type": "function", "function": {"arguments": {}}}]),
                                 "message 1, tool call 0 needs a non-empty string 'name', not null"),
    "arguments not JSON": (tool_row(messages__1__tool_calls=[call("get_weather", "{zcity: Oslo}")]),
                           "message 1, tool call 0: 'arguments' is a string that is not valid JSON"),
    "arguments a list": (tool_row(messages__1__tool_calls=[call("get_weather", ["Oslo"])]),
                         "message 1, tool call 0: 'arguments' must be an object (or a JSON string of one), not an array"),
    "arguments missing": (tool_row(messages__1__tool_calls=[{"type": "function", "function": {"name": "get_weather"}}]),
                          "message 1, tool call 0: 'arguments' must be an object (or a JSON string of one), not null"),
    "a call of another type": (tool_row(messages__1__tool_calls=[{"type": "retrieval", "function": {"name": "x"}}]),
                               "message 1, tool call 0 has type 'retrieval'"),
    "tool calls on a user message": (tool_row(messages__0__tool_calls=[call("get_weather", {})]),
                                     "message 0 is a 'user' message with 'tool_calls'"),
    "null content without tool calls": (tool_row(messages__3__content=None),
                                        "message 3 needs a string 'content', not null (it may be null only"),
    "tool result not a string": (tool_row(messages__2__content={"temp": -4}), "message 2 needs a string 'content', not an object"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_malformed_function_calling_row_is_one_clear_line(qwen, tmp_path, case):
    row, message = BAD_ROWS[case]
    with pytest.raises(BadExample) as caught:
        encode_example(row, qwen, 1024)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(tool_row()) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(OrtloraError) as caught:
        load_jsonl(data, qwen, 1024)
    assert str(caught.value).startswith(f"{data}:2: {message}") and "\n" not in str(caught.value)
    examples, report = load_jsonl(data, qwen, 1024, on_bad="skip")
    assert len(examples) == 1 and len(report.skipped) == 1


def test_the_shipped_tool_data_renders_as_transformers_does(qwen, hf):
    rows = [json.loads(line) for line in TOOLS_DATA.read_text().splitlines()]
    assert any(isinstance(c["function"]["arguments"], str) for r in rows for m in r["messages"]
               for c in m.get("tool_calls") or [])
    examples, report = load_jsonl(TOOLS_DATA, qwen, 4096)
    assert report.examples == len(rows) and not report.skipped and not report.truncated
    for row, example in zip(rows, examples):
        assert example.labels.tolist() == expected_labels(hf, row["messages"], row.get("tools"))


@pytest.fixture(scope="module")
def qwen_artifacts(tmp_path_factory) -> Path:
    """Artifacts of a 2-layer, 64-wide model with Qwen2.5's real tokenizer and chat template. The tiny default
    cannot hold these rows: its 512-token vocabulary spends about 550 tokens on Qwen2.5's tools preamble
    alone, past its 512-token context (Qwen2.5's tokenizer: about 200)."""
    from ortlora.build.builder import BuildOptions, build
    from ortlora.build.tiny import create_random_model

    model = create_random_model(tmp_path_factory.mktemp("model") / "qwen25-small", "qwen2.5-0.5b", seed=0, layers=2,
                                tokenizer="real", hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                num_key_value_heads=2, initializer_range=0.2)
    out = tmp_path_factory.mktemp("artifacts") / "qwen25-small"
    build(BuildOptions(model_dir=model, out_dir=out), echo=lambda *a, **k: None)
    return out


FAST = ["--no-progress", "--no-plot", "--batch-size", "2", "--max-steps", "1"]


def train(*args: str) -> int:
    from ortlora.runtime import cli as train_cli

    return train_cli.main([*args, *FAST])


def test_ortlora_train_takes_a_step_on_the_shipped_tool_data(qwen_artifacts, tmp_path, capsys):
    code = train("--artifacts", str(qwen_artifacts), "--data", str(TOOLS_DATA), "--out", str(tmp_path / "run"))
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"{len(TOOLS_DATA.read_text().splitlines())} examples from {TOOLS_DATA}" in out.out
    assert (tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors").is_file()


def test_a_template_that_never_reads_tools_refuses_tool_data_in_one_line(artifacts, tmp_path, capsys):
    code = train("--artifacts", str(artifacts), "--data", str(TOOLS_DATA), "--out", str(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"tools_train.jsonl:1: the chat template ({artifacts / 'chat_template.jinja'}) never reads 'tools'" in err


def test_ortlora_generate_renders_tools_into_the_prompt(qwen_artifacts, hf, capsys):
    from ortlora.runtime.generate import Generator

    messages = [{"role": "system", "content": "Use °C."}, {"role": "user", "content": "Weather in Zürich?"}]
    prompt = Generator(qwen_artifacts).prompt(messages=messages, tools=[WEATHER])
    assert prompt == hf_ids(hf, messages, [WEATHER], add_generation_prompt=True)
    text = Tokenizer(qwen_artifacts).decode(prompt, skip_special_tokens=False)
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in text
    args = ["--artifacts", str(qwen_artifacts), "--messages", json.dumps(messages), "--max-new-tokens", "2"]
    assert generate_cli.main([*args, "--tools", json.dumps([WEATHER])]) == 0
    capsys.readouterr()
    assert generate_cli.main([*args, "--tools", '{"name": "get_weather"}']) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tools: 'tools' must be a list") and len(err.splitlines()) == 1


def test_ortlora_generate_refuses_tools_its_template_would_drop(artifacts, capsys):
    code = generate_cli.main(["--artifacts", str(artifacts), "--messages", '[{"role": "user", "content": "hi"}]',
                              "--tools", json.dumps([WEATHER])])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "never reads 'tools'" in err, err
