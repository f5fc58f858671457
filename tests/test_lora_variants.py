"""LoRA variants against PEFT itself: kaiming init, rsLoRA, a subset of layers, rank / alpha patterns, DoRA.

Each variant is built on the tiny model and checked against peft.get_peft_model with the same LoraConfig on the
same base weights and the same adapter weights copied in: the initial weights (bit for bit under the same seed),
loss and every trainable gradient on both backends, the inference and decoder graphs' logits, and the exports
(the PEFT adapter loads with PeftModel.from_pretrained, the merged model equals PEFT's merge_and_unload).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file, save_file

from ortlora.build import cli as build_cli
from ortlora.handoff import cli as export_cli
from ortlora.lora_config import peft_fields
from ortlora.manifest import Manifest
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_config, load_adapter
from ortlora.runtime.session_backend import OrtSessionBackend
from tests.conftest import _build
from tests.reference import loss_and_grads, peft_key, peft_model, random_weights, rel_err
from tests.test_build import make_batch

# Measured here: loss within 1e-7 relative, gradients within 2e-5 (DoRA's B, whose norm is spelled
# exp(log(.) / 2), lora.detached_row_norm), logits within 2e-6.
TOL = 5e-5
LOGITS_TOL = 1e-5
VOCAB = 512

VARIANTS = {
    # name: (BuildOptions keywords, what the manifest's lora object records, what adapter_config.json records)
    "kaiming": ({"init": "kaiming"}, {"init": "kaiming"}, {"init_lora_weights": True}),
    "rslora": ({"rslora": True, "rank": 4, "alpha": 8.0}, {"rslora": True, "scaling": 4.0},
               {"use_rslora": True}),
    "layers": ({"layers": "last:1", "targets": ("q_proj", "v_proj", "down_proj")}, {"layers": [1]},
               {"layers_to_transform": [1], "layers_pattern": "layers"}),
    "patterns": ({"targets": ("q_proj", "v_proj", "o_proj", "up_proj"), "rank_pattern": "v_proj=2,layers.1.self_attn.o_proj=12",
                  "alpha_pattern": {"o_proj": 3, "up_proj": 32.5}},
                 {"rank_pattern": {"v_proj": 2, "layers.1.self_attn.o_proj": 12}, "alpha_pattern": {"o_proj": 3, "up_proj": 32.5}},
                 {"rank_pattern": {"v_proj": 2, "layers.1.self_attn.o_proj": 12}, "alpha_pattern": {"o_proj": 3, "up_proj": 32.5}}),
    "dora": ({"dora": True, "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")},
             {"dora": True}, {"use_dora": True}),
    # Everything at once, with kaiming A, a bias-carrying projection (k_proj) and a rank pattern under DoRA.
    "together": ({"init": "kaiming", "rslora": True, "layers": "0,", "dora": True, "targets": ("q_proj", "k_proj", "up_proj"),
                  "rank_pattern": {"k_proj": 3}, "alpha_pattern": {"q_proj": 5}, "seed": 7},
                 {"init": "kaiming", "rslora": True, "layers": [0], "dora": True, "rank_pattern": {"k_proj": 3}},
                 {"use_rslora": True, "use_dora": True, "layers_to_transform": [0], "init_lora_weights": True}),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory, tiny_model) -> tuple[str, Path]:
    options, _, _ = VARIANTS[request.param]
    return request.param, _build(tmp_path_factory, tiny_model, f"variant-{request.param}", **options)


def variant_weights(directory: Path, manifest: Manifest, seed: int) -> dict[str, np.ndarray]:
    """Non-zero A and B; DoRA's magnitudes moved about 10% from their initial row norms."""
    weights = random_weights(manifest, seed)
    initial = load_file(str(directory / manifest.files["initial_lora"]))
    for p in manifest.parameters:
        if p.kind == "magnitude":
            weights[p.onnx_name] = (initial[p.onnx_name] * (1 + weights[p.onnx_name])).astype(np.float32)
    return weights


def logits_of(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(batch["input_ids"]),
                     attention_mask=torch.from_numpy(batch["attention_mask"])).logits.numpy()


def test_the_variant_is_recorded_and_initialised_as_peft_does(variant):
    """The manifest and adapter_config.json record the variant, and the initial weights are PEFT's own: the same
    seed gives the same A bit for bit (PEFT draws nn.Linear's init for A and B, then A again, as ortlora does),
    zero B, and DoRA's magnitudes equal PEFT's ||W|| per row."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    name, directory = variant
    options, recorded, config = VARIANTS[name]
    manifest = Manifest.load(directory)
    assert manifest.lora.items() >= recorded.items()
    written = adapter_config(manifest, "base")
    assert written.items() >= config.items()
    LoraConfig(**{k: v for k, v in written.items() if k not in ("peft_type", "base_model_name_or_path")})  # PEFT takes it
    kinds = {p.kind for p in manifest.parameters}
    assert kinds == ({"A", "B", "magnitude"} if options.get("dora") else {"A", "B"})
    if "layers" in recorded:
        assert {p.layer for p in manifest.parameters} == set(recorded["layers"])

    base = AutoModelForCausalLM.from_pretrained(directory / "base_model", dtype=torch.float32)
    torch.manual_seed(options.get("seed", 0))
    reference = dict(get_peft_model(base, LoraConfig(**peft_fields(manifest.lora))).named_parameters())
    initial = load_file(str(directory / manifest.files["initial_lora"]))
    assert sorted(n for n in reference if "lora_" in n) == sorted(peft_key(p) for p in manifest.parameters)
    for p in manifest.parameters:
        theirs = reference[peft_key(p)].detach().numpy()
        assert initial[p.onnx_name].shape == theirs.shape == p.shape, p.onnx_name
        if p.kind == "magnitude":
            assert rel_err(initial[p.onnx_name], theirs) < 1e-6, p.onnx_name
        else:
            np.testing.assert_array_equal(initial[p.onnx_name], theirs, err_msg=p.onnx_name)
    a = np.concatenate([initial[p.onnx_name].ravel() for p in manifest.parameters if p.kind == "A"])
    if manifest.lora["init"] == "kaiming":  # uniform within 1/sqrt(fan_in): std 1/sqrt(3 * fan_in)
        fan_in = {p.shape[1] for p in manifest.parameters if p.kind == "A"}
        assert np.abs(a).max() <= 1 / np.sqrt(min(fan_in))
        if fan_in == {64}:
            assert abs(a.std() - 1 / np.sqrt(3 * 64)) < 0.005


@pytest.mark.parametrize("backend_type", [OrtTrainingBackend, OrtSessionBackend])
def test_loss_and_every_gradient_match_peft(variant, backend_type):
    _, directory = variant
    manifest = Manifest.load(directory)
    weights = variant_weights(directory, manifest, seed=1)
    reference = peft_model(directory, weights)
    backend = backend_type(directory, manifest)
    backend.set_weights(weights)
    for case in ("padding", "ignored"):
        batch = make_batch(VOCAB, case)
        backend.zero_grad()
        loss = backend.train_step(batch)
        grads = backend.gradients()
        ref_loss, ref_grads = loss_and_grads(reference, manifest, batch)
        assert set(grads) == set(ref_grads) == {p.onnx_name for p in manifest.parameters}
        assert abs(loss - ref_loss) / ref_loss < 1e-6, (loss, ref_loss)
        errors = {n: rel_err(grads[n], ref_grads[n]) for n in ref_grads}
        worst = max(errors, key=errors.get)
        assert errors[worst] < TOL, (worst, errors[worst])
        assert all(np.abs(g).max() > 0 for g in ref_grads.values())  # every parameter is on the loss's path
        assert backend.eval_loss(batch) == pytest.approx(ref_loss, rel=1e-6)


def test_inference_and_decoder_graphs_compute_the_variant(variant):
    _, directory = variant
    manifest = Manifest.load(directory)
    weights = variant_weights(directory, manifest, seed=2)
    batch = make_batch(VOCAB, "padding", seed=3)
    valid = batch["attention_mask"].astype(bool)
    reference = logits_of(peft_model(directory, weights), batch)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **weights}
    inference = ort.InferenceSession(str(directory / manifest.files["inference_model"]), options,
                                     providers=["CPUExecutionProvider"])
    assert rel_err(inference.run(["logits"], feeds)[0][valid], reference[valid]) < LOGITS_TOL
    decoder = ort.InferenceSession(str(directory / manifest.files["decoder_model"]), options,
                                   providers=["CPUExecutionProvider"])
    ids = batch["input_ids"][:1]  # one unpadded row through an empty cache
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in decoder.get_inputs()
            if i.name.startswith("past.")}
    logits = decoder.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), **weights, **past})[0]
    assert rel_err(logits[0], reference[0]) < LOGITS_TOL
    # Without adapter inputs, the initial weights are the defaults: the base model (DoRA included: m = ||W||).
    base_feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(directory / "base_model", dtype=torch.float32).eval()
    assert rel_err(inference.run(["logits"], base_feeds)[0][valid], logits_of(base, batch)[valid]) < LOGITS_TOL


def write_adapter(directory: Path, manifest: Manifest, weights: dict[str, np.ndarray], out: Path) -> Path:
    out.mkdir()
    save_file({p.peft_name: weights[p.onnx_name] for p in manifest.parameters}, str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(manifest, str((directory / "base_model").resolve()))))
    return out


def test_exports_load_in_peft_and_merge_as_peft_merges(variant, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    name, directory = variant
    manifest = Manifest.load(directory)
    weights = variant_weights(directory, manifest, seed=4)
    adapter = write_adapter(directory, manifest, weights, tmp_path / "adapter")
    batch = make_batch(VOCAB, "padding", seed=5)
    valid = batch["attention_mask"].astype(bool)
    reference = peft_model(directory, weights)
    unmerged = logits_of(reference, batch)

    assert export_cli.main(["--artifacts", str(directory), "--adapter", str(adapter), "--to", "peft",
                            "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert config.items() >= VARIANTS[name][2].items()
    base = AutoModelForCausalLM.from_pretrained(directory / "base_model", dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert rel_err(logits_of(loaded, batch)[valid], unmerged[valid]) < LOGITS_TOL  # sdpa here, eager there

    assert export_cli.main(["--artifacts", str(directory), "--adapter", str(adapter), "--to", "merged",
                            "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    peft_merged = logits_of(reference.merge_and_unload().eval(), batch)
    ours = logits_of(merged, batch)
    assert rel_err(ours[valid], peft_merged[valid]) < LOGITS_TOL
    assert rel_err(ours[valid], unmerged[valid]) < LOGITS_TOL
    if name in ("dora", "together"):  # and folded into an ONNX model
        assert export_cli.main(["--artifacts", str(directory), "--adapter", str(adapter), "--to", "onnx",
                                "--out", str(tmp_path / "onnx")]) == 0
        session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
        logits = session.run(["logits"], {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0]
        assert rel_err(logits[valid], peft_merged[valid]) < LOGITS_TOL


def test_an_adapter_of_another_variant_is_refused(variant, artifacts, tmp_path):
    """The same tensors under another scaling (rsLoRA, a pattern) or without DoRA would be another model."""
    name, directory = variant
    manifest = Manifest.load(directory)
    adapter = write_adapter(directory, manifest, variant_weights(directory, manifest, seed=6), tmp_path / "adapter")
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    plain = {**config, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}
    if plain != config:
        (adapter / ADAPTER_CONFIG).write_text(json.dumps(plain))
        with pytest.raises(Exception, match="does not match the artifacts"):
            load_adapter(adapter, manifest)
    if name != "kaiming":  # (kaiming changes only the start: its adapters are the default build's)
        with pytest.raises(Exception, match="does not match the artifacts"):
            load_adapter(adapter, Manifest.load(artifacts))


def test_dora_trains_and_its_checkpoint_loads_in_peft(tmp_path_factory, tiny_model, tmp_path):
    """The runtime trains the magnitudes as it trains A and B (one more trainable parameter of the ORT
    artifacts), and a checkpoint is a PEFT DoRA adapter."""
    from onnxruntime.capi import _pybind_state as C
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ortlora.runtime import cli as train_cli

    directory = _build(tmp_path_factory, tiny_model, "dora-train", dora=True, rslora=True, layers="1")
    manifest = Manifest.load(directory)
    state = C.load_checkpoint(str(directory / manifest.files["checkpoint"]))
    trainable = {n for n in state.parameter_names() if state.get_parameter(n).requires_grad}
    assert trainable == {p.onnx_name for p in manifest.parameters}
    assert len([p for p in manifest.parameters if p.kind == "magnitude"]) == 2  # q_proj, v_proj of layer 1
    run = tmp_path / "run"
    assert train_cli.main(["--artifacts", str(directory), "--out", str(run), "--max-steps", "3", "--lr", "0.05",
                           "--no-progress", "--no-plot"]) == 0
    checkpoint = run / "checkpoint-3"
    trained = load_file(str(checkpoint / ADAPTER_WEIGHTS))
    initial = load_file(str(directory / manifest.files["initial_lora"]))
    for p in manifest.parameters:
        assert not np.array_equal(trained[p.peft_name], initial[p.onnx_name]), p.peft_name  # every one learned
    base = AutoModelForCausalLM.from_pretrained(directory / "base_model", dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, checkpoint).eval()
    batch = make_batch(VOCAB, "plain")
    reference = logits_of(peft_model(directory, load_adapter(checkpoint, manifest)), batch)
    assert rel_err(logits_of(loaded, batch), reference) < 1e-6
    # What ortlora-train reports as its loss is PEFT's loss of the weights it trained from.
    weights = load_adapter(checkpoint, manifest)
    backend = OrtTrainingBackend(directory, manifest)
    backend.set_weights(weights)
    ref_loss, _ = loss_and_grads(peft_model(directory, weights), manifest, batch)
    assert backend.eval_loss(batch) == pytest.approx(ref_loss, rel=1e-6)


def _dora_gradients_in_ort(tmp_path: Path, norm) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One DoRA layer, sum(layer(x) * g) as the loss, with its row norm spelled by ``norm``: the gradients of
    A, B and m from ONNX Runtime's gradient graph, and from PyTorch eager with the norm detached (PEFT's)."""
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module
    from torch import nn

    from ortlora.build import lora

    tmp_path.mkdir()
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(16, 12), rank=4, alpha=8.0, dropout=0.0, dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.3)
        layer.lora_magnitude_vector.copy_(layer.base_layer.weight.norm(dim=1) * 1.2)
    x, g = torch.randn(5, 16), torch.randn(5, 12)
    names = {"lora_A": layer.lora_A.weight, "lora_B": layer.lora_B.weight, "magnitude": layer.lora_magnitude_vector}

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, g):
            return (self.layer(x) * g).sum()

    (Loss()(x, g)).backward()
    eager = {name: p.grad.numpy().copy() for name, p in names.items()}
    original = lora.detached_row_norm
    lora.detached_row_norm = norm
    try:
        torch.onnx.export(Loss(), (x, g), str(tmp_path / "loss.onnx"), input_names=["x", "g"], output_names=["loss"],
                          opset_version=17, dynamo=False, do_constant_folding=False)
    finally:
        lora.detached_row_norm = original
    graph = onnx.load(str(tmp_path / "loss.onnx"))
    onnx_names = {name: f"layer.{name}.weight" if name != "magnitude" else "layer.lora_magnitude_vector" for name in names}
    frozen = [t.name for t in graph.graph.initializer if t.name.startswith("layer.base_layer.")]
    artifacts.generate_artifacts(graph, requires_grad=list(onnx_names.values()), frozen_params=frozen, loss=None,
                                 optimizer=artifacts.OptimType.AdamW, artifact_directory=str(tmp_path))
    state = CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = Module(str(tmp_path / "training_model.onnx"), state, str(tmp_path / "eval_model.onnx"))
    module.train()
    module(x.numpy(), g.numpy())
    ours = {name: state.parameters[onnx_names[name]].grad.copy() for name in names}
    return ours, eager


def test_the_dora_norm_gets_no_gradient(tmp_path):
    """PEFT detaches ||W + s B A|| (DoRA paper 4.3). The TorchScript exporter drops detach(), so the build spells
    the norm through Pow's exponent, which ONNX Runtime never differentiates: its gradients are PEFT's. Spelled
    as a plain norm, the gradients of A and B move off: the check that catches a lost stop-gradient."""
    ours, eager = _dora_gradients_in_ort(tmp_path / "stopped", lora_norm())
    assert max(rel_err(ours[n], eager[n]) for n in eager) < 1e-5
    plain, eager = _dora_gradients_in_ort(tmp_path / "plain", lambda weight: (weight * weight).sum(dim=1).sqrt())
    assert rel_err(plain["magnitude"], eager["magnitude"]) < 1e-5  # m is not under the norm
    assert min(rel_err(plain[n], eager[n]) for n in ("lora_A", "lora_B")) > 1e-2


def lora_norm():
    from ortlora.build.lora import detached_row_norm

    return detached_row_norm


def _run_build(argv: list[str], capsys) -> tuple[int, str]:
    code = build_cli.main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--layers", "3"], "--layers 3: the model has 2 layers"),
    (["--layers", "last:3"], "the last N takes N from 1 to 2"),
    (["--layers", "0,2-3"], "layer 2 is out of range; the model has 2 layers (0 to 1)"),
    (["--layers", "1-0"], "runs backwards"),
    (["--layers", "first:1"], "--layers takes N, last:N or a list"),
    (["--rank-pattern", "v_prj=4"], "--rank-pattern key 'v_prj' matches no adapted module"),
    (["--layers", "1", "--rank-pattern", "layers.0.self_attn.q_proj=4"], "matches no adapted module"),
    (["--alpha-pattern", "{\"k_proj\": 4}"], "--alpha-pattern key 'k_proj' matches no adapted module"),
    (["--rank-pattern", "v_proj=0"], "the value of 'v_proj' must be a positive integer"),
    (["--rank-pattern", "v_proj=2.5"], "must be a positive integer"),
    (["--alpha-pattern", "v_proj=-1"], "the value of 'v_proj' must be a positive number"),
    (["--rank-pattern", "{\"v_proj\": 4"], "--rank-pattern is not a valid JSON object"),
    (["--rank-pattern", "v_proj"], "takes NAME=VALUE pairs"),
    (["--rank-pattern", "(v_proj=4"], "is not a valid regular expression"),
    (["--dora", "--base-precision", "int8", "--block-size", "16"], "--dora needs an fp32 base"),
    (["--rank", "0"], "--rank must be a positive integer"),
])
def test_bad_variants_are_one_line_errors(tmp_path, tiny_model, capsys, extra, message):
    code, err = _run_build(["--model", str(tiny_model), "--out", str(tmp_path / "o"), *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_variants_on_a_quantized_base_match_peft_on_the_dequantized_weights(tmp_path_factory, tiny_model):
    """rsLoRA, a subset of layers and a rank pattern on an int4 base: PEFT on the dequantized base is the
    reference (as tests/test_quantized.py); DoRA is refused there (test_bad_variants_are_one_line_errors)."""
    from tests.test_build import _check_against_peft
    from tests.test_quantized import BLOCK, dequantized_model

    directory = _build(tmp_path_factory, tiny_model, "variant-int4", base_precision="int4", block_size=BLOCK,
                       rslora=True, layers="1,", rank_pattern={"v_proj": 4}, targets=("q_proj", "v_proj", "up_proj"))
    reference = dequantized_model(tiny_model, tmp_path_factory.mktemp("reference") / "model", "int4")
    for backend_type in (OrtTrainingBackend, OrtSessionBackend):
        _check_against_peft(directory, "padding", backend_type, base=reference)
