"""ortlora-export against the references: PEFT's merge_and_unload, transformers, and the unmerged
inference model of the artifacts."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ortlora.handoff import cli as export_cli
from ortlora.handoff.merge import write_merged
from ortlora.manifest import Manifest
from ortlora.runtime.checkpoint import load_adapter
from ortlora.weights import (
    bf16_to_f32,
    f32_to_bf16,
    read_safetensors,
    weight_files,
    write_safetensors,
)
from tests.reference import rel_err
from tests.test_build import make_batch

TOL = 1e-5


@pytest.fixture
def trained(trained_adapter) -> Path:
    return trained_adapter


@pytest.fixture(params=["qwen2", "qwen3"])
def handoff(request) -> tuple[Path, Path]:
    """(artifacts, trained adapter) of the tiny Qwen2, and of the tiny tied Qwen3 (per-head q_norm / k_norm, no
    q/k/v biases, heads 32 wide where 64 / 4 = 16)."""
    if request.param == "qwen2":
        return request.getfixturevalue("artifacts"), request.getfixturevalue("trained_adapter")
    _, artifacts, adapter = request.getfixturevalue("qwen3_handoff")
    return artifacts, adapter


def export(artifacts, adapter, *args) -> int:
    return export_cli.main(["--artifacts", str(artifacts), "--adapter", str(adapter), *args])


def logits_of(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(batch["input_ids"]),
                     attention_mask=torch.from_numpy(batch["attention_mask"])).logits.numpy()


def peft_merged(artifacts, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(artifacts / "base_model", dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


def test_merged_model_equals_peft_merge_and_unload(handoff, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    artifacts, trained = handoff
    assert export(artifacts, trained, "--to", "merged", "--out", str(tmp_path / "merged")) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    batch = make_batch(512, "padding")
    valid = batch["attention_mask"].astype(bool)
    ours, reference = logits_of(merged, batch), logits_of(peft_merged(artifacts, trained), batch)
    assert rel_err(ours[valid], reference[valid]) < TOL
    base = AutoModelForCausalLM.from_pretrained(artifacts / "base_model", dtype=torch.float32).eval()
    assert rel_err(logits_of(base, batch)[valid], reference[valid]) > 1e-3  # the adapter does change the model
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("hello")["input_ids"]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())  # where other converters look too
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == merged.config.rope_parameters["rope_theta"]

    # Sharded: the same weights over several files and an index that transformers follows.
    assert export(artifacts, trained, "--to", "merged", "--out", str(tmp_path / "sharded"), "--max-shard-size", "100KB") == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).eval()
    np.testing.assert_array_equal(logits_of(sharded, batch), ours)


def test_bfloat16_merge_rounds_like_torch(artifacts, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    manifest = Manifest.load(artifacts)
    base16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(artifacts / "base_model", dtype=torch.bfloat16).save_pretrained(base16)
    out = tmp_path / "merged"
    out.mkdir()
    weights = load_adapter(trained, manifest)
    write_merged(base16, manifest, weights, out, artifacts, max_shard_bytes=2**40)
    scaling = manifest.lora["alpha"] / manifest.lora["rank"]
    theirs = {}
    for file in weight_files(base16):
        theirs.update({n: a for n, _, a in read_safetensors(file)})
    ours = {n: (d, a) for n, d, a in read_safetensors(out / "model.safetensors")}
    name = "model.layers.1.self_attn.q_proj.weight"
    a, b = (torch.from_numpy(weights[f"model.layers.1.self_attn.q_proj.lora_{k}.weight"]) for k in "AB")
    expected = (torch.from_numpy(bf16_to_f32(theirs[name])) + (b @ a) * scaling).to(torch.bfloat16)
    assert ours[name][0] == "BF16"
    np.testing.assert_array_equal(ours[name][1], expected.view(torch.int16).numpy().view(np.uint16))
    untouched = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(ours[untouched][1], theirs[untouched])


def test_bfloat16_conversion_and_file_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    values = torch.randn(1000) * torch.logspace(-30, 30, 1000)
    values[:3] = torch.tensor([float("inf"), -0.0, 1.0 + 2**-8])  # a tie rounds to even
    np.testing.assert_array_equal(f32_to_bf16(values.numpy()), values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    save_file({"w": values.to(torch.bfloat16)}, str(tmp_path / "t.safetensors"))
    ((name, dtype, raw),) = list(read_safetensors(tmp_path / "t.safetensors"))
    assert (name, dtype) == ("w", "BF16")
    write_safetensors(tmp_path / "u.safetensors", {"w": ("BF16", raw), "n": ("F32", np.arange(3, dtype=np.float32))})
    back = load_file(str(tmp_path / "u.safetensors"))
    assert torch.equal(back["w"], values.to(torch.bfloat16)) and back["n"].tolist() == [0.0, 1.0, 2.0]


def test_onnx_export_has_no_lora_and_equals_the_unmerged_model(handoff, tmp_path):
    """The merged ONNX model against the artifacts' inference graph with the adapter as inputs, and against the
    merged Hugging Face model in transformers (float32)."""
    artifacts, trained = handoff
    assert export(artifacts, trained, "--to", "onnx", "--out", str(tmp_path / "onnx"), "--ort-format") == 0
    manifest = Manifest.load(artifacts)
    merged = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in merged.get_inputs()] == ["input_ids", "attention_mask"]
    unmerged = ort.InferenceSession(str(artifacts / manifest.files["inference_model"]), providers=["CPUExecutionProvider"])
    batch = make_batch(512, "padding", seed=4)
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ours = merged.run(["logits"], feeds)[0]
    reference = unmerged.run(["logits"], {**feeds, **load_adapter(trained, manifest)})[0]
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(ours[valid], reference[valid]) < 1e-4
    assert rel_err(ours[valid], logits_of(peft_merged(artifacts, trained), batch)[valid]) < 1e-4
    mobile = ort.InferenceSession(str(tmp_path / "onnx" / "model.ort"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(mobile.run(["logits"], feeds)[0], ours, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "onnx" / "tokenizer.json").is_file()


def test_peft_export_loads_in_peft(handoff, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    artifacts, trained = handoff
    assert export(artifacts, trained, "--to", "peft", "--out", str(tmp_path / "adapter")) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == (artifacts / "base_model").resolve()
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().eval()
    batch = make_batch(512, "plain")
    assert rel_err(logits_of(model, batch), logits_of(peft_merged(artifacts, trained), batch)) < TOL
    # Weights saved without adapter_config.json: the export writes the configuration of the artifacts.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(trained / "adapter_model.safetensors", bare)
    assert export(artifacts, bare, "--to", "peft", "--out", str(tmp_path / "from-bare")) == 0
    rebuilt = json.loads((tmp_path / "from-bare" / "adapter_config.json").read_text())
    assert rebuilt["r"] == config["r"] and rebuilt["target_modules"] == config["target_modules"]


def test_bad_exports_write_nothing(artifacts, artifacts_all_linear, trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    # An adapter of another rank and other modules.
    assert export(artifacts_all_linear, trained, "--to", "merged", "--out", str(out)) == 2
    assert "does not match the artifacts" in capsys.readouterr().err
    # A base model whose weights differ from the one the artifacts were built from.
    other = tmp_path / "other-base"
    shutil.copytree(artifacts / "base_model", other)
    (name, dtype, array), *_ = read_safetensors(weight_files(other)[0])
    tensors = {n: (d, a.copy()) for n, d, a in read_safetensors(weight_files(other)[0])}
    tensors[name][1].flat[0] += 1
    write_safetensors(weight_files(other)[0], tensors)
    assert export(artifacts, trained, "--to", "merged", "--out", str(out), "--base", str(other)) == 2
    assert "not the one the artifacts were built from" in capsys.readouterr().err
    assert export(artifacts, trained, "--to", "merged", "--out", str(out), "--base", str(tmp_path / "none")) == 2
    assert "is missing" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    # --to onnx where the build extra is not installed.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    assert export(artifacts, trained, "--to", "onnx", "--out", str(out)) == 2
    assert 'pip install "ortlora[build]"' in capsys.readouterr().err
    monkeypatch.undo()
    assert not out.exists()
    out.mkdir()
    (out / "keep").write_text("x")
    assert export(artifacts, trained, "--to", "peft", "--out", str(out)) == 2
    assert "did not write" in capsys.readouterr().err  # a directory of the user's, not an export
    assert (out / "keep").read_text() == "x"
