"""The fused LM-head gradient against ORT's own SoftmaxCrossEntropyLossGrad and matrix product."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortlora.build.head_gradient import fuse_head_gradient
from tests.reference import rel_err

RNG = np.random.default_rng(0)
ROWS, VOCAB, HIDDEN = 5, 11, 4
LABELS = np.array([1, -100, 10, 0, 3], np.int64)


def log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def head_gradient_model(product: str, transposed: bool, reduction: str, reshape: bool, extra_reader: bool = False):
    """dY, log_prob, labels -> SoftmaxCrossEntropyLossGrad -> [Reshape] -> product with the head weight."""
    weight = RNG.standard_normal((HIDDEN, VOCAB) if transposed else (VOCAB, HIDDEN)).astype(np.float32)
    nodes = [helper.make_node("SoftmaxCrossEntropyLossGrad", ["dy", "log_prob", "labels"], ["dlogits"],
                              domain="com.microsoft", reduction=reduction, ignore_index=-100)]
    rows = "dlogits"
    if reshape:
        nodes.append(helper.make_node("Reshape", ["dlogits", "rows_shape"], ["dlogits_2d"]))
        rows = "dlogits_2d"
    domain = "com.microsoft" if product == "FusedMatMul" else ""
    trans = {"transB": 1} if transposed else {}
    nodes.append(helper.make_node(product, [rows, "weight"], ["dhidden"], domain=domain, **trans))
    outputs = [helper.make_tensor_value_info("dhidden", TensorProto.FLOAT, None)]
    if extra_reader:  # the logit gradient is needed elsewhere too: nothing may be fused
        outputs.append(helper.make_tensor_value_info("dlogits", TensorProto.FLOAT, None))
    dy_shape = [ROWS] if reduction == "none" else []
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info("dy", TensorProto.FLOAT, dy_shape),
         helper.make_tensor_value_info("log_prob", TensorProto.FLOAT, [ROWS, VOCAB]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, [ROWS])],
        outputs,
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(np.array([ROWS, VOCAB], np.int64), "rows_shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("product,transposed", [("Gemm", False), ("Gemm", True), ("MatMul", False), ("FusedMatMul", True)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("reshape", [True, False])
def test_fused_head_gradient_matches_ort_kernels(product, transposed, reduction, reshape):
    reference = head_gradient_model(product, transposed, reduction, reshape)
    fused = onnx.ModelProto()
    fused.CopyFrom(reference)
    assert fuse_head_gradient(fused) == 1
    ops = {n.op_type for n in fused.graph.node}
    assert "SoftmaxCrossEntropyLossGrad" not in ops and "ScatterElements" not in ops
    feeds = {"dy": (RNG.standard_normal(ROWS) if reduction == "none" else np.array(1.7)).astype(np.float32),
             "log_prob": log_softmax(RNG.standard_normal((ROWS, VOCAB)).astype(np.float32)), "labels": LABELS}
    expected, got = run(reference, feeds), run(fused, feeds)
    assert got.shape == expected.shape == (ROWS, HIDDEN)
    assert not got[1].any()  # the ignored row
    assert rel_err(got, expected) < 1e-5


def test_a_logit_gradient_read_elsewhere_is_left_alone():
    model = head_gradient_model("Gemm", False, "mean", True, extra_reader=True)
    before = [n.op_type for n in model.graph.node]
    assert fuse_head_gradient(model) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_the_default_build_fuses_its_head_gradient(artifacts, artifacts_untied, artifacts_all_linear):
    """In the portable graph (ORT's training model chunks its loss instead: test_chunked_loss.py), tied and untied
    heads take the fused path; label smoothing (a second logit gradient) the generic one."""
    from ortlora.manifest import Manifest

    def ops(directory):
        path = directory / Manifest.load(directory).files["portable_training_model"]
        # the generic spelling of the loss gradient writes the logit gradient with a ScatterElements
        return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node
                if "SoftmaxCrossEntropyLoss" in n.name]

    assert "ScatterElements" not in ops(artifacts)
    assert "ScatterElements" not in ops(artifacts_untied)
    assert "ScatterElements" in ops(artifacts_all_linear)
