"""The LM head's loss in chunks of rows (build/chunked_loss.py): same loss and gradients as PyTorch + PEFT's
whole cross-entropy, over many chunks with a padded last one, and no [rows, vocab] tensor outside a chunk; with a bf16
base, whose head is read a chunk of the vocabulary at a time, no [rows, vocab] tensor at all."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from ortlora.build import chunked_loss, quantize
from ortlora.build.builder import BuildOptions, build
from ortlora.manifest import Manifest
from tests.test_build import _check_against_peft, all_nodes

CHUNK = 5  # rows: the test batches have 31 to 54 labelled rows, so 7 to 11 chunks, the last padded


@pytest.fixture(scope="module", params=[("tied", 0.1, "fp32"), ("untied", 0.0, "fp32"), ("tied", 0.1, "bf16")],
                ids=["tied-smoothed", "untied", "bf16-tied-smoothed"])
def chunked(request, tmp_path_factory, tiny_model) -> tuple[Path, Path | None]:
    """(artifacts, the reference model: None for the base itself). The bf16 build reads its 512-row head in
    vocabulary chunks of 100 rows (quantize.CHUNK_ROWS), against the head widened as torch rounds it."""
    from ortlora.build.tiny import create_random_model
    from tests.test_bf16_base import widened_model

    head, smoothing, precision = request.param
    model = tiny_model if head == "tied" else create_random_model(tmp_path_factory.mktemp("model") / "untied", "tiny",
                                                                  seed=0, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("artifacts") / f"{head}-{precision}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunked_loss, "CHUNK_ROWS", CHUNK)
        patch.setattr(quantize, "CHUNK_ROWS", 100)
        build(BuildOptions(model_dir=model, out_dir=out, bundle_base=True, label_smoothing=smoothing,
                           targets=("q_proj", "v_proj", "o_proj"), base_precision=precision), echo=lambda *a, **k: None)
    reference = widened_model(model, tmp_path_factory.mktemp("reference") / "model") if precision == "bf16" else None
    return out, reference


@pytest.mark.parametrize("case", ["plain", "ignored", "padding"])
def test_chunks_give_pefts_loss_and_gradients(chunked, case):
    artifacts, reference = chunked
    _check_against_peft(artifacts, case, base=reference)


def test_a_bf16_head_is_read_a_vocabulary_chunk_at_a_time(chunked):
    """With a bf16 base, each row chunk's logits are computed and used one chunk of the vocabulary at a time (the
    head's row views): the Loop's body holds no product of the whole head, no concatenation and no log-softmax, so
    no [rows, vocab] tensor."""
    artifacts, reference = chunked
    if reference is None:
        pytest.skip("a float32 base multiplies its whole head")
    manifest = Manifest.load(artifacts)
    views = {n for n, v in manifest.frozen_views.items() if v["of"] == "model.embed_tokens.weight"}
    assert len(views) == 6  # ceil(512 / 100)
    for role in ("training_model", "eval_model"):
        graph = onnx.load(str(artifacts / manifest.files[role]), load_external_data=False).graph
        (loop,) = [n for n in graph.node if n.op_type == "Loop"]
        body = list(all_nodes(loop.attribute[0].g))
        products = {n.output[0] for n in body if n.op_type in ("Gemm", "MatMul")}
        assert not {"LogSoftmax", "Softmax"} & {n.op_type for n in body}, role
        assert not [n for n in body if n.op_type == "Concat" and products & set(n.input)], role
        assert views <= {x for n in body for x in n.input}, role
        assert {n.op_type for n in body if "model.embed_tokens.weight" in n.input} <= {"Gather"}, role  # label rows


def test_the_head_is_multiplied_inside_the_loop_only(chunked):
    """The training and eval models read the LM head's weight in the Loop's body alone (the embedding's
    Gather aside): no product of the head, and so no [rows, vocab] tensor, outside a chunk."""
    chunked, _ = chunked
    manifest = Manifest.load(chunked)
    config = (chunked / "config.json").read_text()
    head = "model.embed_tokens.weight" if '"tie_word_embeddings": true' in config else "lm_head.weight"
    for role in ("training_model", "eval_model"):
        graph = onnx.load(str(chunked / manifest.files[role]), load_external_data=False).graph
        loops = [n for n in graph.node if n.op_type == "Loop"]
        assert len(loops) == 1, role
        outside = [n.op_type for n in graph.node if any(x.startswith(head) for x in n.input)]
        assert set(outside) <= {"Gather", "Cast"}, (role, outside)  # a bf16 base widens the gathered rows
        inside = [n.op_type for n in all_nodes(loops[0].attribute[0].g) if any(x.startswith(head) for x in n.input)]
        assert {"Gemm", "MatMul"} & set(inside), (role, inside)
        assert not [n for n in graph.node if n.op_type in ("LogSoftmax", "SoftmaxCrossEntropyLoss")], role
