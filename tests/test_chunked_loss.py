"""The LM head's loss in chunks of rows (build/chunked_loss.py): same loss and gradients as PyTorch + PEFT's
whole cross-entropy, over many chunks with a padded last one, and no [rows, vocab] tensor outside a chunk."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from ortlora.build import chunked_loss
from ortlora.build.builder import BuildOptions, build
from ortlora.manifest import Manifest
from tests.test_build import _check_against_peft, all_nodes

CHUNK = 5  # rows: the test batches have 31 to 54 labelled rows, so 7 to 11 chunks, the last padded


@pytest.fixture(scope="module", params=[("tied", 0.1), ("untied", 0.0)], ids=["tied-smoothed", "untied"])
def chunked(request, tmp_path_factory, tiny_model) -> Path:
    from ortlora.build.tiny import create_random_model

    head, smoothing = request.param
    model = tiny_model if head == "tied" else create_random_model(tmp_path_factory.mktemp("model") / "untied", "tiny",
                                                                  seed=0, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("artifacts") / head
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunked_loss, "CHUNK_ROWS", CHUNK)
        build(BuildOptions(model_dir=model, out_dir=out, bundle_base=True, label_smoothing=smoothing,
                           targets=("q_proj", "v_proj", "o_proj")), echo=lambda *a, **k: None)
    return out


@pytest.mark.parametrize("case", ["plain", "ignored", "padding"])
def test_chunks_give_pefts_loss_and_gradients(chunked, case):
    _check_against_peft(chunked, case)


def test_the_head_is_multiplied_inside_the_loop_only(chunked):
    """The training and eval models read the LM head's weight in the Loop's body alone (the embedding's
    Gather aside): no product of the head, and so no [rows, vocab] tensor, outside a chunk."""
    manifest = Manifest.load(chunked)
    config = (chunked / "config.json").read_text()
    head = "model.embed_tokens.weight" if '"tie_word_embeddings": true' in config else "lm_head.weight"
    for role in ("training_model", "eval_model"):
        graph = onnx.load(str(chunked / manifest.files[role]), load_external_data=False).graph
        loops = [n for n in graph.node if n.op_type == "Loop"]
        assert len(loops) == 1, role
        outside = [n.op_type for n in graph.node if any(x.startswith(head) for x in n.input)]
        assert set(outside) <= {"Gather"}, (role, outside)
        inside = [n.op_type for n in all_nodes(loops[0].attribute[0].g) if any(x.startswith(head) for x in n.input)]
        assert {"Gemm", "MatMul"} & set(inside), (role, inside)
        assert not [n for n in graph.node if n.op_type in ("LogSoftmax", "SoftmaxCrossEntropyLoss")], role
