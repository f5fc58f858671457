"""Bad input of every kind ends in one line naming the file (and line) and what is wrong, never in a
traceback or a silent wrong result; paths read from files stay inside their directory.

Each case corrupts a copy of the session's tiny artifacts (or checkpoint), runs the command's entry
point and checks the exit code and that stderr is exactly one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from safetensors.numpy import load_file, save_file

from ortlora.build import cli as build_cli
from ortlora.build.model_dir import REQUIRED_SIZES
from ortlora.build.tiny import QWEN25_TOKENIZER_DIR
from ortlora.errors import OrtloraError
from ortlora.handoff import cli as export_cli
from ortlora.manifest import Manifest
from ortlora.onnx_files import Malformed, external_data_locations, read_external_data_locations
from ortlora.runtime import cli as train_cli
from ortlora.runtime import generate_cli
from ortlora.runtime.backend import has_training_api
from ortlora.runtime.checkpoint import load_resume_state
from ortlora.runtime.data import IGNORE_INDEX, encode_example, load_jsonl
from ortlora.runtime.generate import Generator, Sampling
from ortlora.runtime.optim import AdamW, AdamWConfig, state_problems
from ortlora.runtime.tokenizer import Tokenizer
from tests.cli_helpers import one_line

FAST = ["--no-progress", "--no-plot", "--batch-size", "4", "--max-steps", "1"]
needs_training_api = pytest.mark.skipif(not has_training_api(), reason="needs onnxruntime-training")


def train(artifacts: Path, tmp_path: Path, *extra: str) -> int:
    return train_cli.main(["--artifacts", str(artifacts), "--out", str(tmp_path / "run"), *FAST, *extra])


def generate(artifacts: Path, *extra: str) -> int:
    return generate_cli.main(["--artifacts", str(artifacts), *extra])


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# -- A. data files ---------------------------------------------------------------------------------

BAD_LINES = {
    "not UTF-8": (b'{"text": "caf\xe9"}', "not UTF-8 text"),
    "nested deeply": (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON nested too deeply to read"),
    "a JSON array": (b'[{"text": "a"}, {"text": "b"}]', "expected JSON Lines, one object per line, not an array"),
    "a string": (b'"just text"', "expected JSON Lines, one object per line, not a string"),
    "a huge integer": (b'{"text": "a", "n": ' + b"1" * 5000 + b"}", "not usable JSON"),
    "content not a string": (b'{"messages": [{"role": "user", "content": 5}]}', "message 0 needs a string 'content'"),
    "role not a string": (b'{"messages": [{"role": ["user"], "content": "hi"}]}', "message 0 needs a string 'role'"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_bad_data_line_names_file_and_line_and_can_be_skipped(artifacts, tmp_path, capsys, case):
    line, message = BAD_LINES[case]
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"text": "The cat sits."}\n' + line + b'\n{"text": "The dog runs."}\n')
    err = one_line(capsys, train(artifacts, tmp_path, "--data", str(data)))
    assert f"d.jsonl:2: {message}" in err and "--on-bad-data skip" in err
    assert train(artifacts, tmp_path, "--data", str(data), "--on-bad-data", "skip", "--overwrite") == 0
    assert "1 bad lines skipped" in capsys.readouterr().out


def test_a_json_lines_file_that_is_one_json_array_says_json_lines(artifacts, tmp_path, capsys):
    """A .jsonl file holding one JSON list is refused; named .json, the same list is data (test_data_formats.py)."""
    data = tmp_path / "d.jsonl"
    data.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n]\n')
    err = one_line(capsys, train(artifacts, tmp_path, "--data", str(data)))
    assert "d.jsonl:1: not valid JSON" in err and "expected JSON Lines, one object per line" in err


def test_a_conversation_opening_with_the_assistant_trains_that_turn_with_qwen25s_template(tmp_path):
    """Qwen2.5's template reads messages[0], so the prompt before a first assistant turn cannot be rendered."""
    from transformers import AutoTokenizer

    tokenizer = Tokenizer(QWEN25_TOKENIZER_DIR)
    messages = [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}]
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    (example,), report = load_jsonl(data, tokenizer, 256)
    trained = tokenizer.decode(example.labels[example.labels != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "Hello! How can I help?<|im_end|>\nBlue.<|im_end|>\n" and not report.skipped
    full = tokenizer.decode(np.append(example.input_ids, example.labels[-1]), skip_special_tokens=False)
    reference = AutoTokenizer.from_pretrained(QWEN25_TOKENIZER_DIR).apply_chat_template(messages, tokenize=False)
    assert full == reference  # the whole conversation, default system prompt included, as transformers renders it
    later, _ = encode_example({"messages": messages[1:]}, tokenizer, 256)  # the ordinary path agrees
    assert tokenizer.decode(later.labels[later.labels != IGNORE_INDEX], skip_special_tokens=False) == "Blue.<|im_end|>\n"


FAILING_TEMPLATES = {
    "raise_exception": ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
    "undefined": ("{{ messages[7].content.upper() }}", "UndefinedError"),
    "type error": ("{{ messages[0].content + 1 }}", "TypeError"),
    "sandbox": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
}


@pytest.mark.parametrize("case", sorted(FAILING_TEMPLATES))
def test_a_failing_chat_template_is_a_bad_line(copy, tmp_path, capsys, case):
    template, message = FAILING_TEMPLATES[case]
    (copy / "chat_template.jinja").write_text(template)
    err = one_line(capsys, train(copy, tmp_path, "--data", "builtin:chat"))
    assert "chat_train.jsonl:1: the chat template failed on these messages" in err and message in err
    assert train(copy, tmp_path, "--data", "builtin:chat", "--on-bad-data", "skip", "--overwrite") == 2
    assert "has no usable examples (200 bad lines)" in one_line(capsys, 2)


def _template_in_config_only(artifacts: Path) -> None:
    """Artifacts whose chat template is tokenizer_config.json's (as older models ship it)."""
    (artifacts / "chat_template.jinja").unlink()
    edit_json(artifacts / "ortlora.json", lambda d: d["files"]["tokenizer"].remove("chat_template.jinja"))


@pytest.mark.parametrize("holder", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_chat_template_syntax_error_names_the_file_and_line(copy, tmp_path, capsys, holder):
    template = "{% for m in messages %}\n{{ m.content }\n{% endfor %}"
    if holder == "chat_template.jinja":
        (copy / holder).write_text(template)
    else:
        _template_in_config_only(copy)
        edit_json(copy / holder, lambda c: c.update(chat_template=template))
    err = one_line(capsys, train(copy, tmp_path, "--data", "builtin:chat", "--on-bad-data", "skip"))
    assert f"{copy / holder}" in err and "line 2: the chat template has a syntax error" in err


@pytest.mark.parametrize("messages, message", [
    ('[{"role": "user", "content": 5}]', "message 0 needs a string 'content', not a number"),
    ('[{"role": null, "content": "hi"}]', "message 0 needs a string 'role', not null"),
    ('[{"role": "user", "content": "hi"}, "hi"]', "message 1 is a string, not an object"),
    ('{"role": "user", "content": "hi"}', "'messages' must be a non-empty list"),
    ("[]", "'messages' must be a non-empty list"),
])
def test_generate_messages_are_checked_as_data_lines_are(artifacts, capsys, messages, message):
    err = one_line(capsys, generate(artifacts, "--messages", messages))
    assert f"--messages: {message}" in err


# -- B. files in the artifacts and checkpoints -------------------------------------------------------

MANIFESTS = {
    "array": (lambda p: p.write_text("[1, 2]"), "holds an array, expected a JSON object"),
    "not UTF-8": (lambda p: p.write_bytes(b'{"format": 1, "x": "\xff"}'), "is not UTF-8 text"),
    "not JSON": (lambda p: p.write_text('{"format": 1'), "is not valid JSON"),
    "missing keys": (lambda p: edit_json(p, lambda d: [d.pop("parameters"), d["files"].pop("checkpoint")]),
                     "parameters is missing; files.checkpoint is missing"),
    "wrong types": (lambda p: edit_json(p, lambda d: [d["lora"].update(rank="8"), d["parameters"][0].update(shape=[8, None])]),
                    "lora.rank must be an integer, not a string; parameters[0].shape[1] must be an integer, not null"),
    "frozen layout": (lambda p: edit_json(p, lambda d: next(iter(d["frozen"].values())).update(length=3)),
                      "bytes long, its dtype and shape need"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_a_damaged_manifest_is_one_line(copy, tmp_path, capsys, case):
    damage, message = MANIFESTS[case]
    damage(copy / "ortlora.json")
    err = one_line(capsys, train(copy, tmp_path))
    assert str(copy / "ortlora.json") in err and message in err and "rebuild the artifacts" in err


@pytest.mark.parametrize("size", [0, 1000])
@pytest.mark.parametrize("backend", ["ort-training", "ort-session"])
def test_a_truncated_frozen_weights_file_is_one_line(copy, tmp_path, capsys, size, backend):
    if backend == "ort-training" and not has_training_api():
        pytest.skip("needs onnxruntime-training")
    with open(copy / "frozen_weights.bin", "r+b") as f:
        f.truncate(size)
    err = one_line(capsys, train(copy, tmp_path, "--backend", backend))
    assert f"frozen_weights.bin is {size:,} bytes, the manifest's layout needs" in err


def _truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[64:192] = bytes(128)  # zeros: protobuf field 0 and a checkpoint that fails verification
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate_half, _garble, _empty])
@pytest.mark.parametrize("role, command", [
    pytest.param("training_model", "ort-training", marks=needs_training_api),
    pytest.param("checkpoint", "ort-training", marks=needs_training_api),
    ("portable_training_cpu_model", "ort-session"),  # the portable graph the CPU provider runs
    ("decoder_model", "generate"),
])
def test_a_damaged_onnx_file_or_checkpoint_is_one_line(copy, tmp_path, capsys, damage, role, command):
    path = copy / Manifest.load(copy).files[role]
    damage(path)
    code = generate(copy, "--prompt", "hi") if command == "generate" else train(copy, tmp_path, "--backend", command)
    err = one_line(capsys, code)
    assert str(path) in err and "rebuild the artifacts" in err


TOKENIZER_FILES = {
    "tokenizer.json invalid": ("tokenizer.json", b'{"model": ', "is not a tokenizer the tokenizers library can read"),
    "tokenizer_config.json not UTF-8": ("tokenizer_config.json", b'{"eos_token": "\xff"}', "is not UTF-8 text"),
    "tokenizer_config.json invalid": ("tokenizer_config.json", b'{"eos_token": ', "is not valid JSON"),
    "tokenizer_config.json an array": ("tokenizer_config.json", b"[]", "holds an array, expected a JSON object"),
    "tokenizer_config.json wrong type": ("tokenizer_config.json", b'{"eos_token": 5}', "eos_token must be a string"),
    "chat template wrong type": ("tokenizer_config.json", b'{"chat_template": {"a": 1}}', "chat_template must be a string"),
    "chat_template.jinja not UTF-8": ("chat_template.jinja", b"{{ '\xff' }}", "is not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_FILES))
def test_damaged_tokenizer_files_are_one_line(copy, tmp_path, capsys, case):
    name, content, message = TOKENIZER_FILES[case]
    if b"chat_template" in content:  # a template in chat_template.jinja would win
        _template_in_config_only(copy)
    (copy / name).write_bytes(content)
    err = one_line(capsys, train(copy, tmp_path, "--data", "builtin:chat"))
    assert str(copy / name) in err and message in err


@pytest.fixture
def checkpoint(trained_adapter, tmp_path) -> Path:
    """A copy of a resumable checkpoint (adapter, optimizer and trainer state) that a test may damage."""
    return Path(shutil.copytree(trained_adapter, tmp_path / "checkpoint-5"))


def _nan_weights(path: Path) -> None:
    save_file({name: value * np.nan for name, value in load_file(path).items()}, path)


CHECKPOINT_FILES = {
    "adapter weights truncated": ("adapter_model.safetensors", _truncate_half, "--init-adapter",
                                  "is not a readable safetensors file"),
    "adapter weights NaN": ("adapter_model.safetensors", _nan_weights, "--init-adapter", "holds NaN or infinite values"),
    "adapter config not JSON": ("adapter_config.json", lambda p: p.write_text("{r: 8"), "--init-adapter", "is not valid JSON"),
    "adapter config wrong types": ("adapter_config.json", lambda p: p.write_text('{"r": "8", "lora_alpha": true}'),
                                   "--init-adapter", "r is '8', the artifacts have 8; lora_alpha is True, the artifacts have 16.0"),
    "rsLoRA adapter": ("adapter_config.json", lambda p: edit_json(p, lambda c: c.update(use_rslora=True)), "--init-adapter",
                       "use_rslora is set"),
    "optimizer truncated": ("optimizer.safetensors", _truncate_half, "--resume", "is not a readable safetensors file"),
    "trainer state not JSON": ("trainer_state.json", lambda p: p.write_text("{"), "--resume", ""),
    "trainer state position": ("trainer_state.json", lambda p: edit_json(p, lambda s: s["position"].update(extra=1)),
                               "--resume", "has no valid position"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_FILES))
def test_damaged_checkpoint_files_are_one_line(artifacts, checkpoint, tmp_path, capsys, case):
    name, damage, option, message = CHECKPOINT_FILES[case]
    damage(checkpoint / name)
    err = one_line(capsys, train(artifacts, tmp_path, option, str(checkpoint), "--max-steps", "8"))
    assert str(checkpoint / name) in err or f"adapter {checkpoint}" in err
    assert message in err


def test_an_optimizer_state_of_other_parameters_is_refused_not_reset(artifacts, checkpoint):
    """AdamW built its moments from whatever keys were there: renamed or reshaped ones restarted from zero."""
    manifest = Manifest.load(artifacts)
    state = load_file(checkpoint / "optimizer.safetensors")
    first, second = manifest.parameters[0].onnx_name, manifest.parameters[1].onnx_name
    state[f"exp_avg.renamed.{first}"] = state.pop(f"exp_avg.{first}")
    state[f"exp_avg_sq.{second}"] = state[f"exp_avg_sq.{second}"][:2]
    save_file(state, checkpoint / "optimizer.safetensors")
    with pytest.raises(OrtloraError) as error:
        load_resume_state(checkpoint, manifest)
    message = str(error.value)
    assert str(checkpoint / "optimizer.safetensors") in message and "does not match the artifacts" in message
    assert f"missing exp_avg.{first}" in message and f"unexpected exp_avg.renamed.{first}" in message
    assert f"exp_avg_sq.{second} has shape (2, 8), expected {manifest.parameters[1].shape}" in message


def test_optimizer_state_problems_are_all_listed():
    shapes = {"a": (2, 3), "b": (4,)}
    optimizer = AdamW(AdamWConfig())
    ones = {name: np.ones(shape, np.float32) for name, shape in shapes.items()}
    optimizer.step(ones, dict(ones), 0.1)
    state = optimizer.state_dict()
    assert state_problems(state, shapes) == []
    del state["step"], state["exp_avg.b"]
    state["exp_avg_sq.a"] = -state["exp_avg_sq.a"]
    assert state_problems(state, shapes) == ["missing step", "missing exp_avg.b", "exp_avg_sq.a has negative values"]


@pytest.fixture
def model_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


MODEL_DIRS = {
    **{f"no {key}": (lambda d, k=key: edit_json(d / "config.json", lambda c: c.pop(k)), f"{key} is missing")
       for key in REQUIRED_SIZES},
    "a size as text": (lambda d: edit_json(d / "config.json", lambda c: c.update(hidden_size="64")), "hidden_size is a string"),
    "config not UTF-8": (lambda d: (d / "config.json").write_bytes(b'{"model_type": "qwen2\xff"}'), "is not UTF-8 text"),
    "empty weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "is not a readable safetensors file"),
    "truncated weights": (lambda d: _truncate_half(d / "model.safetensors"), "is not a readable safetensors file"),
    "not safetensors": (lambda d: (d / "model.safetensors").write_text("hello"), "is not a readable safetensors file"),
    "only pytorch_model.bin": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
                               "has no *.safetensors weights (it has pytorch_model.bin"),
    "other tensors": (lambda d: save_file({"x": np.zeros(2, np.float32)}, d / "model.safetensors"),
                      "do not fit its config.json (a 2-layer Qwen2 / Qwen2.5 of hidden size 64): missing model.embed_tokens.weight"),
    "more layers than weights": (lambda d: edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=3)),
                                 "missing model.layers.2.input_layernorm.weight"),
    "untied head without weights": (lambda d: edit_json(d / "config.json", lambda c: c.update(tie_word_embeddings=False)),
                                    "missing lm_head.weight"),
}


@pytest.mark.parametrize("case", sorted(MODEL_DIRS))
def test_a_broken_model_directory_is_refused_before_transformers_loads_it(model_copy, tmp_path, capsys, case):
    damage, message = MODEL_DIRS[case]
    damage(model_copy)
    err = one_line(capsys, build_cli.main(["--model", str(model_copy), "--out", str(tmp_path / "out")]))
    assert str(model_copy) in err and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan"), ("--repetition-penalty", "nan"),
    ("--repetition-penalty", "inf"), ("--top-p", "-inf"),
])
def test_generate_refuses_non_finite_sampling_settings(artifacts, capsys, option, value):
    err = one_line(capsys, generate(artifacts, "--prompt", "hi", f"{option}={value}"))
    assert "all finite" in err


def test_generation_stays_within_the_models_context(artifacts, capsys):
    generator = Generator(artifacts)
    assert generator.context == 512  # the tiny model's max_position_embeddings
    err = one_line(capsys, generate(artifacts, "--prompt", "hello world " * 2000))
    assert "the prompt is 10,001 tokens and the model takes 512 in all (max_position_embeddings)" in err
    prompt = generator.prompt("hello world " * 101)  # 506 tokens: room for 6 more
    generator.eos_ids = set()  # only the context stops it
    result = generator.generate(prompt, Sampling(max_new_tokens=100))
    assert len(result.tokens) == 512 - len(prompt) and result.stop_reason == "context length"
    assert generate(artifacts, "--prompt", "hello world " * 101, "--max-new-tokens", "100") == 0
    assert "stopped by context length]" in capsys.readouterr().err


def test_generate_needs_the_models_context_length(copy, capsys):
    edit_json(copy / "config.json", lambda c: c.pop("max_position_embeddings"))
    err = one_line(capsys, generate(copy, "--prompt", "hi"))
    assert f"{copy / 'config.json'}: max_position_embeddings must be a positive integer, not None" in err


# -- C. unexpected exceptions ------------------------------------------------------------------------

def _explode(*args, **kwargs):
    raise ValueError("boom\non two lines")


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback(artifacts, capsys, monkeypatch):
    monkeypatch.setattr(generate_cli, "Generator", _explode)
    err = one_line(capsys, generate(artifacts, "--prompt", "hi"), expected=1)
    assert err == ("error: unexpected ValueError: boom on two lines "
                   "(run again with --debug or ORTLORA_DEBUG=1 for the traceback)\n")
    assert generate(artifacts, "--prompt", "hi", "--debug") == 1
    assert "Traceback" in (err := capsys.readouterr().err) and "ValueError: boom" in err
    monkeypatch.setenv("ORTLORA_DEBUG", "1")
    assert generate(artifacts, "--prompt", "hi") == 1
    assert "Traceback" in capsys.readouterr().err


def test_generate_options_are_not_abbreviated_and_say_their_defaults(capsys):
    with pytest.raises(SystemExit):
        generate_cli.parse_args(["--help"])
    assert "(default: 128;" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        generate_cli.parse_args(["--prompt", "hi", "--max-new", "3"])


# -- D. paths read from files ------------------------------------------------------------------------

def _escape_by_link(artifacts: Path) -> None:
    (artifacts / "config.json").unlink()
    (artifacts / "config.json").symlink_to(artifacts.parent / "outside.json")
    (artifacts.parent / "outside.json").write_text("{}")


MANIFEST_PATHS = {
    "absolute file": (lambda a: edit_json(a / "ortlora.json", lambda d: d["files"].update(config="/etc/hostname")),
                      "names '/etc/hostname', which is not a relative path inside"),
    "dot-dot tokenizer file": (lambda a: edit_json(a / "ortlora.json",
                                                   lambda d: d["files"]["tokenizer"].append("../outside.json")),
                               "names '../outside.json', which is not a relative path inside"),
    "symbolic link out": (_escape_by_link, "names 'config.json', which leads outside"),
    "relative source out": (lambda a: edit_json(a / "ortlora.json", lambda d: d["model"].update(source="base_model/../..")),
                            "(model.source) names 'base_model/../..'"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_PATHS))
@pytest.mark.parametrize("command", ["train", "export"])
def test_manifest_paths_stay_inside_the_artifacts(copy, trained_adapter, tmp_path, capsys, case, command):
    damage, message = MANIFEST_PATHS[case]
    damage(copy)
    if command == "train":
        code = train(copy, tmp_path)
    else:  # ortlora-export copies the files the manifest's "tokenizer" list names
        code = export_cli.main(["--artifacts", str(copy), "--adapter", str(trained_adapter), "--to", "merged",
                                "--out", str(tmp_path / "merged")])
    err = one_line(capsys, code)
    assert f"{copy / 'ortlora.json'}" in err and message in err
    assert not (tmp_path / "merged").exists()


def test_an_absolute_model_source_is_allowed(copy):
    edit_json(copy / "ortlora.json", lambda d: d["model"].update(source=str(copy / "base_model")))
    assert Manifest.load(copy).base_model_dir(copy) == copy / "base_model"


def _relocate(path: Path, location: str) -> None:
    """Point every external-data location of an ONNX file at ``location``."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


@pytest.mark.parametrize("location, message", [
    ("/etc/hostname", "names '/etc/hostname', which is not a relative path inside"),
    ("../frozen_weights.bin", "names '../frozen_weights.bin', which is not a relative path inside"),
    ("sub/../frozen_weights.bin", "which is not a relative path inside"),
    ("link.bin", "names 'link.bin', which leads outside"),
    ("nothere.bin", "names 'nothere.bin', which is not there"),
])
@pytest.mark.parametrize("role, command", [
    pytest.param("training_model", "ort-training", marks=needs_training_api),
    pytest.param("eval_model", "ort-training", marks=needs_training_api),
    ("portable_training_cpu_model", "ort-session"),  # the portable graph the CPU provider runs
    ("decoder_model", "generate"),
])
def test_onnx_external_data_stays_inside_the_artifacts(copy, tmp_path, capsys, location, message, role, command):
    (tmp_path / "secret.bin").write_bytes(bytes(1 << 20))
    (copy / "link.bin").symlink_to(tmp_path / "secret.bin")
    path = copy / Manifest.load(copy).files[role]
    _relocate(path, location)
    code = generate(copy, "--prompt", "hi") if command == "generate" else train(copy, tmp_path, "--backend", command)
    err = one_line(capsys, code)
    assert f"{path} (external data)" in err and message in err


def test_the_portable_eval_graph_is_checked_when_it_is_opened(copy, tmp_path, capsys):
    _relocate(copy / "portable_eval.onnx", "/etc/hostname")
    err = one_line(capsys, train(copy, tmp_path, "--backend", "ort-session", "--eval-split", "0.5"))
    assert "portable_eval.onnx (external data) names '/etc/hostname'" in err


def _external(name: str, location: str) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "8")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _model_with_external_data_everywhere() -> onnx.ModelProto:
    """External data in every place ONNX allows a tensor, and decoys: "location" in a doc string and in raw data."""
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    then = helper.make_graph([helper.make_node("Identity", ["w_then"], ["y"])], "then", [], [out],
                             initializer=[_external("w_then", "subgraph.bin")])
    otherwise = helper.make_graph([helper.make_node("Constant", [], ["y"], value=_external("c_else", "subgraph-constant.bin"))],
                                  "else", [], [out])
    index = helper.make_tensor("i", TensorProto.INT64, [1], [0])
    sparse = helper.make_sparse_tensor(_external("sv", "sparse-values.bin"), index, [4])
    sparse_attr = helper.make_sparse_tensor(_external("sa", "sparse-attribute.bin"), index, [4])
    decoy = helper.make_tensor("decoy", TensorProto.UINT8, [14], b"\x0a\x08location\x12\x02no", raw=True)
    nodes = [
        helper.make_node("Constant", [], ["c"], value=_external("c", "constant.bin"), doc_string="location: nowhere"),
        helper.make_node("Constant", [], ["cs"], sparse_value=sparse_attr),
        helper.make_node("Custom", [], ["t"], domain="test",
                         tensors=[_external("t1", "tensors-1.bin"), _external("t2", "tensors-2.bin")]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=otherwise),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [out],
                              initializer=[_external("w", "initializer.bin"), decoy], sparse_initializer=[sparse])
    constant = helper.make_node("Constant", [], ["y"], value=_external("fc", "function.bin"))
    function = helper.make_function("test", "f", [], ["y"], [constant], [helper.make_opsetid("", 17)])
    return helper.make_model(graph, functions=[function])


EVERY_PLACE = ["constant.bin", "function.bin", "initializer.bin", "sparse-attribute.bin", "sparse-values.bin",
               "subgraph-constant.bin", "subgraph.bin", "tensors-1.bin", "tensors-2.bin"]


def test_the_walker_finds_external_data_in_every_place_onnx_allows():
    data = _model_with_external_data_everywhere().SerializeToString()
    assert sorted(external_data_locations(data)) == EVERY_PLACE
    assert external_data_locations(onnx.ModelProto(ir_version=10).SerializeToString()) == []
    with pytest.raises(Malformed):
        external_data_locations(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["training_model.onnx", "eval_model.onnx", "portable_training.onnx", "portable_eval.onnx",
                                  "inference_model.onnx", "decoder_model.onnx", "optimizer_model.onnx"])
def test_the_walker_agrees_with_onnx_on_the_artifacts(artifacts, name):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    model = onnx.load(str(artifacts / name), load_external_data=False)
    expected = [entry.value for tensor in _get_all_tensors(model) if uses_external_data(tensor)
                for entry in tensor.external_data if entry.key == "location"]
    assert sorted(read_external_data_locations(artifacts / name)) == sorted(expected)


def test_jinja2_is_a_release_whose_sandbox_holds():
    from importlib.metadata import version

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"jinja2>=3.1.6"' in pyproject
    assert tuple(int(p) for p in version("jinja2").split(".")[:3]) >= (3, 1, 6)
    os.environ["ORTLORA_TEST_SECRET"] = "leaked"
    try:  # 3.1.5 let |attr('format') reach str.format, and through it os.environ
        tokenizer = Tokenizer.__new__(Tokenizer)
        tokenizer.chat_template, tokenizer.template_source = (
            "{{ ('{0.__init__.__globals__[os].environ[ORTLORA_TEST_SECRET]}' | attr('format'))(raise_exception) }}",
            "test")
        tokenizer.eos_token = tokenizer.pad_token = "<eos>"
        with pytest.raises(OrtloraError) as error:
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        assert "leaked" not in str(error.value) and "SecurityError" in str(error.value)
    finally:
        del os.environ["ORTLORA_TEST_SECRET"]
