"""Qwen3 (Qwen3ForCausalLM) against PyTorch + PEFT: the build, the LoRA variants, the int8 / int4 and bf16 bases,
recompute, training and resume, the inference and decoder graphs, greedy generation.

Qwen3 is Qwen2 with an RMSNorm over each query and key head (self_attn.q_norm / k_norm, weight [head_dim]), no
q/k/v biases and an explicit head_dim. The test model is the tiny shape as a Qwen3 whose heads are 32 wide
although 64 / 4 = 16, so a build that derived head_dim from the hidden size would fail on the weights' shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ortlora.build import recompute
from ortlora.build.builder import BuildOptions, build
from ortlora.build.decoder import cache_names
from ortlora.build.model_dir import ARCHITECTURES, expected_weights
from ortlora.build.tiny import SHAPES, create_random_model
from ortlora.manifest import Manifest
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.session_backend import OrtSessionBackend
from tests.reference import assert_same_adapters, peft_model, random_weights, rel_err, transformers_greedy
from tests.test_bf16_base import widened_model
from tests.test_build import _check_against_peft, make_batch
from tests.test_quantized import BLOCK, dequantized_model

TOL = 1e-4
QWEN3 = dict(model_type="qwen3", head_dim=32)  # the tiny shape as a Qwen3, heads wider than 64 / 4
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name: (tied embeddings, BuildOptions keywords, how the PEFT reference's base is made from the model)
BUILDS = {
    "tied": (True, {}, None),
    "untied": (False, {}, None),
    "all-linear": (False, dict(targets=ALL_LINEAR, rank=4, alpha=8.0, label_smoothing=0.1), None),
    "dora": (True, dict(targets=ALL_LINEAR, dora=True), None),
    "int8": (True, dict(base_precision="int8", block_size=BLOCK), lambda m, out: dequantized_model(m, out, "int8")),
    "int4": (False, dict(base_precision="int4", block_size=BLOCK), lambda m, out: dequantized_model(m, out, "int4")),
    "bf16": (False, dict(base_precision="bf16"), widened_model),
    "recompute": (True, dict(recompute="layers", targets=ALL_LINEAR), None),
}


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def qwen3_model(request, tmp_path_factory) -> Path:
    name = "tied" if request.param else "untied"
    return create_random_model(tmp_path_factory.mktemp("model") / f"qwen3-{name}", "tiny", seed=5,
                               tie_word_embeddings=request.param, **QWEN3)


def _model(tmp_path_factory, tied: bool) -> Path:
    return create_random_model(tmp_path_factory.mktemp("model") / "qwen3", "tiny", seed=5, tie_word_embeddings=tied,
                               **QWEN3)


@pytest.fixture(scope="module", params=list(BUILDS))
def qwen3_build(request, tmp_path_factory) -> tuple[Path, Path | None]:
    """(artifacts, the reference base for PEFT or None for the artifacts' own) of each build in BUILDS."""
    tied, options, reference = BUILDS[request.param]
    model = _model(tmp_path_factory, tied)
    out = tmp_path_factory.mktemp("artifacts") / request.param
    build(BuildOptions(model_dir=model, out_dir=out, bundle_base=True, **options), echo=lambda *a, **k: None)
    if options.get("recompute") == "layers":  # both layers' attention (q_norm included) recomputed in the backward
        nodes = onnx.load(str(out / "training_model.onnx"), load_external_data=False).graph.node
        recomputed = {n.name.split("/")[2] for n in nodes if n.name.endswith(recompute.SUFFIX) and "q_norm" in n.name}
        assert recomputed == {"layers.0", "layers.1"}, recomputed
    return out, reference and reference(model, tmp_path_factory.mktemp("reference") / "model")


@pytest.fixture(scope="module")
def qwen3_artifacts(tmp_path_factory, qwen3_model) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "qwen3"
    build(BuildOptions(model_dir=qwen3_model, out_dir=out, bundle_base=True), echo=lambda *a, **k: None)
    return out


def test_the_checkpoint_is_transformers_qwen3_and_the_manifest_says_so(qwen3_model, qwen3_artifacts):
    from transformers import AutoModelForCausalLM

    config = json.loads((qwen3_model / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(qwen3_model)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    # q_norm / k_norm of [32] in each layer, no q/k/v bias; q is 4 heads of 32 = 128 wide, k and v 2 of 32.
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == expected_weights(config)
    shapes = expected_weights(config)
    assert shapes["model.layers.1.self_attn.k_norm.weight"] == (32,)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (128, 64)
    assert not [n for n in shapes if n.endswith(".bias")]
    manifest = Manifest.load(qwen3_artifacts)
    assert (manifest.model["architecture"], manifest.model["model_type"]) == ("Qwen3ForCausalLM", "qwen3")
    assert "model.layers.0.self_attn.q_norm.weight" in manifest.frozen
    # r = 8 on q (64 -> 128) and v (64 -> 64) in 2 layers
    assert manifest.counts["trainable"] == 2 * (8 * 64 + 128 * 8 + 8 * 64 + 64 * 8)


@pytest.mark.parametrize("shape, total, non_embedding", [
    ("qwen3-0.6b", 596_049_920, 440_467_456), ("qwen3-1.7b", 1_720_574_976, 1_409_410_048),
    ("qwen3-4b", 4_022_468_096, 3_633_511_936), ("qwen3-8b", 8_190_735_360, 6_946_075_648)])
def test_published_qwen3_shapes_are_transformers_own(shape, total, non_embedding):
    """The shapes' configs make transformers' Qwen3 of the published sizes (the model cards: 0.6B, 1.7B, 4.0B and
    8.2B parameters, of which 0.44B, 1.4B, 3.6B and 6.95B are not embeddings; a tied embedding counted once), and
    expected_weights names and sizes each of its weights (on the meta device: nothing is allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**SHAPES[shape])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == expected_weights(config.to_dict())
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n) \
        == non_embedding


@pytest.mark.parametrize("case", ["plain", "padding"])
@pytest.mark.parametrize("backend_type", [OrtTrainingBackend, OrtSessionBackend], ids=["ort-training", "ort-session"])
def test_loss_and_gradients_match_peft(qwen3_build, case, backend_type):
    artifacts, reference = qwen3_build
    _check_against_peft(artifacts, case, backend_type, base=reference)


def test_inference_and_decoder_logits_match_transformers(qwen3_artifacts):
    """The inference graph on a padded batch, and the decoder graph a prompt of 6 then one token at a time
    through its cache (left padding in one row), against PEFT with the same adapter."""
    manifest = Manifest.load(qwen3_artifacts)
    weights = random_weights(manifest, seed=3)
    batch = make_batch(512, "padding", seed=3)
    inference = ort.InferenceSession(str(qwen3_artifacts / manifest.files["inference_model"]),
                                     providers=["CPUExecutionProvider"])
    logits = inference.run(["logits"], {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                        **weights})[0]
    with torch.no_grad():
        ref = peft_model(qwen3_artifacts, weights)(input_ids=torch.from_numpy(batch["input_ids"]),
                                                   attention_mask=torch.from_numpy(batch["attention_mask"])).logits
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(logits[valid], ref.numpy()[valid]) < TOL

    config = json.loads((qwen3_artifacts / "config.json").read_text())
    ids = np.random.default_rng(0).integers(3, 512, size=(2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        reference = peft_model(qwen3_artifacts, weights)(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(np.clip(mask.cumsum(-1) - 1, 0, None))).logits.numpy()
    decoder = ort.InferenceSession(str(qwen3_artifacts / manifest.files["decoder_model"]),
                                   providers=["CPUExecutionProvider"])
    past_names, present_names = cache_names(config["num_hidden_layers"])
    past = dict.fromkeys(past_names, np.zeros((2, config["num_key_value_heads"], 0, config["head_dim"]), np.float32))
    out = decoder.run(None, {"input_ids": ids[:, :6], "attention_mask": mask[:, :6], **weights, **past})
    steps = [out[0]]
    for t in range(6, 9):
        past = {n.replace("present.", "past."): v for n, v in zip(present_names, out[1:])}
        out = decoder.run(None, {"input_ids": ids[:, t:t + 1], "attention_mask": mask[:, :t + 1], **weights, **past})
        steps.append(out[0])
    assert out[1].shape == (2, 2, 9, 32)  # 2 key/value heads of 32 over every position
    valid = mask.astype(bool)
    assert rel_err(np.concatenate(steps, axis=1)[valid], reference[valid]) < TOL


@pytest.fixture(scope="module")
def qwen3_run(qwen3_artifacts, tmp_path_factory) -> Path:
    """4 steps at a high learning rate (B far from zero), a checkpoint every 2."""
    from ortlora.runtime import cli as train_cli

    run = tmp_path_factory.mktemp("run") / "qwen3"
    assert train_cli.main(["--artifacts", str(qwen3_artifacts), "--out", str(run), "--max-steps", "4",
                           "--save-every", "2", "--lr", "0.05", "--no-progress", "--no-plot"]) == 0
    return run


def test_training_resumes_exactly_and_greedy_generation_is_transformers(qwen3_artifacts, qwen3_run, tmp_path):

    from ortlora.runtime import cli as train_cli
    from ortlora.runtime.generate import Generator, Sampling

    resumed = tmp_path / "resumed"
    assert train_cli.main(["--resume", str(qwen3_run / "checkpoint-2"), "--out", str(resumed), "--no-progress",
                           "--no-plot"]) == 0
    assert_same_adapters(qwen3_run / "checkpoint-4", resumed / "checkpoint-4")

    adapter = qwen3_run / "checkpoint-4"
    generator = Generator(qwen3_artifacts, adapter)
    prompt = generator.prompt(messages=[{"role": "user", "content": "What is 2 plus 3?"}])
    ours = generator.generate(prompt, Sampling(max_new_tokens=24))
    expected = transformers_greedy(qwen3_artifacts / "base_model", adapter, prompt, 24)
    assert len(expected) >= 3 and ours.tokens == expected


def test_a_published_qwen3_layout_builds_and_matches_peft(tmp_path):
    """The qwen3-0.6b shape as published (bf16, sharded, Qwen3's real tokenizer), cut to 2 layers and
    a test's width, its head_dim the shape's 128: the streaming build from shards, against PEFT in float32."""
    model = create_random_model(tmp_path / "model", "qwen3-0.6b", seed=0, layers=2, dtype="bf16",
                                max_shard_size=60_000, tokenizer="real", hidden_size=64, intermediate_size=176,
                                num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    config = json.loads((model / "config.json").read_text())
    assert (config["architectures"], config["head_dim"], config["vocab_size"]) == (["Qwen3ForCausalLM"], 128, 151936)
    assert (model / "model.safetensors.index.json").is_file()
    out = tmp_path / "artifacts"
    build(BuildOptions(model_dir=model, out_dir=out), echo=lambda *a, **k: None)
    assert Manifest.load(out).model["source_dtype"] == "bfloat16"
    _check_against_peft(out, "ignored")


def test_an_unsupported_model_type_names_both_architectures(tmp_path, capsys):
    from ortlora.build import cli as build_cli

    model = _model_dir_with(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"])
    assert build_cli.main(["--model", str(model), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert all(f"model_type {t}" in err for t in ARCHITECTURES) and err.count("\n") == 1


def _model_dir_with(tmp_path: Path, **config) -> Path:
    model = create_random_model(tmp_path / "model", "tiny", seed=5, **QWEN3)
    path = model / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return model


def test_weights_of_a_qwen2_in_a_qwen3_config_are_refused(tmp_path, capsys):
    """A config.json that says qwen3 over Qwen2's weights (biases, no head norms, 16-wide heads) is one line."""
    from ortlora.build import cli as build_cli

    model = create_random_model(tmp_path / "qwen2", "tiny", seed=5)
    path = model / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "model_type": "qwen3", "head_dim": 16,
                                "architectures": ["Qwen3ForCausalLM"]}))
    assert build_cli.main(["--model", str(model), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "q_norm" in err and "Qwen3" in err and err.count("\n") == 1, err
