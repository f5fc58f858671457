"""dense_loss.every_position: the portable graphs without NonZero and LogSoftmax (for onnxruntime-ggml) give the
default graphs' loss and gradients on the CPU provider; builds that cannot have them (label smoothing) have none.
ggml itself runs them in tests/test_plugin_eps.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ortlora.build import dense_loss
from ortlora.build.portable_ops import UnsupportedNode
from ortlora.manifest import Manifest
from tests.reference import random_weights, rel_err
from tests.test_build import make_batch
from tests.test_portable import provider_problems


def run(path, feeds: dict) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.parametrize("case", ["ignored", "plain"])
def test_every_position_gives_the_default_graphs_loss_and_gradients(artifacts, case):
    manifest = Manifest.load(artifacts)
    files = manifest.files
    assert files["portable_training_ggml_model"] == "portable_training_ggml.onnx"
    assert files["portable_eval_ggml_model"] == "portable_eval_ggml.onnx"
    feeds = {**random_weights(manifest, seed=3), **make_batch(512, case, seed=6)}
    if case == "ignored":  # prompts, padding and a row with nothing trained: ignored rows are computed and weigh 0
        assert 0 < (feeds["labels"] != -100).mean() < 0.9
    for role in ("portable_training", "portable_eval"):
        default = run(artifacts / files[f"{role}_model"], feeds)
        dense = run(artifacts / files[f"{role}_ggml_model"], feeds)
        assert list(dense) == list(default)
        for name in default:  # seen: loss 6.6e-8, gradients 5.1e-7 at most (fp32 sums in another order)
            assert rel_err(dense[name], default[name]) < 1e-5, (role, name)


def test_every_position_holds_neither_nonzero_nor_log_softmax(artifacts):
    manifest = Manifest.load(artifacts)
    for role in ("portable_training", "portable_eval"):
        default = onnx.load(str(artifacts / manifest.files[f"{role}_model"]), load_external_data=False)
        dense = onnx.load(str(artifacts / manifest.files[f"{role}_ggml_model"]), load_external_data=False)
        onnx.checker.check_model(str(artifacts / manifest.files[f"{role}_ggml_model"]), full_check=True)
        ops, before = [n.op_type for n in dense.graph.node], [n.op_type for n in default.graph.node]
        assert before.count("NonZero") == 1 and before.count("LogSoftmax") == 1
        assert not set(ops) & {"NonZero", "LogSoftmax"}, role
        assert ops.count("ReduceMax") == 1 and ops.count("Log") == 1 and ops.count("Range") == before.count("Range") + 1
        assert provider_problems(dense) == [], role  # what OpenVINO was seen to refuse: nothing new either
        assert [i.name for i in dense.graph.input] == [i.name for i in default.graph.input]
        assert [o.name for o in dense.graph.output] == [o.name for o in default.graph.output]


def test_log_softmax_spelled_out_is_the_kernels_at_extreme_values(tmp_path):
    x = np.array([[1e4, 0.0, -1e4, 3.0], [-50.0, -50.0, -50.0, -50.0], [88.0, 89.0, -1e30, 0.5]], np.float32)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("NonZero", ["keep"], ["nz"]), helper.make_node("LogSoftmax", ["x"], ["y"], axis=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])]), opset_imports=[helper.make_opsetid("", 17)])
    spelled = helper.make_model(helper.make_graph(dense_loss._log_softmax(model.graph.node[1], 17), "g",
                                                  list(model.graph.input)[:1], list(model.graph.output)),
                                opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = spelled.ir_version = 10  # onnxruntime-training 1.19 loads IR 10 at most
    onnx.save(model, tmp_path / "kernel.onnx")
    onnx.save(spelled, tmp_path / "spelled.onnx")
    kernel = run(tmp_path / "kernel.onnx", {"x": x, "keep": np.ones(5, bool)})["y"]
    np.testing.assert_allclose(run(tmp_path / "spelled.onnx", {"x": x})["y"], kernel, rtol=1e-6, atol=1e-6)
    # A NonZero that does not pick labelled positions is not replaced by every position.
    with pytest.raises(UnsupportedNode, match="expected one NonZero of labels != ignore_index"):
        dense_loss.every_position(model)


def test_label_smoothing_builds_have_no_ggml_graphs(artifacts_all_linear):
    """Smoothing's term averages the labelled rows' log-probabilities, which ignored rows would enter."""
    files = Manifest.load(artifacts_all_linear).files
    assert not [role for role in files if "ggml" in role]
    assert not (artifacts_all_linear / dense_loss.GGML_TRAINING).exists()
