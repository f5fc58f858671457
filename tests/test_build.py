"""The build step against PyTorch + PEFT: parameters, loss, gradients and logits."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from ortlora.build import cli as build_cli
from ortlora.build.training_artifacts import SLOW_KERNELS
from ortlora.manifest import MANIFEST_NAME, Manifest
from ortlora.runtime.backend import OrtTrainingBackend
from tests.reference import loss_and_grads, peft_model, random_weights, rel_err

TOL = 1e-4


def make_batch(vocab: int, case: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, 19), dtype=np.int64)
    mask = np.ones_like(ids)
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -100
    if case == "ignored":  # masked prompts: a random third of the labels ignored
        labels[rng.random(labels.shape) < 0.33] = -100
    if case == "padding":  # right padding of different lengths
        for row, n in ((1, 11), (2, 4)):
            ids[row, n:] = 0
            mask[row, n:] = 0
            labels[row, n - 1:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_every_lora_weight_is_its_own_trainable_parameter(artifacts_all_linear):
    from onnxruntime.capi import _pybind_state as C

    manifest = Manifest.load(artifacts_all_linear)
    state = C.load_checkpoint(str(artifacts_all_linear / manifest.files["checkpoint"]))
    trainable = {n: state.get_parameter(n).data.numpy().shape for n in state.parameter_names()
                 if state.get_parameter(n).requires_grad}
    # 2 layers x 7 projections x (A, B)
    assert len(manifest.parameters) == 28
    assert trainable == {p.onnx_name: p.shape for p in manifest.parameters}
    # GQA: k/v project 64 -> 32 (2 KV heads of 16), q/o 64 -> 64, MLP 64 <-> 176; rank 4
    shapes = {(p.layer, p.module, p.kind): p.shape for p in manifest.parameters}
    assert shapes[(1, "k_proj", "B")] == (32, 4)
    assert shapes[(1, "q_proj", "B")] == (64, 4)
    assert shapes[(0, "down_proj", "A")] == (4, 176)
    assert shapes[(0, "up_proj", "B")] == (176, 4)
    # Exporter de-duplication guard: all-zero B matrices must not have been merged into one.
    training = onnx.load(str(artifacts_all_linear / manifest.files["training_model"]), load_external_data=False)
    graph_names = {i.name for i in training.graph.input} | {i.name for i in training.graph.initializer}
    assert all(p.onnx_name in graph_names for p in manifest.parameters)


def test_initialisation_gaussian_a_zero_b(artifacts):
    from onnxruntime.capi import _pybind_state as C

    manifest = Manifest.load(artifacts)
    state = C.load_checkpoint(str(artifacts / manifest.files["checkpoint"]))
    a = np.concatenate([state.get_parameter(p.onnx_name).data.numpy().ravel() for p in manifest.parameters if p.kind == "A"])
    for p in manifest.parameters:
        if p.kind == "B":
            assert not state.get_parameter(p.onnx_name).data.numpy().any()
    assert abs(a.std() - 1 / 8) < 0.01 and abs(a.mean()) < 0.01  # N(0, 1/r), r = 8
    assert manifest.lora["scaling"] == 2.0
    assert manifest.counts["trainable"] == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)


def test_qwen25_05b_shape_and_trainable_count():
    """The benchmark's Qwen2.5-0.5B shape (on the meta device: no weights): its parameter count, and
    r=8 on q_proj,v_proj."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ortlora.build.lora import inject_lora
    from ortlora.build.tiny import QWEN25_05B_CONFIG

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B_CONFIG))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B, tied embeddings
    names = inject_lora(model, ["q_proj", "v_proj"], 8, 16, 0.0, 0)
    params = dict(model.named_parameters())
    assert sum(params[n].numel() for n in names) == 540_672


@pytest.mark.parametrize("case", ["plain", "ignored", "padding"])
def test_loss_and_gradients_match_peft(artifacts, case):
    _check_against_peft(artifacts, case)


@pytest.mark.parametrize("case", ["ignored", "padding"])
def test_all_linear_with_label_smoothing_matches_peft(artifacts_all_linear, case):
    _check_against_peft(artifacts_all_linear, case)


@pytest.mark.parametrize("case", ["plain", "ignored"])
def test_untied_lm_head_matches_peft(artifacts_untied, case):
    _check_against_peft(artifacts_untied, case)


def test_equal_weights_stay_apart(tmp_path, tiny_model):
    """Weights of equal value (a fresh model's norms at exactly 1.0 and biases at 0.0, two layers with
    the same q_proj) are still one initializer each: the TorchScript exporter merges equal
    initializers unless told not to (export.torchscript_export); before, the build failed in
    generate_artifacts with "Duplicate definition of name (...post_attention_layernorm.weight_grad)"."""
    from safetensors.torch import load_file, save_file

    from ortlora.build.builder import BuildOptions, build
    from ortlora.weights import map_layout

    model_dir = tmp_path / "fresh"
    shutil.copytree(tiny_model, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    for name in weights:
        if name.endswith("norm.weight"):
            weights[name] = torch.ones_like(weights[name])
        elif name.endswith("bias"):
            weights[name] = torch.zeros_like(weights[name])
    weights["model.layers.1.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"].clone()
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "artifacts"
    build(BuildOptions(model_dir=model_dir, out_dir=out, bundle_base=True), echo=lambda *a, **k: None)

    # 26 parameters (tied LM head): embedding, final norm, and per layer 2 norms, q/k/v weight and bias,
    # o, gate, up, down. Each is one frozen weight named after its checkpoint tensor, with its own value;
    # linear weights are stored transposed, as NAME.T.
    manifest = Manifest.load(out)
    frozen = map_layout(out / manifest.files["frozen_weights"], manifest.frozen)
    assert len(frozen) == len(weights)  # 26 in the tiny model
    for name, value in weights.items():
        stored = frozen[name + ".T"].T if name.endswith("proj.weight") else frozen[name]
        np.testing.assert_array_equal(stored, value.numpy(), err_msg=name)
    for role in ("training_model", "eval_model", "portable_training_model"):
        graph = onnx.load(str(out / manifest.files[role]), load_external_data=False).graph
        assert set(manifest.frozen) <= {t.name for t in graph.initializer}, role
    lora = {p.onnx_name for p in manifest.parameters}
    for role in ("inference_model", "decoder_model"):  # exported apart: weights, LoRA defaults and nothing else
        graph = onnx.load(str(out / manifest.files[role]), load_external_data=False).graph
        assert len({t.name for t in graph.initializer} - lora) == len(weights), role

    for case in ("plain", "padding"):
        _check_against_peft(out, case)
    import onnxruntime as ort

    lora_weights = random_weights(manifest, seed=2)
    batch = make_batch(512, "plain")
    session = ort.InferenceSession(str(out / manifest.files["inference_model"]), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                      **lora_weights})[0]
    with torch.no_grad():
        ref = peft_model(out, lora_weights)(input_ids=torch.from_numpy(batch["input_ids"]),
                                            attention_mask=torch.from_numpy(batch["attention_mask"])).logits.numpy()
    assert rel_err(logits, ref) < TOL


def _check_against_peft(directory, case, backend_type=OrtTrainingBackend, base=None):
    """Loss, LoRA gradients and eval loss of ``backend_type`` on the artifacts against PyTorch + PEFT (on the
    artifacts' base model, or ``base``)."""
    manifest = Manifest.load(directory)
    for role in ("training_model", "eval_model"):  # spelled out: faster than ORT 1.19's kernels
        graph = onnx.load(str(directory / manifest.files[role]), load_external_data=False).graph
        assert not {n.op_type for n in graph.node} & set(SLOW_KERNELS), role
    weights = random_weights(manifest, seed=1)
    backend = backend_type(directory, manifest)
    backend.set_weights(weights)
    batch = make_batch(int(json.loads((directory / "config.json").read_text())["vocab_size"]), case)
    backend.zero_grad()
    loss = backend.train_step(batch)
    grads = backend.gradients()
    ref_loss, ref_grads = loss_and_grads(peft_model(directory, weights, base=base), manifest, batch,
                                         manifest.label_smoothing)
    assert abs(loss - ref_loss) / ref_loss < TOL
    worst = max(rel_err(grads[n], ref_grads[n]) for n in ref_grads)
    assert worst < TOL, worst
    assert backend.eval_loss(batch) == pytest.approx(ref_loss, rel=TOL)


def test_a_float16_source_matches_peft(tmp_path):
    """fp16 checkpoints build as bf16 and fp32 ones do: the frozen weights are their float32 values."""
    from ortlora.build.builder import BuildOptions, build
    from ortlora.build.tiny import create_random_model

    model_dir = create_random_model(tmp_path / "fp16", "tiny", seed=3, dtype="fp16")
    out = tmp_path / "artifacts"
    build(BuildOptions(model_dir=model_dir, out_dir=out), echo=lambda *a, **k: None)
    assert Manifest.load(out).model["source_dtype"] == "float16"
    for case in ("plain", "ignored"):
        _check_against_peft(out, case)


def test_a_disk_too_small_for_the_frozen_weights_is_refused_before_the_work(tmp_path, tiny_model, capsys, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from ortlora.build import cli

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1 << 20))
    assert cli.main(["--model", str(tiny_model), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "1.00 MiB free and the artifacts need 64.48 MiB" in err and "\n" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_inference_logits_match_transformers(artifacts):
    import onnxruntime as ort

    manifest = Manifest.load(artifacts)
    weights = random_weights(manifest, seed=2)
    batch = make_batch(512, "padding", seed=3)
    session = ort.InferenceSession(str(artifacts / manifest.files["inference_model"]), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **weights}
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = peft_model(artifacts, weights)(input_ids=torch.from_numpy(batch["input_ids"]),
                                             attention_mask=torch.from_numpy(batch["attention_mask"])).logits.numpy()
    valid = batch["attention_mask"].astype(bool)
    assert rel_err(logits[valid], ref[valid]) < TOL
    # Without LoRA inputs the initial weights (B = 0) are used: the base model's logits.
    base = session.run(["logits"], {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0]
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(artifacts / "base_model")(input_ids=torch.from_numpy(batch["input_ids"]),
                                                                              attention_mask=torch.from_numpy(batch["attention_mask"])).logits.numpy()
    assert rel_err(base[valid], plain[valid]) < TOL


def test_dropout_is_in_training_graph_only(tmp_path, tiny_model):
    from ortlora.build.builder import BuildOptions, build

    out = tmp_path / "dropout"
    build(BuildOptions(model_dir=tiny_model, out_dir=out, dropout=0.3), echo=lambda *a, **k: None)
    manifest = Manifest.load(out)
    ops = lambda name: {n.op_type for n in onnx.load(str(out / manifest.files[name]), load_external_data=False).graph.node}
    assert "Dropout" in ops("training_model")
    assert "Dropout" not in ops("eval_model") and "Dropout" not in ops("inference_model")
    backend = OrtTrainingBackend(out, manifest)
    backend.set_weights(random_weights(manifest, seed=4))
    batch = make_batch(512, "plain")
    assert backend.eval_loss(batch) == backend.eval_loss(batch)  # deterministic without dropout
    assert backend.train_step(batch) != backend.eval_loss(batch)


def _run_build(argv, capsys):
    code = build_cli.main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv_fn, message", [
    (lambda d, m: ["--model", str(d / "nope"), "--out", str(d / "o")], "does not exist"),
    (lambda d, m: ["--model", str(d), "--out", str(d / "o")], "no config.json"),
    (lambda d, m: ["--model", str(m), "--out", str(d / "o"), "--targets", "q_proj,wq"], "unknown target module"),
    (lambda d, m: ["--model", str(m), "--out", str(d / "o"), "--rank", "0"], "--rank must be a positive integer"),
])
def test_bad_build_input_is_one_line_error(tmp_path, tiny_model, capsys, argv_fn, message):
    code, err = _run_build(argv_fn(tmp_path, tiny_model), capsys)
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_other_architecture_and_missing_weights(tmp_path, tiny_model, capsys):
    llama = tmp_path / "llama"
    shutil.copytree(tiny_model, llama)
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    code, err = _run_build(["--model", str(llama), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "llama model" in err and "Qwen2" in err
    (llama / "config.json").write_text(json.dumps(config))
    (llama / "model.safetensors").unlink()
    code, err = _run_build(["--model", str(llama), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "no *.safetensors" in err


def test_existing_output_needs_force(artifacts, tiny_model, capsys):
    code, err = _run_build(["--model", str(tiny_model), "--out", str(artifacts)], capsys)
    assert code == 2 and "--force" in err


def test_failed_build_leaves_nothing_that_looks_complete(tmp_path, tiny_model, monkeypatch):
    from ortlora.build import builder, training_artifacts

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(training_artifacts, "generate", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        builder.build(builder.BuildOptions(model_dir=tiny_model, out_dir=out), echo=lambda *a, **k: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the staging directory is gone too
    assert not (out / MANIFEST_NAME).exists()


def test_models_over_the_protobuf_limit_are_saved_with_external_data(tmp_path_factory, tiny_model, monkeypatch, tmp_path):
    """The >2 GB path, on the tiny model: pretend every model is large."""
    import onnxruntime as ort

    from ortlora.build import export
    from tests.conftest import _build

    monkeypatch.setattr(export, "EXTERNAL_DATA_FROM", 0)
    monkeypatch.chdir(tmp_path)  # a stale data file in the current directory must not matter
    (tmp_path / "inference_model.onnx.data").write_bytes(b"stale")
    directory = _build(tmp_path_factory, tiny_model, "large")
    manifest = Manifest.load(directory)
    assert "inference_model.onnx.data" in manifest.files["external_data"]
    session = ort.InferenceSession(str(directory / manifest.files["inference_model"]), providers=["CPUExecutionProvider"])
    batch = make_batch(512, "plain")
    logits = session.run(["logits"], {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0]
    with torch.no_grad():
        ref = peft_model(directory)(input_ids=torch.from_numpy(batch["input_ids"]),
                                    attention_mask=torch.from_numpy(batch["attention_mask"])).logits.numpy()
    assert rel_err(logits, ref) < TOL
    backend = OrtTrainingBackend(directory, manifest)
    backend.set_weights(random_weights(manifest, seed=1))
    ref_loss, _ = loss_and_grads(peft_model(directory, random_weights(manifest, seed=1)), manifest, batch)
    assert backend.train_step(batch) == pytest.approx(ref_loss, rel=TOL)


def test_tied_lm_head_reads_the_embedding_itself(artifacts):
    """No second, transposed copy of the tied embedding in the frozen weights or any graph."""
    manifest = Manifest.load(artifacts)
    shapes = [tuple(p["shape"]) for p in manifest.frozen.values()]
    assert (512, 64) in shapes and (64, 512) not in shapes
    for role in ("training_model", "eval_model", "portable_training_model", "inference_model", "decoder_model"):
        graph = onnx.load(str(artifacts / manifest.files[role]), load_external_data=False).graph
        assert [list(t.dims) for t in graph.initializer].count([64, 512]) == 0, role
        assert any(n.op_type == "Gemm" and "model.embed_tokens.weight" in n.input for n in all_nodes(graph)), role


def all_nodes(graph: onnx.GraphProto):
    """The graph's nodes and those of its subgraphs (the chunked loss's Loop body)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attribute.g)


def test_frozen_weights_are_stored_once(artifacts):
    """ORT's checkpoint holds the LoRA weights only; every training graph reads the frozen file."""
    from onnxruntime.capi import _pybind_state as C

    manifest = Manifest.load(artifacts)
    state = C.load_checkpoint(str(artifacts / manifest.files["checkpoint"]))
    assert sorted(state.parameter_names()) == sorted(p.onnx_name for p in manifest.parameters)
    assert not list(artifacts.glob("*.data"))
    frozen_file = manifest.files["frozen_weights"]
    for role in ("training_model", "eval_model", "portable_training_model", "portable_eval_model"):
        graph = onnx.load(str(artifacts / manifest.files[role]), load_external_data=False).graph
        external = {t.name: {e.key: e.value for e in t.external_data} for t in graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL}
        assert set(external) == set(manifest.frozen), role
        assert all(e["location"] == frozen_file and int(e["offset"]) == manifest.frozen[n]["offset"]
                   for n, e in external.items()), role
    for role in ("inference_model", "decoder_model"):  # exported apart, yet no copy of their own
        graph = onnx.load(str(artifacts / manifest.files[role]), load_external_data=False).graph
        large = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) >= 4096]
        assert large and all({e.key: e.value for e in t.external_data}.get("location") == frozen_file for t in large), role
