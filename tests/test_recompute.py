"""Decoder layers recomputed in the backward pass (build/recompute.py, ``--recompute layers``): the same loss
and gradients as PyTorch + PEFT on both training graphs, and no layer's activations kept for the backward."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from ortlora.build.recompute import KEPT_OPS, LAYER, SUFFIX
from ortlora.manifest import Manifest
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.session_backend import OrtSessionBackend
from tests.test_build import _check_against_peft

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def recomputed(tmp_path_factory, tiny_model) -> Path:
    from ortlora.build.builder import BuildOptions, build

    out = tmp_path_factory.mktemp("artifacts") / "recomputed"
    build(BuildOptions(model_dir=tiny_model, out_dir=out, bundle_base=True, targets=ALL_LINEAR, rank=4, alpha=8.0,
                       label_smoothing=0.1, recompute="layers"), echo=lambda *a, **k: None)
    return out


@pytest.mark.parametrize("backend_type", [OrtTrainingBackend, OrtSessionBackend], ids=["ort-training", "portable"])
@pytest.mark.parametrize("case", ["plain", "padding"])
def test_recomputed_layers_give_pefts_loss_and_gradients(recomputed, case, backend_type):
    _check_against_peft(recomputed, case, backend_type)


@pytest.mark.parametrize("role", ["training_model", "portable_training_model"])
def test_the_backward_pass_reads_no_layer_activation(recomputed, role):
    """What each layer's backward pass reads from its forward pass is the copies' outputs, a Shape, a layer's
    output (the next one's input) or a LoRA dropout mask: nothing the copies compute is kept."""
    manifest = Manifest.load(recomputed)
    assert manifest.model["recompute"] == "layers"
    graph = onnx.load(str(recomputed / manifest.files[role]), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    copied = {node.name[: -len(SUFFIX)] for node in graph.node if node.name.endswith(SUFFIX)}
    assert {LAYER.match(name).group(1) for name in copied if LAYER.match(name)} == {"0", "1"}
    tainted, backward = {"loss_grad"}, []  # the backward pass: what the loss's gradient reaches
    for node in graph.node:
        if tainted & set(node.input):
            tainted.update(node.output)
            backward.append(node)

    def layer(name: str):
        found = LAYER.match(name)
        return found and found.group(1)

    backward_names = {node.name for node in backward}
    # a layer's outputs to the rest of the forward pass (the next layer's input, rotary tables it shares)
    escaping = {x for node in graph.node if node.name not in backward_names for x in node.input
                if x in producer and layer(producer[x].name) != layer(node.name)}
    for node in backward:
        for x in node.input:
            source = producer.get(x)
            if source is not None and source.name in copied:
                assert source.op_type in KEPT_OPS or x in escaping, (node.name, x)
