"""ortlora-export --to onnx-adapter / genai: ONNX Runtime's adapter format and an onnxruntime-genai folder.

The export runs here (onnxruntime-training 1.19.2, which has no AdapterFormat); the files are used where
they are meant to be: ONNX Runtime 1.32's LoraAdapter in .venv-ort, onnxruntime-genai in .venv-genai.
References: the same weights fed to the graphs as inputs, ortlora-generate, and transformers + PEFT.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ortlora.build.builder import BuildOptions, build
from ortlora.handoff import cli as export_cli
from ortlora.handoff.onnx_adapter import ADAPTER_FILE, adapter_bytes, model_version
from ortlora.manifest import MANIFEST_NAME, Manifest
from ortlora.runtime.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, load_adapter
from ortlora.runtime.generate import Generator, Sampling
from tests.environments import needs, run_in
from tests.reference import peft_model, random_weights, rel_err

NEW_TOKENS = 16
TOL = 1e-4
IDS = [5, 17, 42, 99, 3, 250, 7, 64]
MESSAGES = [{"role": "user", "content": "What is 2 plus 3?"}]


def export(artifacts: Path, adapter: Path, to: str, out: Path) -> Path:
    assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(adapter), "--to", to, "--out", str(out)]) == 0
    return out


def save_adapter(manifest: Manifest, weights: dict[str, np.ndarray], out: Path) -> Path:
    """``weights`` (by ONNX name) as a PEFT adapter directory, as PEFT saves one."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({p.peft_name: weights[p.onnx_name] for p in manifest.parameters}, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(manifest, "")))
    return out


@pytest.fixture(scope="module")
def other_adapter(artifacts, tmp_path_factory) -> Path:
    """A second adapter with other weights (random, larger than the trained one's)."""
    manifest = Manifest.load(artifacts)
    return save_adapter(manifest, random_weights(manifest, seed=11, scale=0.5), tmp_path_factory.mktemp("other-adapter"))


@pytest.fixture(scope="module")
def qwen3_other_adapter(qwen3_handoff, tmp_path_factory) -> Path:
    """``other_adapter`` for the tiny Qwen3 of ``qwen3_handoff``."""
    manifest = Manifest.load(qwen3_handoff[1])
    return save_adapter(manifest, random_weights(manifest, seed=11, scale=0.5), tmp_path_factory.mktemp("other-adapter"))


@pytest.fixture(scope="module")
def artifacts_dora(tmp_path_factory, tiny_model) -> Path:
    """DoRA: the build makes each module's magnitude vector a graph input too, so the adapter file holds it."""
    out = tmp_path_factory.mktemp("artifacts") / "dora"
    build(BuildOptions(model_dir=tiny_model, out_dir=out, bundle_base=True, dora=True), echo=lambda *a, **k: None)
    return out


def test_adapter_file_holds_the_weights_under_the_graph_input_names(artifacts, trained_adapter, tmp_path):
    manifest = Manifest.load(artifacts)
    out = export(artifacts, trained_adapter, "onnx-adapter", tmp_path / "adapter")
    data = (out / ADAPTER_FILE).read_bytes()
    assert data[4:8] == b"TORT"  # the flatbuffer's file identifier, what ONNX Runtime checks first
    weights = load_adapter(trained_adapter, manifest)
    # Every tensor's bytes are in the file, 8-aligned (the schema's force_align on raw_data).
    for name, tensor in weights.items():
        at = data.find(tensor.tobytes())
        assert at > 0 and at % 8 == 0, name
        assert name.encode() in data
    assert {p.onnx_name for p in manifest.parameters} <= set(manifest.io["decoder"]["inputs"])
    assert json.loads((out / "ortlora-export.json").read_text())["to"] == "onnx-adapter"


def onnxruntime_runs(artifacts: Path, adapters: dict[str, Path], tmp_path: Path) -> tuple[dict, dict]:
    """Export each adapter --to onnx-adapter here, then in ONNX Runtime 1.32 (.venv-ort): read each file back
    with AdapterFormat, and run the inference and decoder graphs on one prompt with no adapter, with each
    adapter through RunOptions.add_active_adapter (switched back and forth in one session), and with each
    adapter's weights fed directly as inputs. Returns (facts, logits by "graph/how")."""
    manifest = Manifest.load(artifacts)
    files = {k: str(export(artifacts, a, "onnx-adapter", tmp_path / k) / ADAPTER_FILE) for k, a in adapters.items()}
    stored, logits = tmp_path / "weights.npz", tmp_path / "logits.npz"
    np.savez(stored, **{f"{k}/{n}": v for k, a in adapters.items() for n, v in load_adapter(a, manifest).items()})
    facts = run_in("plain-ort", f"""
        import json, numpy as np, onnxruntime as ort
        artifacts, files = {str(artifacts)!r}, {files!r}
        stored = np.load({str(stored)!r})
        weights = {{k: {{n.split("/", 1)[1]: stored[n] for n in stored.files if n.startswith(k + "/")}} for k in files}}
        facts, logits = {{"version": ort.__version__, "read_back": {{}}, "model_version": {{}}}}, {{}}
        adapters = {{}}
        for key, path in files.items():
            f = ort.AdapterFormat.read_adapter(path)
            params = {{n: v.numpy() for n, v in f.get_parameters().items()}}
            facts["read_back"][key] = (sorted(params) == sorted(weights[key])
                                       and all(np.array_equal(params[n], weights[key][n]) for n in params))
            facts["model_version"][key] = f.get_model_version()
            adapters[key] = ort.LoraAdapter()
            adapters[key].Load(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        ids = np.array([{IDS!r}], np.int64)
        for graph in ("inference", "decoder"):
            session = ort.InferenceSession(f"{{artifacts}}/{{graph}}_model.onnx", options, providers=["CPUExecutionProvider"])
            feeds = {{"input_ids": ids, "attention_mask": np.ones_like(ids)}}
            feeds.update({{i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
                           for i in session.get_inputs() if i.name.startswith("past.")}})
            def run(adapter=None, direct=None):
                run_options = ort.RunOptions()
                if adapter:
                    run_options.add_active_adapter(adapters[adapter])
                return session.run(["logits"], {{**feeds, **(direct or {{}})}}, run_options)[0]
            logits[f"{{graph}}/none"] = run()
            for round in (1, 2):  # every adapter, then every adapter again, in one session
                for key in files:
                    logits[f"{{graph}}/{{key}}/active{{round}}"] = run(key)
                logits[f"{{graph}}/none{{round}}"] = run()
            for key in files:
                logits[f"{{graph}}/{{key}}/direct"] = run(direct=weights[key])
        np.savez({str(logits)!r}, **logits)
        print(json.dumps(facts))
    """)
    assert tuple(int(x) for x in facts["version"].split(".")[:2]) >= (1, 20)  # LoraAdapter is 1.20+
    assert facts["read_back"] == {k: True for k in adapters}
    assert set(facts["model_version"].values()) == {model_version(manifest)}
    with np.load(logits) as data:
        return facts, dict(data)


def check_logits(artifacts: Path, adapters: dict[str, Path], logits: dict) -> None:
    """With the adapter active, each graph gives the logits of its weights fed directly (the same run, so
    1e-6) and of transformers + PEFT (1e-4, as tests/test_generate.py); with none, the base model's."""
    from transformers import AutoModelForCausalLM

    manifest = Manifest.load(artifacts)
    ids = torch.tensor([IDS])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(artifacts / "base_model", dtype=torch.float32).eval()
        reference = {"none": base(input_ids=ids).logits.numpy()}
        for key, adapter in adapters.items():
            reference[key] = peft_model(artifacts, load_adapter(adapter, manifest))(input_ids=ids).logits.numpy()
    for graph in ("inference", "decoder"):
        for round in ("", "1", "2"):
            assert rel_err(logits[f"{graph}/none{round}"], reference["none"]) < TOL, (graph, round)
        for key in adapters:
            for round in (1, 2):
                assert rel_err(logits[f"{graph}/{key}/active{round}"], logits[f"{graph}/{key}/direct"]) < 1e-6, (graph, key)
            assert rel_err(logits[f"{graph}/{key}/active1"], reference[key]) < TOL, (graph, key)
            assert rel_err(reference[key], reference["none"]) > 1e-3, key  # the adapter changes the logits
    if len(adapters) > 1:
        first, second = (reference[k] for k in adapters)
        assert rel_err(first, second) > 1e-3


@needs("plain-ort")
def test_onnxruntime_feeds_the_file_as_the_graph_inputs(artifacts, trained_adapter, other_adapter, tmp_path):
    adapters = {"trained": trained_adapter, "other": other_adapter}
    _, logits = onnxruntime_runs(artifacts, adapters, tmp_path)
    check_logits(artifacts, adapters, logits)


@needs("plain-ort")
def test_onnxruntime_feeds_the_file_as_the_graph_inputs_of_qwen3(qwen3_handoff, qwen3_other_adapter, tmp_path):
    """The same for Qwen3 (per-head q_norm / k_norm in the graphs, heads 32 wide in a hidden size of 64)."""
    _, artifacts, trained = qwen3_handoff
    adapters = {"trained": trained, "other": qwen3_other_adapter}
    _, logits = onnxruntime_runs(artifacts, adapters, tmp_path)
    check_logits(artifacts, adapters, logits)


@needs("plain-ort")
def test_dora_magnitudes_travel_in_the_file_too(artifacts_dora, tmp_path):
    manifest = Manifest.load(artifacts_dora)
    assert manifest.lora["dora"] and any(p.kind == "magnitude" for p in manifest.parameters)
    weights = random_weights(manifest, seed=5, scale=0.3)
    rng = np.random.default_rng(6)
    for p in manifest.parameters:
        if p.kind == "magnitude":  # positive, around the base rows' norms
            weights[p.onnx_name] = (1.5 + 0.3 * rng.standard_normal(p.shape)).astype(np.float32)
    adapters = {"dora": save_adapter(manifest, weights, tmp_path / "dora-adapter")}
    _, logits = onnxruntime_runs(artifacts_dora, adapters, tmp_path)
    check_logits(artifacts_dora, adapters, logits)


def transformers_greedy(artifacts: Path, adapter: Path | None, prompt: list[int], eos: set[int]) -> list[int]:
    """transformers + PEFT (merged) greedy tokens, cut at the first end-of-sequence token."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(artifacts / "base_model", dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        tokens = model.eval().generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=sorted(eos),
                                       pad_token_id=0)[0, len(prompt):].tolist()
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)


def genai_matches_ortlora_generate_and_transformers(artifacts: Path, trained: Path, other: Path, tmp_path: Path,
                                                    messages: list[dict] = MESSAGES) -> dict:
    """GenAI's folder: its tokenizer and chat template give ortlora's prompt ids of ``messages``; its greedy
    tokens without an adapter, with the folder's adapter and with a second adapter exported alone (--to
    onnx-adapter), switched in one process, equal ortlora-generate's and transformers + PEFT's, token for token.
    Returns the folder's genai_config.json."""
    folder = export(artifacts, trained, "genai", tmp_path / "genai")
    second = export(artifacts, other, "onnx-adapter", tmp_path / "second") / ADAPTER_FILE
    generator = Generator(artifacts)
    prompt = generator.prompt(messages=messages)
    eos = generator.eos_ids
    config = json.loads((folder / "genai_config.json").read_text())
    assert set(config["model"]["eos_token_id"]) == eos
    # The cache's shape as the config states it is the graph's: GenAI 0.18 takes a static head width or key/value
    # head count from the graph's past inputs over the config's (src/models/kv_cache.cpp, per-layer shapes), so a
    # wrong head_size would not change a token below. Checked here instead.
    decoder = config["model"]["decoder"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # every LoRA weight is an input with an initializer: ORT warns of each
    session = ort.InferenceSession(str(folder / decoder["filename"]), options, providers=["CPUExecutionProvider"])
    past = {i.name: i.shape for i in session.get_inputs() if i.name.startswith("past.")}
    assert len(past) == 2 * decoder["num_hidden_layers"]
    assert all(shape[1:] == [decoder["num_key_value_heads"], "past", decoder["head_size"]] for shape in past.values())

    result = run_in("genai", f"""
        import json, onnxruntime_genai as og
        model = og.Model({str(folder)!r})
        tokenizer = og.Tokenizer(model)
        text = tokenizer.apply_chat_template(json.dumps({messages!r}), add_generation_prompt=True)
        adapters = og.Adapters(model)
        adapters.load({str(folder / ADAPTER_FILE)!r}, "trained")
        adapters.load({str(second)!r}, "other")
        prompt, eos = {prompt!r}, {sorted(eos)!r}
        def greedy(name):
            params = og.GeneratorParams(model)
            # genai_config's defaults are generation_config.json's (Qwen2.5's: sampling, repetition penalty 1.1)
            params.set_search_options(do_sample=False, repetition_penalty=1.0, max_length=len(prompt) + {NEW_TOKENS})
            generator = og.Generator(model, params)
            if name:
                generator.set_active_adapter(adapters, name)
            generator.append_tokens(prompt)
            tokens = []
            while not generator.is_done():
                generator.generate_next_token()
                tokens.append(int(generator.get_next_tokens()[0]))
            return tokens[:-1] if tokens and tokens[-1] in eos else tokens
        runs = [(name, greedy(name)) for name in ("trained", None, "other", "trained", None)]
        print(json.dumps({{"ids": [int(i) for i in tokenizer.encode(text)], "runs": runs}}))
    """)
    assert result["ids"] == prompt

    expected = {}
    for name, adapter in (("trained", trained), (None, None), ("other", other)):
        ours = Generator(artifacts, adapter).generate(prompt, Sampling(max_new_tokens=NEW_TOKENS)).tokens
        assert ours == transformers_greedy(artifacts, adapter, prompt, eos), name
        expected[name] = ours
    assert len({tuple(t) for t in expected.values()}) == 3  # three different outputs: the switch is seen
    assert all(len(t) >= 3 for t in expected.values()), expected
    for name, tokens in result["runs"]:
        assert tokens == expected[name], name
    return config


@needs("genai")
def test_genai_greedy_tokens_equal_ortlora_generate_and_transformers(artifacts, trained_adapter, other_adapter, tmp_path):
    config = genai_matches_ortlora_generate_and_transformers(artifacts, trained_adapter, other_adapter, tmp_path)
    assert config["model"]["type"] == "qwen2"


@needs("genai")
def test_genai_runs_qwen3_as_ortlora_generate_and_transformers(qwen3_handoff, qwen3_other_adapter, tmp_path):
    """The same for Qwen3: model type qwen3 (a decoder-only model to GenAI 0.18, as qwen2), and a head_size of
    config.json's head_dim, 32, where 64 / 4 heads = 16."""
    _, artifacts, trained = qwen3_handoff
    # Trained 5 steps on the chat data, the tiny Qwen3 ends its turn at once after MESSAGES (nothing to compare);
    # after this greeting it writes the 16 tokens.
    messages = [{"role": "user", "content": "hi there, how are you?"}]
    config = genai_matches_ortlora_generate_and_transformers(artifacts, trained, qwen3_other_adapter, tmp_path, messages)
    decoder = config["model"]["decoder"]
    assert config["model"]["type"] == "qwen3"
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"]) == (32, 64, 4)


def patched_artifacts(artifacts: Path, tmp_path: Path, patch) -> Path:
    copy = tmp_path / "artifacts"
    shutil.copytree(artifacts, copy)
    data = json.loads((copy / MANIFEST_NAME).read_text())
    patch(data)
    (copy / MANIFEST_NAME).write_text(json.dumps(data))
    return copy


def drop_decoder_input(data: dict) -> None:
    """As if a LoRA variant's tensor (say DoRA's magnitude) were folded into the graph instead of an input."""
    data["io"]["decoder"]["inputs"].remove(data["parameters"][0]["onnx_name"])


@pytest.mark.parametrize("to", ["onnx-adapter", "genai"])
@pytest.mark.parametrize("patch, message", [
    (lambda d: d["model"].update(base_precision="int4", block_size=32), "quantized base (int4)"),
    (drop_decoder_input, "do not take every adapter tensor as an input"),
])
def test_what_the_format_cannot_hold_is_refused_in_one_line(artifacts, trained_adapter, tmp_path, capsys, to, patch, message):
    copy = patched_artifacts(artifacts, tmp_path, patch)
    out = tmp_path / "out"
    code = export_cli.main(["--artifacts", str(copy), "--adapter", str(trained_adapter), "--to", to, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]  # nothing written


def test_adapter_bytes_are_a_valid_flatbuffer_layout():
    """The layout by hand: root offset, identifier, the Adapter table's four fields (schema order)."""
    data = adapter_bytes({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, adapter_version=3, model_version=7)
    root = int.from_bytes(data[:4], "little")
    vtable = root - int.from_bytes(data[root:root + 4], "little", signed=True)
    size = int.from_bytes(data[vtable:vtable + 2], "little")
    offsets = [int.from_bytes(data[vtable + 4 + 2 * i: vtable + 6 + 2 * i], "little") for i in range((size - 4) // 2)]
    fields = [int.from_bytes(data[root + o: root + o + 4], "little") for o in offsets[:3]]
    assert data[4:8] == b"TORT" and fields == [1, 3, 7]  # format_version 1 (ORT's kAdapterFormatVersion), adapter, model
