"""Hostile input costs bounded time and memory and ends in one line: chat templates that loop or grow without
end, data lines too long to tokenise whole, tokenizer files that are links out of the artifacts, and Ctrl-C."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from ortlora.errors import OrtloraError
from ortlora.manifest import MANIFEST_NAME
from ortlora.runtime.tokenizer import TemplateRenderError, TemplateTooCostly, Tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the opposite of hot?"},
            {"role": "assistant", "content": "Cold."}]


@pytest.fixture()
def tokenizer(tiny_model) -> Tokenizer:
    return Tokenizer(tiny_model)


def with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    tokenizer.chat_template = template
    return tokenizer


# Each of these would run for minutes, or allocate gigabytes, without the budget; the first few finish in a
# second or two unbudgeted (so that this test fails there rather than hangs) and are refused all the same.
HOSTILE_TEMPLATES = {
    "nested loops": "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "loops over the messages": "{% for a in messages %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "much text": "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    "exponential macro": "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "recursive loop": "{% for x in range(3) recursive %}{{ loop(range(100000)) if loop.depth < 3 }}{% endfor %}",
    "doubling with ~": "{% set s = 'x' %}" + "{% set s = s ~ s %}" * 40 + "{{ s | length }}",
    "doubling in a namespace": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                               "{% endfor %}{{ ns.s | length }}",
    "squaring": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ 1 }}",
    "'x' * n": "{{ ('x' * 10000000000) | length }}",
    "a power": "{{ (9 ** 999999999) % 10 }}",
    "center filter": "{{ 'x' | center(10000000000) | length }}",
    "str.center": "{{ 'x'.center(10000000000) | length }}",
    "str.expandtabs": "{{ ('\\t' * 10000).expandtabs(1000000) | length }}",
    "indent filter": "{{ ('a\\n' * 100000) | indent(100000) | length }}",
    "str.format width": "{{ '{:>10000000000}'.format(1) | length }}",
    "str.format nested width": "{{ '{:>{}}'.format(1, 10000000000) | length }}",
    "format_map width": "{{ '{:>{w}}'.format_map({'w': 10000000000}) | length }}",
    "% width": "{{ ('%10000000000d' % 1) | length }}",
    "% star width": "{{ ('%*d' % (10000000000, 1)) | length }}",
    "format filter": "{{ '%*d' | format(10000000000, 1) | length }}",
    "replace ''": "{% set s = 'x' * 100000 %}{{ s | replace('', s) | length }}",
    "str.replace ''": "{% set s = 'x' * 100000 %}{{ s.replace('', s) | length }}",
    "join": "{% set s = 'x' * 100000 %}{{ ([s] * 100000) | join | length }}",
    "str.join": "{% set s = 'x' * 100000 %}{{ ''.join([s] * 100000) | length }}",
    "batch filter": "{{ [1] | batch(10000000000, 0) | list | length }}",
    "tojson indent": "{{ messages | tojson(indent=100000000) }}",
    "text captured by set": "{% set s = 'x' * 1000 %}" + "{% set s %}{{ s }}{{ s }}{% endset %}" * 40 + "{{ s | length }}",
    "text captured by a filter block": "{% filter length %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
                                       "{% endfilter %}",
    "text captured by a macro": "{% macro m() %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endmacro %}"
                                "{{ m() | length }}",
    "literal text in a loop": "{% set s %}{% for i in range(100000) %}" + "x" * 1000 + "{% endfor %}{% endset %}{{ s | length }}",
    "many fields of one format": "{% set s = 'x' * 100000 %}{{ ('%s' * 10000) % ((s,) * 10000) }}",
    "many fields of str.format": "{% set s = 'x' * 100000 %}{{ ('{0}' * 10000).format(s) }}",
    "many operands of ~": "{% set s = 'x' * 100000 %}{{ s" + " ~ s" * 200 + " }}",
    "a list written": "{% set s = 'x' * 100000 %}{{ [s] * 10000 }}",
    "a dict written": "{% set s = 'x' * 100000 %}{{ dict.fromkeys(range(10000), s) }}",
    "a list made a string": "{% set s = 'x' * 100000 %}{{ ([s] * 10000) | string | length }}",
    "a namespace written": "{% set s = 'x' * 100000 %}{% set ns = namespace(a=[s] * 10000) %}{{ ns }}",
    "many strings made by map": "{{ range(100000) | map('center', 100000) | list | length }}",
    "a sum of lists": "{{ ([range(10000) | list] * 10000) | sum(start=[]) | length }}",
    "filters over a range in a loop": "{% for i in range(100) %}{{ range(100000) | select('odd') | list | length }}"
                                      "{% endfor %}",
    "a list made in a loop": "{% for i in range(100) %}{{ (range(100000) | list)[-1] }}{% endfor %}",
    "comparisons of long strings": "{% set s = 'x' * 100000 %}{% for i in range(10000) %}{% if 'y' in s %}{% endif %}"
                                   "{% endfor %}",
    "tests of long strings": "{% set s = 'x' * 100000 %}{% for i in range(10000) %}{% if 'y' is in s %}{% endif %}"
                             "{% endfor %}",
    "str methods on long strings": "{% set s = 'x' * 100000 %}{% for i in range(10000) %}{{ s.count('y') }}{% endfor %}",
    "slices of long strings": "{% set s = 'x' * 100000 %}{% for i in range(10000) %}{{ s[1:] | length }}{% endfor %}",
}


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES.values(), ids=HOSTILE_TEMPLATES.keys())
def test_a_chat_template_has_a_budget(tokenizer, template):
    """Refused in a second or so, having made at most a few MB: before the step that would make the value."""
    import tracemalloc

    pattern = r"^the chat template of .*chat_template.jinja (took more than [\d,]+ operations|made a|asks tojson)"
    start = time.perf_counter()
    with pytest.raises(TemplateTooCostly, match=pattern) as e:
        with_template(tokenizer, template).apply_chat_template(MESSAGES)
    assert "\n" not in str(e.value) and time.perf_counter() - start < 5
    if template == HOSTILE_TEMPLATES["exponential macro"]:
        return  # it makes nothing large, and tracing its 200,000 macro calls takes ten seconds
    tracemalloc.start()
    try:
        with pytest.raises(TemplateTooCostly, match=pattern):
            tokenizer.apply_chat_template(MESSAGES)
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_the_budget_grows_with_the_conversation(tokenizer):
    """200,000 operations plus 4 per character: a loop over every character of the content is allowed up to there."""
    tokenizer = with_template(tokenizer, "{% for m in messages %}{% for c in m.content %}{{ c }}{% endfor %}{% endfor %}")
    long = [{"role": "user", "content": "ab" * 100_000}]  # 200,000 iterations and their output: about 400,000 operations
    assert tokenizer.apply_chat_template(long) == "ab" * 100_000
    with pytest.raises(TemplateTooCostly, match="took more than"):
        with_template(tokenizer, "{% for c in messages[0].content %}{% for i in range(5) %}{% endfor %}{% endfor %}"
                      ).apply_chat_template(long)


SAME_TEMPLATES = [  # jinja's features, each rendered by the budgeted sandbox as by jinja's own
    "{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m.role | upper }}: {{ m['content'] ~ '!' }}\n{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages if m.role != 'system' %}{% set ns.n = ns.n + m.content | length %}"
    "{% endfor %}{{ ns.n }} {{ messages | map(attribute='role') | join(', ') }} {{ messages | selectattr('role', "
    "'equalto', 'user') | list | length }}",
    "{% macro turn(m, i=0) %}[{{ i }}:{{ m.role }}]{{ caller() if caller else '' }}{% endmacro %}{% for m in messages %}"
    "{% call turn(m, loop.index0) %}{{ m.content[:4] }}{% endcall %}{% endfor %}",
    "{% set text %}{% for m in messages | reverse %}{{ m.content }}{% if not loop.last %} | {% endif %}{% endfor %}"
    "{% endset %}{{ text | wordwrap(20) }}{% filter upper %}{{ text[:10] }}{% endfilter %}",
    "{% for x in [[1, [2, 3]], [4]] recursive %}{% if x is iterable %}({{ loop(x) }}){% else %}{{ x }}{% endif %}"
    "{% endfor %} {{ '%s-%05.1f' % ('a', 3.14159) }} {{ '{}|{:>4}'.format('b', 7) }} {{ 2 ** 10 }} {{ 7 // 2 }}",
    "{% autoescape true %}{{ ('<b>' | safe) ~ '&' ~ messages[0].content }}{{ '&' }}{% endautoescape %}{{ '<i>' ~ 1 }}",
    "{{ messages | tojson }} {{ messages[1:] | length }} {{ 'x' in messages[0].content }} {{ range(5) | sum }}",
]


@pytest.mark.parametrize("template", SAME_TEMPLATES)
def test_templates_render_as_jinja_renders_them(tokenizer, template):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    jinja.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)  # transformers' tojson, as ortlora's
    expected = jinja.from_string(template).render(messages=MESSAGES, tools=None, documents=None,
                                                  add_generation_prompt=False, eos_token=tokenizer.eos_token,
                                                  pad_token=tokenizer.pad_token, bos_token="")
    assert with_template(tokenizer, template).apply_chat_template(MESSAGES) == expected


def test_a_loop_over_the_messages_may_ask_their_number(tokenizer):
    """messages | length and | last cost one operation, not one per message: 2,000 messages, no quadratic bill."""
    messages = [{"role": "user", "content": f"Hi {i}"} for i in range(2000)]
    tokenizer = with_template(tokenizer, "{% for m in messages %}{{ messages | length - loop.index0 }}"
                                         "{{ '.' if m == messages | last }} {% endfor %}")
    assert tokenizer.apply_chat_template(messages).split() == [str(n) for n in range(2000, 1, -1)] + ["1."]


def test_lipsum_is_not_offered(tokenizer):
    with pytest.raises(TemplateRenderError, match="'lipsum' is undefined"):
        with_template(tokenizer, "{{ lipsum(100000) }}").apply_chat_template(MESSAGES)


def test_templates_within_the_budget_render_as_before(tokenizer):
    template = ("{{ '%d %s' | format(20240101, 'x') }} {{ '{} {:>5}'.format(1700000000, 2) }} {{ ('ab' * 3) | center(10) }}"
                "{{ messages | tojson(indent=2) | length > 0 }} {{ 2 ** 100 }} {{ [1, 2, 3] | join('-') }}")
    assert with_template(tokenizer, template).apply_chat_template(MESSAGES) == \
        f"20240101 x 1700000000     2   ababab  True {2 ** 100} 1-2-3"


def test_a_costly_template_stops_training_with_the_line(tmp_path, tokenizer):
    from ortlora.runtime.data import load_jsonl

    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}\n')
    tokenizer = with_template(tokenizer, HOSTILE_TEMPLATES["nested loops"])
    with pytest.raises(OrtloraError, match=rf"^{data}:1: the chat template of .* took more than"):
        load_jsonl(data, tokenizer, 64, on_bad="skip")


# --- tokenizer files read by their fixed names stay inside the artifacts


def artifact_copy(tiny_model: Path, out: Path) -> Path:
    """The tokenizer files of an artifact directory (its manifest's presence is what makes it one)."""
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, out / name)
    (out / MANIFEST_NAME).write_text("{}")
    return out


@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"])
def test_a_tokenizer_file_linked_outside_the_artifacts_is_refused(tiny_model, tmp_path, name):
    artifacts = artifact_copy(tiny_model, tmp_path / "artifacts")
    secret = tmp_path / "secret"
    secret.write_bytes((tiny_model / name).read_bytes() if name != "chat_template.jinja" else b"{{ 'secret' }}")
    (artifacts / name).unlink(missing_ok=True)
    (artifacts / name).symlink_to(secret)
    with pytest.raises(OrtloraError, match=rf"^{artifacts / name} is a symbolic link that leads outside the artifact "
                                           rf"directory {artifacts},"):
        Tokenizer(artifacts)


def test_links_inside_the_artifacts_and_in_a_model_directory_are_followed(tiny_model, tmp_path):
    artifacts = artifact_copy(tiny_model, tmp_path / "artifacts")
    (artifacts / "templates").mkdir()
    (artifacts / "templates" / "chat.jinja").write_text("{{ 'inside' }}")
    (artifacts / "chat_template.jinja").symlink_to("templates/chat.jinja")
    assert Tokenizer(artifacts).apply_chat_template(MESSAGES) == "inside"
    # The Hugging Face cache links each file of a model snapshot to a blob outside it: a model directory is not
    # an artifact directory, so its links are followed.
    model = tmp_path / "snapshot"
    model.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).symlink_to(tiny_model / name)
    assert Tokenizer(model).vocab_size == Tokenizer(tiny_model).vocab_size



# --- long data lines: only what truncation keeps is tokenised, and a line past 64 MiB is not read whole


def reference_example(row, tokenizer: Tokenizer, max_seq_len: int) -> tuple[list[int], list[int], bool]:
    """encode_example as it was: the whole text tokenised, every assistant turn found, then truncated."""
    from ortlora.runtime import data

    text, spans, add_eos = data._spans(row, tokenizer)
    spans = spans(None)
    ids, offsets = tokenizer.encode_with_offsets(text)
    trained = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    if add_eos:
        ids, trained = ids + [tokenizer.eos_id], trained + [True]
    keep = max_seq_len + 1
    labels = [i if t else data.IGNORE_INDEX for i, t in zip(ids[1:keep], trained[1:keep])]
    if all(label == data.IGNORE_INDEX for label in labels):
        return "nothing to learn"
    return ids[: keep - 1], labels, len(ids) > keep


def outcome(row, tokenizer: Tokenizer, max_seq_len: int):
    from ortlora.runtime.data import BadExample, encode_example

    try:
        example, truncated = encode_example(row, tokenizer, max_seq_len)
    except BadExample as e:
        assert str(e).startswith("nothing to learn")
        return "nothing to learn"
    return example.input_ids.tolist(), example.labels.tolist(), truncated


def tokenizers(tiny_model):
    from ortlora.build.tiny import QWEN25_TOKENIZER_DIR

    return [Tokenizer(tiny_model), Tokenizer(QWEN25_TOKENIZER_DIR)]


LONG_TEXTS = {  # 20,000 characters each: words, and single words the whole prefix long
    "english": "The red fox runs by the river at night. " * 500, "spaces": " " * 20_000, "newlines": "\n" * 20_000,
    "one letter": "a" * 20_000, "digits": "1234567890" * 2_000, "chinese": "中文字符" * 5_000, "emoji": "😀" * 20_000,
    "equals signs": "=" * 20_000, "mixed": ("x = [1,  2]\n\t# 😀 déjà vu\n" * 800)[:20_000],
}


@pytest.mark.parametrize("name", LONG_TEXTS)
def test_a_long_text_is_truncated_as_if_tokenised_whole(tiny_model, name, monkeypatch):
    text = LONG_TEXTS[name]
    rows = [{"text": text}, {"prompt": text[:100], "completion": text[100:]}, {"prompt": text[:-50], "completion": text[-50:]},
            {"messages": [{"role": "user", "content": text[:300]}, {"role": "assistant", "content": text[300:]}]}]
    for tokenizer in tokenizers(tiny_model):
        for max_seq_len in (8, 16, 40):
            for row in rows:
                assert outcome(row, tokenizer, max_seq_len) == reference_example(row, tokenizer, max_seq_len)


@pytest.mark.parametrize("name", LONG_TEXTS)
def test_a_long_text_is_not_tokenised_whole(tiny_model, name, monkeypatch):
    """What is tokenised depends on --max-seq-len, not on the length of the line: a prefix of 64 characters per
    kept token, grown 4 times over while too few tokens fit in its first half (runs of spaces: 128 a token)."""
    from ortlora.runtime.data import PREFIX_CHARS_PER_TOKEN, PREFIX_GROWTH

    text = LONG_TEXTS[name] * 100  # 2,000,000 characters
    for tokenizer in tokenizers(tiny_model):
        for row in ({"text": text}, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": text}]}):
            lengths = []
            encode = tokenizer.encode_with_offsets
            monkeypatch.setattr(tokenizer, "encode_with_offsets", lambda t: lengths.append(len(t)) or encode(t))
            assert outcome(row, tokenizer, 40)[2]
            monkeypatch.undo()
            assert max(lengths) <= PREFIX_CHARS_PER_TOKEN * 41 * PREFIX_GROWTH ** 2  # 41,984


def test_text_under_the_bound_is_tokenised_whole(tokenizer, monkeypatch):
    from ortlora.runtime.data import PREFIX_CHARS_PER_TOKEN, encode_example

    text = "ab " * (2 * PREFIX_CHARS_PER_TOKEN * 9 // 3)  # twice the first prefix at max_seq_len 8
    lengths = []
    encode = tokenizer.encode_with_offsets
    monkeypatch.setattr(tokenizer, "encode_with_offsets", lambda t: lengths.append(len(t)) or encode(t))
    assert encode_example({"text": text}, tokenizer, 8)[1]
    assert lengths == [len(text)]


def test_a_truncated_conversation_renders_only_the_turns_it_keeps(tokenizer, monkeypatch):
    from ortlora.runtime.data import encode_example

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}] * 1000
    renders = []
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: renders.append(1) or render(*a, **k))
    example, truncated = encode_example({"messages": messages}, tokenizer, 32)
    assert truncated and len(example.input_ids) == 32
    assert len(renders) < 20  # the whole conversation once, then the few turns within 33 tokens (not 2 x 1000)
    monkeypatch.undo()
    assert reference_example({"messages": messages[:20]}, tokenizer, 32) == \
        (example.input_ids.tolist(), example.labels.tolist(), True)


def test_a_line_longer_than_the_cap_is_one_bad_line(tmp_path, tokenizer, monkeypatch):
    from ortlora.runtime import data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "data.jsonl"
    good = '{"text": "The cat sits by the lake."}\n'
    path.write_text(good + '{"text": "' + "x" * 5000 + '"}\n' + good + '{"text": "' + "y" * 990)
    with pytest.raises(OrtloraError, match=rf"^{path}:2: the line is 4.89 KiB long, more than the 1000 B a line may "
                                           r"hold; split the example"):
        data.load_jsonl(path, tokenizer, 64)
    examples, report = data.load_jsonl(path, tokenizer, 64, on_bad="skip")
    assert report.examples == 2 and [s.split(": ")[0] for s in report.skipped] == [f"{path}:2", f"{path}:4"]
    assert "not valid JSON" in report.skipped[1]  # 1,000 bytes, the cap, at the end without a newline: read


def test_a_long_line_is_read_a_block_at_a_time(tmp_path, monkeypatch):
    from ortlora.runtime import data

    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "data.jsonl"
    with path.open("wb") as f:
        f.write(b'{"text": "' + b"x" * (48 << 20) + b'"}\n{"text": "ok"}\n')
    reads = []
    real_open = Path.open

    class Counting:  # the file, its readline calls recorded
        def __init__(self, f):
            self.f = f

        def readline(self, size=-1):
            reads.append(size)
            return self.f.readline(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def counting_open(self, *args, **kwargs):
        return Counting(real_open(self, *args, **kwargs))

    monkeypatch.setattr(Path, "open", counting_open)
    lines = list(data.jsonl_lines(path))
    assert [n for n, _ in lines] == [1, 2] and lines[0][1].length == (48 << 20) + 12 and lines[1][1] == b'{"text": "ok"}\n'
    assert all(0 < n <= (1 << 20) + 1 for n in reads)


# --- Ctrl-C: one line, "interrupted", exit 130, whenever it comes


def start_command(entry: str, *args: str, cwd: Path, pythonpath: Path | None = None):
    """A console command as pip's wrapper script runs it: ``from ortlora._entry import train; sys.exit(train())``
    (``entry`` may also be ``_run('module')`` for a stand-in command)."""
    import os
    import subprocess
    import sys

    name = entry.split("(")[0]
    call = entry if "(" in entry else f"{entry}()"  # _run('module'): a stand-in command's main
    env = {**os.environ, "PYTHONPATH": str(pythonpath)} if pythonpath else None
    return subprocess.Popen([sys.executable, "-c", f"import sys; from ortlora._entry import {name}; sys.exit({call})", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


def interrupt(process, *delays: float) -> tuple[int, str, str]:
    import signal

    for delay in delays:
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return process.returncode, out, err


COMMANDS = {  # each fails fast with exit 2 (export --help: 0) once it has imported what it needs
    "build": ["--model", "no-such-model", "--out", "out"],
    "train": ["--artifacts", "no-such-artifacts", "--out", "run"],
    "export": ["--help"],
    "generate": ["--artifacts", "no-such-artifacts", "--prompt", "Hi"],
}


@pytest.fixture(scope="module")
def started() -> float:
    """Seconds until a command's handler is in place here: the interpreter's start-up and ortlora._entry's import
    (~30 ms on a quiet machine; a busy one takes longer, and a Ctrl-C before it is Python's own traceback)."""
    import subprocess
    import sys

    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import ortlora._entry"], check=True)
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_at_any_moment_of_a_command_is_one_line(tmp_path, command, started):
    """Ctrl-C 0.3 s and 1 s after the start (while modules are imported, or main runs), and twice in a row.
    Earlier it can come while the interpreter itself starts (its site module, ~30 ms here, before any code of
    the package runs), where Python prints its own traceback: the delays are at least 3 times that start-up as
    measured now. test_ctrl_c_while_a_module_imports covers the imports whatever the machine's speed."""
    first = max(0.3, 3 * started)
    for delays in ((first,), (first + 0.7,), (first, 0.01)):
        code, out, err = interrupt(start_command(command, *COMMANDS[command], cwd=tmp_path), *delays)
        assert "Traceback" not in err and "Exception ignored" not in err, (delays, err)
        assert (code, err) == (130, "interrupted\n") or code in (0, 2) and err.count("\n") <= 1, (delays, code, err)


@pytest.fixture()
def stand_ins(tmp_path) -> Path:
    """Commands whose timing a test controls: a slow import, a main that works until interrupted and then cleans
    up slowly, and a main that leaves a thread the interpreter waits for at shutdown."""
    (tmp_path / "slow_import.py").write_text("import time\nprint('importing', flush=True)\ntime.sleep(30)\n"
                                             "def main():\n    return 0\n")
    (tmp_path / "slow_cleanup.py").write_text(
        "import time\nfrom ortlora.errors import cli_entry\n@cli_entry\ndef main(argv=None):\n"
        "    print('working', flush=True)\n    try:\n        time.sleep(30)\n    finally:\n        time.sleep(30)\n")
    (tmp_path / "busy_thread.py").write_text(
        "import threading, time\ndef main():\n    threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "    print('done', flush=True)\n    return 0\n")
    return tmp_path


def interrupt_after_line(process, delays=(0.2,)) -> tuple[int, str, str]:
    """Ctrl-C once the stand-in has printed its line (so the test knows where it is)."""
    line = process.stdout.readline()
    code, out, err = interrupt(process, *delays)
    return code, line + out, err


def test_ctrl_c_while_a_module_imports(stand_ins):
    process = start_command("_run('slow_import')", cwd=stand_ins, pythonpath=stand_ins)
    assert interrupt_after_line(process) == (130, "importing\n", "interrupted\n")


def test_a_second_ctrl_c_does_not_wait_for_the_cleanup(stand_ins):
    """The first Ctrl-C interrupts main (its cleanup runs, as a finally block does); the second ends the process."""
    start = time.perf_counter()
    process = start_command("_run('slow_cleanup')", cwd=stand_ins, pythonpath=stand_ins)
    assert interrupt_after_line(process, (0.2, 0.3)) == (130, "working\n", "interrupted\n")
    assert time.perf_counter() - start < 20


def test_ctrl_c_while_the_interpreter_waits_for_threads(stand_ins):
    """main has returned and the interpreter joins a thread (threading._shutdown): Ctrl-C, even twice, ends it."""
    start = time.perf_counter()
    process = start_command("_run('busy_thread')", cwd=stand_ins, pythonpath=stand_ins)
    assert interrupt_after_line(process, (0.3, 0.01)) == (130, "done\n", "interrupted\n")
    assert time.perf_counter() - start < 20


def test_a_prompt_longer_than_the_context_is_refused_without_tokenising_it_whole(artifacts, monkeypatch):
    """ortlora-generate's prompt is tokenised a prefix at a time too: one of 4 MB costs what the context holds."""
    from ortlora.runtime.generate import Generator

    generator = Generator(artifacts)
    lengths = []
    encode = generator.tokenizer.encode_with_offsets
    monkeypatch.setattr(generator.tokenizer, "encode_with_offsets", lambda t: lengths.append(len(t)) or encode(t))
    with pytest.raises(OrtloraError, match=r"^the prompt is more than [\d,]+ tokens, all the model takes"):
        generator.prompt("Once upon a time " * 250_000)
    assert max(lengths) < 4_250_000 // 8
    assert generator.prompt("Once upon a time") == encode("Once upon a time")[0]


def test_a_huge_layer_range_is_refused_before_it_is_made():
    from ortlora.lora_config import parse_layers

    start = time.perf_counter()
    with pytest.raises(OrtloraError, match=r"layer 24 is out of range; the model has 24 layers"):
        parse_layers("0-2000000000", 24)
    with pytest.raises(OrtloraError, match=r"layer 30 is out of range"):
        parse_layers("30-4000000000", 24)
    assert time.perf_counter() - start < 1
    assert parse_layers("0,1,5-7", 24) == [0, 1, 5, 6, 7]
