"""A bf16 frozen base (--base-precision bf16) against PyTorch + PEFT on the same weights widened to float32.

The reference rounds the checkpoint's matrices to bfloat16 in torch (``tensor.to(torch.bfloat16)``), so the
build's rounding, the stored bits, ONNX Runtime's Cast and the graph rewrites are all checked against code
that shares nothing with them. bfloat16 widens to float32 exactly, so the two compute on the same values:
the tolerance is fp32's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ortlora.build import quantize
from ortlora.build.builder import BuildOptions, build
from ortlora.manifest import Manifest
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.session_backend import OrtSessionBackend
from ortlora.weights import is_bf16, map_layout
from tests.environments import needs, python_of
from tests.reference import assert_same_adapters, transformers_greedy
from tests.test_build import _check_against_peft, all_nodes
from tests.test_quantized import _optimized, check_inference_and_decoder, errors_in

TOL = 1e-5


def widened_model(model_dir: Path, out: Path) -> Path:
    """A float32 copy of the model whose matrices are rounded to bfloat16 as torch rounds (norms and biases
    as they are: the build keeps them float32)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    weights = {name: (value.to(torch.bfloat16) if value.ndim == 2 else value).float() for name, value in weights.items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32", "dtype": "float32"}))
    return out


@pytest.fixture(scope="module", params=[("fp32", True, 200), ("bf16", False, 100)],
                ids=["fp32-source-tied-head", "bf16-source-untied-head"])
def bf16_base(request, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(artifacts, the source model, the float32 reference model). Both builds widen the 512-row LM head for
    its products in chunks (of 200 or 100 rows), as the vocabulary's 151,936 rows are in chunks of
    quantize.CHUNK_ROWS."""
    from ortlora.build.tiny import create_random_model

    dtype, tied, chunk_rows = request.param
    model = create_random_model(tmp_path_factory.mktemp("model") / dtype, "tiny", seed=4, dtype=dtype,
                                tie_word_embeddings=tied)
    out = tmp_path_factory.mktemp("artifacts") / dtype
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, "CHUNK_ROWS", chunk_rows)
        build(BuildOptions(model_dir=model, out_dir=out, bundle_base=True, base_precision="bf16"),
              echo=lambda *a, **k: None)
    return out, model, widened_model(model, tmp_path_factory.mktemp("reference") / "model")


def test_the_stored_matrices_are_the_checkpoints_bits_or_torchs_rounding(bf16_base):
    from safetensors.torch import load_file

    artifacts, source, _ = bf16_base
    manifest = Manifest.load(artifacts)
    assert manifest.model["base_precision"] == "bf16" and "block_size" not in manifest.model
    stored = map_layout(artifacts / manifest.files["frozen_weights"], manifest.frozen)
    for name, value in load_file(source / "model.safetensors").items():
        if value.ndim == 1:  # norms and biases: float32, the checkpoint's values
            np.testing.assert_array_equal(stored[name], value.float().numpy(), err_msg=name)
            continue
        key = name if name in stored else name + ".T"  # the projections are stored transposed, [in, out]
        assert is_bf16(stored[key]) and manifest.frozen[key]["dtype"] == "bfloat16", name
        bits = value.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(stored[key], bits.T if key.endswith(".T") else bits, err_msg=name)
    matrices = sum(2 * int(np.prod(p["shape"])) for p in manifest.frozen.values() if len(p["shape"]) == 2)
    assert sum(p["length"] for p in manifest.frozen.values() if len(p["shape"]) == 2) == matrices


def test_every_use_widens_its_own_copy_when_it_is_needed(bf16_base):
    """No graph holds a float32 copy of a frozen matrix: each reader has a Cast of its own, which runs when the
    product's other operand is ready (it reads the matrix through a Reshape that depends on that operand), so
    the float32 matrices do not all live at once; the vocabulary matrix is read in chunks of rows, each an
    initializer of its own over those rows' bytes of the file (no Slice copies them)."""
    artifacts, _, _ = bf16_base
    manifest = Manifest.load(artifacts)
    head = "model.embed_tokens.weight" if "lm_head.weight" not in manifest.frozen else "lm_head.weight"
    place = manifest.frozen[head]
    row = place["length"] // place["shape"][0]
    chunks = [v["rows"] for v in manifest.frozen_views.values() if v["of"] == head]  # of 100 or 200 rows
    assert len(chunks) >= 3 and chunks[0][0] == 0 and chunks[-1][1] == place["shape"][0] == 512
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    for role in ("training_model", "eval_model", "portable_training_model", "portable_eval_model",
                 "inference_model", "decoder_model"):
        model = onnx.load(str(artifacts / manifest.files[role]), load_external_data=False)
        initializers = {t.name: t for t in model.graph.initializer}
        matrices = [n for n, p in [*manifest.frozen.items(), *manifest.frozen_views.items()]
                    if len(p.get("shape", [0, 0])) == 2 and n in initializers]
        assert matrices and all(initializers[n].data_type == onnx.TensorProto.BFLOAT16 for n in matrices), role
        nodes = list(all_nodes(model.graph))
        readers = [n for n in nodes if set(n.input) & set(matrices)]
        assert {n.op_type for n in readers} <= {"Reshape", "Slice", "Gather"}, (role, {n.op_type for n in readers})
        constant = set(initializers) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        early = [n.name for n in readers if n.op_type != "Gather" and all(x in constant for x in n.input if x)]
        assert not early, (role, early[:3])
        # The head is read whole only by Gathers (the embedding's, the head gradient's label rows), and is no
        # initializer where nothing reads it whole (an untied head outside the training graphs).
        assert {n.op_type for n in nodes if head in n.input} <= {"Gather"}, role
        assert head not in initializers or any(head in n.input for n in nodes), role
        if role in ("training_model", "portable_training_model"):  # the head's product and its input gradient
            views = {n: v for n, v in manifest.frozen_views.items() if v["of"] == head}
            assert sum(n.op_type == "Reshape" and n.input[0] in views for n in nodes) == 2 * len(chunks), role
            for name, view in views.items():
                at = {e.key: int(e.value) for e in initializers[name].external_data if e.key != "location"}
                assert at == {"offset": place["offset"] + view["rows"][0] * row,
                              "length": (view["rows"][1] - view["rows"][0]) * row}, (role, name)


@pytest.mark.parametrize("case", ["plain", "ignored", "padding"])
@pytest.mark.parametrize("backend_type", [OrtTrainingBackend, OrtSessionBackend], ids=["ort-training", "ort-session"])
def test_loss_and_gradients_match_peft_on_the_widened_base(bf16_base, case, backend_type, monkeypatch):
    import tests.test_build as test_build

    artifacts, _, reference = bf16_base
    monkeypatch.setattr(test_build, "TOL", TOL)
    _check_against_peft(artifacts, case, backend_type, base=reference)


def test_inference_and_decoder_logits_match_the_widened_base(bf16_base):
    artifacts, _, reference = bf16_base
    check_inference_and_decoder(artifacts, reference, TOL)


def test_training_resume_generation_and_every_export_work_on_a_bf16_base(bf16_base, tmp_path, capsys):
    """Training resumes exactly, its header naming the bf16 base; greedy generation gives transformers' tokens on
    the widened base with the same adapter; the PEFT, merged, ONNX and ONNX-adapter exports run (merges read the
    original checkpoint)."""

    from ortlora.handoff import cli as export_cli
    from ortlora.runtime import cli as train_cli
    from ortlora.runtime.generate import Generator, Sampling

    artifacts, _, reference = bf16_base
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train_cli.main(["--artifacts", str(artifacts), "--out", str(full), "--max-steps", "4", "--save-every", "2",
                           "--lr", "0.02", "--no-progress", "--no-plot"]) == 0
    assert " stored as bf16; LoRA r=8 on " in capsys.readouterr().out.splitlines()[0]
    assert train_cli.main(["--resume", str(full / "checkpoint-2"), "--out", str(resumed), "--no-progress",
                           "--no-plot"]) == 0
    assert_same_adapters(full / "checkpoint-4", resumed / "checkpoint-4")
    assert json.loads((full / "summary.json").read_text())["steps"] == 4

    adapter = full / "checkpoint-4"
    generator = Generator(artifacts, adapter)
    prompt = generator.prompt(messages=[{"role": "user", "content": "What is 2 plus 3?"}])
    ours = generator.generate(prompt, Sampling(max_new_tokens=16))
    expected = transformers_greedy(reference, adapter, prompt, 16)
    assert len(expected) >= 3 and ours.tokens == expected
    for target in ("peft", "merged", "onnx", "onnx-adapter"):
        assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(adapter), "--to", target,
                                "--out", str(tmp_path / target)]) == 0, target


@pytest.mark.parametrize("environment", ["training", pytest.param("plain-ort", marks=needs("plain-ort"))])
def test_onnx_runtime_makes_no_float32_copy_of_a_matrix(bf16_base, tmp_path, environment):
    """ONNX Runtime's graph optimizations (constant folding) fold no Cast into a float32 copy of a matrix, on the
    training build and on the newest plain onnxruntime alike."""
    import sys

    artifacts, _, _ = bf16_base
    python = sys.executable if environment == "training" else str(python_of("plain-ort"))
    optimized = _optimized(python, artifacts, tmp_path)
    for role in ("portable_training_model", "inference_model"):
        assert not optimized[role]["float_matrices"], (optimized["onnxruntime"], role, optimized[role])


@needs("plain-ort")
def test_the_newest_plain_onnxruntime_trains_a_bf16_base(bf16_base, tmp_path):
    """The plain package takes the mapped bfloat16 weights too (runtime/frozen.py hands them over as DLPack)."""
    artifacts, _, reference = bf16_base
    errors = errors_in("plain-ort", artifacts, reference, tmp_path)
    assert errors["loss"] < TOL and errors["gradients"] < TOL


def test_a_nan_in_a_bf16_matrix_is_refused_in_one_line(bf16_base, tmp_path, capsys):
    from ortlora.runtime import cli as train_cli

    artifacts, _, _ = bf16_base
    copy = tmp_path / "artifacts"
    shutil.copytree(artifacts, copy)
    manifest = Manifest.load(copy)
    name = next(n for n, p in manifest.frozen.items() if p["dtype"] == "bfloat16")
    with open(copy / manifest.files["frozen_weights"], "r+b") as f:
        f.seek(manifest.frozen[name]["offset"] + 6)
        f.write(np.array([0x7FC0], np.uint16).tobytes())  # a bfloat16 NaN
    assert train_cli.main(["--artifacts", str(copy), "--out", str(tmp_path / "run"), "--max-steps", "1",
                           "--no-progress", "--no-plot"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "NaN or infinite" in err and name in err and "\n" not in err


@needs("openvino")
def test_openvino_trains_a_bf16_base_on_its_own_graphs(bf16_base, tmp_path):
    """OpenVINO's provider fails on the ordered widening the CPU provider needs; it runs the bf16 base's
    OpenVINO graphs instead, which give PyTorch + PEFT's loss and gradients on the widened base (fp32 hint)."""
    artifacts, _, reference = bf16_base
    assert {"portable_training_openvino_model", "portable_eval_openvino_model"} <= set(Manifest.load(artifacts).files)
    errors = errors_in("openvino", artifacts, reference, tmp_path, ep="openvino")
    assert errors["placement"].get("OpenVINOExecutionProvider"), errors
    assert errors["loss"] < 1e-4 and errors["eval_loss"] < 1e-4
    assert errors["gradients"] < 1e-4  # OpenVINO's fp32, as tests/test_openvino.py
