"""The portable training graph: every rewrite against ORT's own training kernel, the whole graph
against ORT's training API and PyTorch + PEFT, and training with the newest plain onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ortlora.build import portable_ops
from ortlora.manifest import Manifest
from ortlora.runtime import cli as train_cli
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.checkpoint import load_adapter
from ortlora.runtime.session_backend import OrtSessionBackend
from tests.environments import needs, run_in
from tests.reference import loss_and_grads, peft_model, random_weights, rel_err
from tests.test_build import make_batch

TOL = 1e-4
INT64_MAX = np.iinfo(np.int64).max
RNG = np.random.default_rng(0)
F32 = TensorProto.FLOAT


def normal(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def log_softmax(x, axis=-1):
    shifted = x - x.max(axis=axis, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))).astype(np.float32)


def run_single(op: str, inputs: dict, outputs: dict, attrs: dict, domain: str, rewrite: bool, shapes=None, weights=(),
               distinct=frozenset()):
    """Run one node (or its portable rewrite) in an InferenceSession; inputs named "" are absent.

    ``shapes``: the outputs' shapes, which onnx.checker's full check of the rewrite wants declared.
    ``weights``: inputs given to the rewrite as weights (initializers of known shape).
    ``distinct``: inputs the rewrite may take to hold indices without repeats.
    """
    node = helper.make_node(op, list(inputs), list(outputs), domain=domain, **attrs)
    known = {n: list(inputs[n].shape) for n in weights}
    nodes = portable_ops.rewrite_node(node, known, distinct) if rewrite else [node]
    if rewrite:
        assert all(n.domain == "" for n in nodes), f"{op}: the rewrite left a non-standard node"
    graph = helper.make_graph(
        nodes, "single",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for n, v in inputs.items() if n],
        [helper.make_tensor_value_info(n, t, shapes[i] if shapes else None) for i, (n, t) in enumerate(outputs.items()) if n],
    )
    opsets = [helper.make_opsetid("", 17)] + ([] if rewrite else [helper.make_opsetid("com.microsoft", 1)])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    if rewrite:
        onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {n: v for n, v in inputs.items() if n})


rows, cols = 5, 7
labels = np.array([1, -100, 6, 0, 3], np.int64)
CASES = {
    "ConcatTraining": ({"a": normal(2, 3, 4), "b": normal(2, 5, 4)}, {"y": F32, "lengths": TensorProto.INT64}, {"axis": 1}),
    "ConcatTraining last axis": ({"a": normal(2, 3), "b": normal(2, 2)}, {"y": F32, "lengths": TensorProto.INT64}, {"axis": -1}),
    "SplitTraining": ({"x": normal(2, 8, 4), "split": np.array([3, 5], np.int64)}, {"y0": F32, "y1": F32}, {"axis": 1}),
    "SliceGrad": ({"dy": normal(2, 3, 4), "shape": np.array([2, 3, 8], np.int64), "starts": np.array([4], np.int64),
                   "ends": np.array([INT64_MAX], np.int64), "axes": np.array([-1], np.int64),
                   "steps": np.array([1], np.int64)}, {"dx": F32}, {}),
    "SliceGrad two axes": ({"dy": normal(2, 2, 3), "shape": np.array([2, 5, 8], np.int64),
                            "starts": np.array([1, 2], np.int64), "ends": np.array([3, -1], np.int64),
                            "axes": np.array([1, 2], np.int64), "steps": np.array([1, 2], np.int64)}, {"dx": F32}, {}),
    # Indices that may repeat: the one-hot product (repeats add up).
    "GatherGrad": ({"shape": np.array([6, 4], np.int64), "indices": np.array([1, 4, 1], np.int64), "dy": normal(3, 4)},
                   {"dx": F32}, {"axis": 0}),
    "GatherGrad negative indices": ({"shape": np.array([6, 4], np.int64), "indices": np.array([-1, 2, 5], np.int64),
                                     "dy": normal(3, 4)}, {"dx": F32}, {"axis": 0}),
    "GatherGrad 2-D indices": ({"shape": np.array([6, 2, 3], np.int64), "indices": np.array([[1, 4], [1, 0]], np.int64),
                                "dy": normal(2, 2, 2, 3)}, {"dx": F32}, {"axis": 0}),
    "GatherGrad 1-D data": ({"shape": np.array([6], np.int64), "indices": np.array([1, 4, 1], np.int64), "dy": normal(3)},
                            {"dx": F32}, {"axis": 0}),
    "SoftmaxCrossEntropyLoss": ({"scores": normal(rows, cols), "label": labels}, {"loss": F32, "log_prob": F32},
                                {"reduction": "mean", "ignore_index": -100}),
    "SoftmaxCrossEntropyLoss sum": ({"scores": normal(rows, cols), "label": np.abs(labels) % cols}, {"loss": F32},
                                    {"reduction": "sum"}),
    "SoftmaxCrossEntropyLoss none": ({"scores": normal(rows, cols), "label": labels}, {"loss": F32, "log_prob": F32},
                                     {"reduction": "none", "ignore_index": -100}),
    "SoftmaxCrossEntropyLossGrad": ({"dy": np.array(1.7, np.float32), "log_prob": log_softmax(normal(rows, cols)),
                                     "label": labels}, {"dx": F32}, {"reduction": "mean", "ignore_index": -100}),
    "SoftmaxCrossEntropyLossGrad sum": ({"dy": np.array(0.3, np.float32), "log_prob": log_softmax(normal(rows, cols)),
                                         "label": np.abs(labels) % cols}, {"dx": F32}, {"reduction": "sum"}),
    "SoftmaxCrossEntropyLossGrad none": ({"dy": normal(rows), "log_prob": log_softmax(normal(rows, cols)),
                                          "label": labels}, {"dx": F32}, {"reduction": "none", "ignore_index": -100}),
    "SoftmaxGrad_13": ({"dy": normal(2, 3, 5), "y": np.exp(log_softmax(normal(2, 3, 5)))}, {"dx": F32}, {"axis": -1}),
    "SoftmaxGrad_13 axis 1": ({"dy": normal(2, 3, 5), "y": np.exp(log_softmax(normal(2, 3, 5), 1))}, {"dx": F32}, {"axis": 1}),
    "LogSoftmaxGrad_13": ({"dy": normal(4, 6), "y": log_softmax(normal(4, 6))}, {"dx": F32}, {"axis": -1}),
    "QuickGelu": ({"x": normal(3, 8)}, {"y": F32}, {"alpha": 1.0}),
    "QuickGelu gelu": ({"x": normal(3, 8)}, {"y": F32}, {"alpha": 1.702}),
    "QuickGeluGrad": ({"dy": normal(3, 8), "x": normal(3, 8)}, {"dx": F32}, {"alpha": 1.0}),
    "QuickGeluGrad gelu": ({"dy": normal(3, 8), "x": normal(3, 8)}, {"dx": F32}, {"alpha": 1.702}),
    "SimplifiedLayerNormalization": ({"x": normal(2, 3, 8), "scale": normal(8)}, {"y": F32, "inv_std": F32},
                                     {"axis": -1, "epsilon": 1e-6}),
    "FusedMatMul": ({"a": normal(2, 3, 4, 5), "b": normal(5, 6)}, {"y": F32}, {}),
    "FusedMatMul transA": ({"a": normal(2, 3, 5, 4), "b": normal(5, 6)}, {"y": F32}, {"transA": 1, "alpha": 0.5}),
    "FusedMatMul transB": ({"a": normal(3, 4, 5), "b": normal(3, 6, 5)}, {"y": F32}, {"transB": 1}),
    "FusedMatMul transB weight": ({"a": normal(2, 3, 4, 5), "b": normal(6, 5)}, {"y": F32}, {"transB": 1, "alpha": 0.5}),
    "FusedMatMul transB 2-D weight": ({"a": normal(4, 5), "b": normal(6, 5)}, {"y": F32}, {"transB": 1}),
    "FusedMatMul both 2-D": ({"a": normal(5, 4), "b": normal(6, 5)}, {"y": F32}, {"transA": 1, "transB": 1, "alpha": 2.0}),
    "DropoutGrad": ({"dy": normal(4, 6), "mask": RNG.random((4, 6)) > 0.3, "ratio": np.array(0.3, np.float32),
                     "training_mode": np.array(True)}, {"dx": F32}, {}),
    # ORT's kernel applies the mask whatever training_mode says (a forward pass in eval mode has
    # an all-true mask); the rewrite does the same.
    "DropoutGrad eval": ({"dy": normal(4, 6), "mask": RNG.random((4, 6)) > 0.3, "ratio": np.array(0.3, np.float32),
                          "training_mode": np.array(False)}, {"dx": F32}, {}),
    "Scale": ({"x": normal(3, 4), "scale": np.array(0.25, np.float32)}, {"y": F32}, {}),
    "Sum": ({"a": normal(3, 4), "b": normal(4), "c": normal(3, 1)}, {"y": F32}, {}),
    "Neg": ({"x": normal(3, 4)}, {"y": F32}, {}),
    "Neg int64": ({"x": np.array([3, -7, 0], np.int64)}, {"y": TensorProto.INT64}, {}),
    "Scale down": ({"x": normal(3, 4), "scale": np.array(4.0, np.float32)}, {"y": F32}, {"scale_down": 1}),
    # Standard operators respelled for the providers (PROVIDER_SPELLINGS), against ORT's own kernel.
    "ReduceSum to a scalar": ({"x": normal(3, 4)}, {"y": F32}, {"keepdims": 0}),
    "ReduceSum with axes": ({"x": normal(3, 4), "axes": np.array([1], np.int64)}, {"y": F32}, {"keepdims": 0}),
    "ReduceMean to a scalar": ({"x": normal(2, 3, 4)}, {"y": F32}, {"keepdims": 0}),
    "Size": ({"x": normal(3, 4, 5)}, {"y": TensorProto.INT64}, {}),
    "Gemm square weight": ({"a": normal(5, 6), "b": normal(6, 6)}, {"y": F32}, {"transB": 1}),
    "Gemm square weight alpha": ({"a": normal(5, 6), "b": normal(6, 6)}, {"y": F32}, {"transB": 1, "alpha": 0.5}),
    "Gemm other weight": ({"a": normal(5, 6), "b": normal(4, 6)}, {"y": F32}, {"transB": 1}),
    # Dropout where the outcome is certain: evaluation mode, and training with ratio 0.
    "Dropout eval": ({"x": normal(3, 4), "ratio": np.array(0.3, np.float32), "training_mode": np.array(False)},
                     {"y": F32, "mask": TensorProto.BOOL}, {}),
    "Dropout ratio 0": ({"x": normal(3, 4), "ratio": np.array(0.0, np.float32), "training_mode": np.array(True)},
                        {"y": F32, "mask": TensorProto.BOOL}, {}),
}
STANDARD = {"SimplifiedLayerNormalization", "Sum", "Neg", "SoftmaxCrossEntropyLoss", "ReduceSum", "ReduceMean", "Size",
            "Gemm", "Dropout"}


@pytest.mark.parametrize("case", CASES)
def test_rewrite_matches_ort_kernel(case):
    op = case.split()[0]
    inputs, outputs, attrs = CASES[case]
    domain = "" if op in STANDARD else "com.microsoft"
    expected = run_single(op, inputs, outputs, attrs, domain, rewrite=False)
    weights = ["b"] if "weight" in case else []
    got = run_single(op, inputs, outputs, attrs, domain, rewrite=True, shapes=[e.shape for e in expected], weights=weights)
    for e, g in zip(expected, got):
        assert e.shape == g.shape and e.dtype == g.dtype
        if e.dtype.kind == "f":
            assert rel_err(g, e) < 1e-5, case
        else:
            np.testing.assert_array_equal(g, e)


def test_gather_grad_at_distinct_positions_is_a_scatter_without_reduction():
    inputs = {"shape": np.array([7, 4], np.int64), "indices": np.array([0, 2, 3, 6], np.int64), "dy": normal(4, 4)}
    node = helper.make_node("GatherGrad", list(inputs), ["dx"], domain="com.microsoft", axis=0)
    nodes = portable_ops.rewrite_node(node, distinct={"indices"})
    assert [n.op_type for n in nodes if n.op_type.startswith("Scatter")] == ["ScatterND"]
    assert not any(a.name == "reduction" for n in nodes for a in n.attribute)
    (expected,) = run_single("GatherGrad", inputs, {"dx": F32}, {"axis": 0}, "com.microsoft", rewrite=False)
    (got,) = run_single("GatherGrad", inputs, {"dx": F32}, {"axis": 0}, "com.microsoft", rewrite=True,
                        shapes=[expected.shape], distinct={"indices"})
    np.testing.assert_array_equal(got, expected)


def test_dropout_in_training_mode_keeps_about_one_minus_ratio_scaled():
    x = np.ones((200, 50), np.float32)
    inputs = {"x": x, "ratio": np.array(0.25, np.float32), "training_mode": np.array(True)}
    y, mask = run_single("Dropout", inputs, {"y": F32, "mask": TensorProto.BOOL}, {}, "", rewrite=True,
                         shapes=[x.shape, x.shape])
    assert 0.72 < mask.mean() < 0.78  # 10,000 draws: 0.75 +- 0.005 (one standard deviation 0.0043)
    np.testing.assert_array_equal(y, np.where(mask, np.float32(1 / 0.75), np.float32(0)))


def test_slice_grad_with_negative_steps_matches_numpy():
    # ORT's own SliceGrad kernel fails on negative steps (narrowing_error): numpy is the reference.
    dy = normal(2, 2, 4)
    inputs = {"dy": dy, "shape": np.array([2, 5, 8], np.int64), "starts": np.array([-1, 1], np.int64),
              "ends": np.array([-9, 3], np.int64), "axes": np.array([2, 1], np.int64), "steps": np.array([-2, 1], np.int64)}
    (got,) = run_single("SliceGrad", inputs, {"dx": F32}, {}, "com.microsoft", rewrite=True, shapes=[(2, 5, 8)])
    expected = np.zeros((2, 5, 8), np.float32)
    expected[:, 1:3, -1:-9:-2] = dy
    np.testing.assert_array_equal(got, expected)


def test_layer_norm_grad_matches_ort_kernel():
    x, scale, dy = normal(2, 3, 8), normal(8), normal(2, 3, 8)
    _, inv_std = run_single("SimplifiedLayerNormalization", {"x": x, "scale": scale}, {"y": F32, "inv_std": F32},
                            {"axis": -1, "epsilon": 1e-6}, "", rewrite=False)
    inputs = {"dy": dy, "x": x, "scale": scale, "inv_std": inv_std}
    attrs = {"axis": -1, "epsilon": 1e-6}
    (expected, _) = run_single("SimplifiedLayerNormalizationGrad", inputs, {"dx": F32, "dscale": F32}, attrs,
                               "com.microsoft", rewrite=False)
    (got,) = run_single("SimplifiedLayerNormalizationGrad", inputs, {"dx": F32, "": F32}, attrs, "com.microsoft",
                        rewrite=True, shapes=[expected.shape])
    assert rel_err(got, expected) < 1e-5


def test_unknown_operator_is_named():
    node = helper.make_node("YieldOp", ["x"], ["y"], domain="com.microsoft", name="yield")
    with pytest.raises(portable_ops.UnsupportedNode, match="YieldOp"):
        portable_ops.rewrite_node(node)


# -- the whole graph -----------------------------------------------------------------------------

def portable_loss_and_grads(artifacts: Path, weights: dict, batch: dict) -> tuple[float, dict]:
    backend = OrtSessionBackend(artifacts, Manifest.load(artifacts))
    backend.set_weights(weights)
    loss = backend.train_step(batch)
    return loss, backend.gradients()


@pytest.mark.parametrize("fixture", ["artifacts", "artifacts_all_linear"])
def test_portable_graph_is_standard_onnx(fixture, request):
    directory = request.getfixturevalue(fixture)
    manifest = Manifest.load(directory)
    for role in ("portable_training_model", "portable_eval_model", "portable_training_cpu_model"):
        path = directory / manifest.files[role]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert {n.domain for n in model.graph.node} == {""}
        assert [o.domain for o in model.opset_import] == [""]
    for role in ("portable_training_model", "portable_training_cpu_model"):
        training = onnx.load(str(directory / manifest.files[role]), load_external_data=False)
        assert [i.name for i in training.graph.input] == manifest.io["portable_training"]["inputs"]
        assert [o.name for o in training.graph.output] == manifest.io["portable_training"]["outputs"]
    # Frozen weights live once, in the shared external file, not inside either graph.
    assert all(t.data_location == TensorProto.EXTERNAL for t in training.graph.initializer if len(t.dims) == 2)


def provider_problems(model: onnx.ModelProto) -> list[str]:
    """The nodes an execution provider was seen to refuse or to compute wrongly (docs/providers.md)."""
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        what = None
        if node.op_type in ("ScatterND", "ScatterElements") and a.get("reduction", b"none") != b"none":
            what = f"reduction {a['reduction'].decode()}"  # OpenVINO's reader: "Only `none` is supported"
        elif node.op_type.startswith("Reduce") and a.get("keepdims", 1) == 0 and len(node.input) < 2 and "axes" not in a:
            what = "a reduction to a 0-d tensor"  # OpenVINO's provider leaves it to the CPU
        elif node.op_type == "Size":
            what = "Size (a 0-d output)"
        elif node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            what = "Dropout with training_mode"  # OpenVINO's reader: "Training mode is not supported"
        elif node.op_type == "Gemm" and a.get("transB") and len(weights.get(node.input[1], [])) == 2 \
                and weights[node.input[1]][0] == weights[node.input[1]][1]:
            what = "a square weight transposed"  # OpenVINO's CPU plugin multiplies by it untransposed
        elif any("/" in out for out in node.output):
            what = "an output name with '/'"  # OpenVINO's provider cuts names there
        if what:
            problems.append(f"{node.op_type} {node.name}: {what}")
    return problems


@pytest.fixture(scope="module")
def artifacts_dropout(tmp_path_factory, tiny_model) -> Path:
    from tests.conftest import _build

    return _build(tmp_path_factory, tiny_model, "dropout", dropout=0.5)


@pytest.mark.parametrize("fixture", ["artifacts", "artifacts_all_linear", "artifacts_untied", "artifacts_dropout"])
def test_portable_graphs_hold_only_what_providers_take(fixture, request):
    directory = request.getfixturevalue(fixture)
    manifest = Manifest.load(directory)
    for role in ("portable_training_model", "portable_eval_model"):
        model = onnx.load(str(directory / manifest.files[role]), load_external_data=False)
        assert provider_problems(model) == [], role
    training = onnx.load(str(directory / manifest.files["portable_training_model"]), load_external_data=False)
    # The last layer's two gathers at the labelled positions (its attention output and its residual)
    # are the only gathers with a gradient; their positions are distinct, so each is one ScatterND
    # without reduction, never the one-hot product.
    assert [n.op_type for n in training.graph.node].count("ScatterND") == 2
    assert not any(n.op_type == "Equal" and "GatherGrad" in n.name for n in training.graph.node)


def test_distinct_positions_are_the_nonzero_positions_of_a_vector():
    from ortlora.build.portable_graph import distinct_positions

    axis_1 = helper.make_tensor("axis_1", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("NonZero", ["keep"], ["nz"]),
        helper.make_node("Transpose", ["nz"], ["nz_t"], perm=[1, 0]),
        helper.make_node("Squeeze", ["nz_t", "axis_1"], ["positions"]),
        helper.make_node("Squeeze", ["labels", "axis_1"], ["labels_1d"]),  # not from NonZero: may repeat
        helper.make_node("Transpose", ["nz"], ["nz_t2"]),  # default perm reverses: [1, 0] too
        helper.make_node("Constant", [], ["axis_0"], value=helper.make_tensor("c", TensorProto.INT64, [1], [0])),
        helper.make_node("Squeeze", ["nz_t2", "axis_0"], ["coordinates"]),  # axis 0: one position's coordinates
    ]
    assert distinct_positions(nodes, [axis_1]) == {"positions"}


def test_names_without_slash_renames_computed_tensors_only():
    from ortlora.build.portable_graph import names_without_slash

    nodes = [helper.make_node("Relu", ["/in/x"], ["/a/b"], name="/a/Relu"),
             helper.make_node("Relu", ["/a/b"], [".a.b"]),  # already taken: the rename gets a suffix
             helper.make_node("Add", ["/a/b", ".a.b"], ["/out/y"])]
    names_without_slash(nodes, keep={"/in/x", "/out/y"})
    assert [(list(n.input), list(n.output)) for n in nodes] == [
        (["/in/x"], [".a.b_1"]), ([".a.b_1"], [".a.b"]), ([".a.b_1", ".a.b"], ["/out/y"])]
    assert nodes[0].name == "/a/Relu"


def test_problems_are_found_in_the_old_spellings():
    """provider_problems sees each thing it looks for (so the test above can pass for a reason)."""
    weight = helper.make_tensor("w", F32, [4, 4], np.zeros(16, np.float32))
    nodes = [
        helper.make_node("ScatterND", ["d", "i", "u"], ["a"], name="s", reduction="add"),
        helper.make_node("ReduceSum", ["x"], ["b"], name="r", keepdims=0),
        helper.make_node("Size", ["x"], ["c"], name="z"),
        helper.make_node("Dropout", ["x", "", "t"], ["e"], name="d"),
        helper.make_node("Gemm", ["x", "w"], ["f"], name="g", transB=1),
        helper.make_node("Relu", ["x"], ["/model/h"], name="n"),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [], [], [weight]))
    assert len(provider_problems(model)) == 6


@pytest.mark.parametrize("fixture, case", [("artifacts", "plain"), ("artifacts", "ignored"), ("artifacts", "padding"),
                                           ("artifacts_all_linear", "ignored")])
def test_portable_loss_and_gradients_match_training_api_and_pytorch(fixture, case, request):
    directory = request.getfixturevalue(fixture)
    manifest = Manifest.load(directory)
    weights = random_weights(manifest, seed=5)
    batch = make_batch(512, case, seed=2)
    loss, grads = portable_loss_and_grads(directory, weights, batch)

    api = OrtTrainingBackend(directory, manifest)
    api.set_weights(weights)
    api_loss = api.train_step(batch)
    api_grads = api.gradients()
    ref_loss, ref_grads = loss_and_grads(peft_model(directory, weights), manifest, batch, manifest.label_smoothing)
    assert abs(loss - api_loss) / abs(api_loss) < TOL
    assert abs(loss - ref_loss) / abs(ref_loss) < TOL
    for name in grads:
        assert rel_err(grads[name], api_grads[name]) < TOL, name
        assert rel_err(grads[name], ref_grads[name]) < TOL, name


def test_the_cpu_provider_runs_the_head_a_chunk_of_rows_at_a_time(artifacts, copy):
    """Its portable training graph has the LM head's products and loss in a Loop, as ORT's training model has them:
    outside it the head's weight is read only by the embedding. Artifacts without that graph (older builds) train
    on the whole-head one, to the same numbers."""
    manifest = Manifest.load(artifacts)
    graph = onnx.load(str(artifacts / manifest.files["portable_training_cpu_model"]), load_external_data=False).graph
    assert [n.op_type for n in graph.node].count("Loop") == 1
    assert [n.op_type for n in graph.node if "model.embed_tokens.weight" in n.input] == ["Gather"]
    whole = onnx.load(str(artifacts / manifest.files["portable_training_model"]), load_external_data=False).graph
    assert "Loop" not in [n.op_type for n in whole.node]

    weights, batch = random_weights(manifest, seed=5), make_batch(512, "ignored", seed=2)
    chunked = OrtSessionBackend(artifacts, manifest)
    assert chunked._roles["portable_training"] == manifest.files["portable_training_cpu_model"]
    chunked.set_weights(weights)
    loss = chunked.train_step(batch)
    data = json.loads((copy / "ortlora.json").read_text())
    del data["files"]["portable_training_cpu_model"]
    (copy / "ortlora.json").write_text(json.dumps(data))
    older = OrtSessionBackend(copy, Manifest.load(copy))
    assert older._roles["portable_training"] == manifest.files["portable_training_model"]
    older.set_weights(weights)
    assert abs(older.train_step(batch) - loss) / abs(loss) < 1e-6
    for name, grad in chunked.gradients().items():
        assert rel_err(grad, older.gradients()[name]) < 1e-5, name


def test_portable_eval_loss_and_accumulation(artifacts):
    manifest = Manifest.load(artifacts)
    backend = OrtSessionBackend(artifacts, manifest)
    backend.set_weights(random_weights(manifest, seed=1))
    a, b = make_batch(512, "plain", seed=1), make_batch(512, "padding", seed=3)
    loss_a = backend.train_step(a)
    grads_a = backend.gradients()
    backend.train_step(b)
    summed = backend.gradients()
    backend.zero_grad()
    backend.train_step(b)
    grads_b = backend.gradients()
    for name in summed:  # gradients add up across micro-batches until zero_grad, as in ORT's training API
        np.testing.assert_allclose(summed[name], grads_a[name] + grads_b[name], rtol=1e-5, atol=1e-7)
    assert backend.eval_loss(a) == pytest.approx(loss_a, rel=1e-6)
    assert backend.placement == {"CPUExecutionProvider": backend.placement["CPUExecutionProvider"]}


@pytest.mark.parametrize("backend_type", [OrtTrainingBackend, OrtSessionBackend])
def test_weights_and_gradients_are_copies_that_later_steps_leave_alone(artifacts, backend_type):
    """Backend.weights() and gradients() hand out copies: what a caller holds (a snapshot to go back to, the weights
    to restore after a probe, one batch's gradients beside the next's) does not follow set_weights, zero_grad or
    the next step. ORT's training API once handed out views of its buffers."""
    manifest = Manifest.load(artifacts)
    backend = backend_type(artifacts, manifest)
    held = backend.weights()
    kept = {name: value.copy() for name, value in held.items()}
    backend.set_weights(random_weights(manifest, seed=1))
    for name, value in held.items():
        np.testing.assert_array_equal(value, kept[name])
    backend.train_step(make_batch(512, "ignored", seed=6))
    held = backend.gradients()
    kept = {name: value.copy() for name, value in held.items()}
    backend.zero_grad()
    backend.train_step(make_batch(512, "ignored", seed=7))
    for name, value in held.items():
        np.testing.assert_array_equal(value, kept[name])


def train(artifacts, out, *args):
    return train_cli.main(["--artifacts", str(artifacts), "--out", str(out), "--no-progress", "--no-plot", *args])


def test_training_and_resume_match_the_training_api(artifacts, tmp_path):
    common = ["--max-steps", "6", "--grad-accum", "2", "--schedule", "warmup-cosine", "--lr", "5e-3"]
    assert train(artifacts, tmp_path / "api", "--backend", "ort-training", *common) == 0
    assert train(artifacts, tmp_path / "session", "--backend", "ort-session", *common, "--save-every", "3") == 0
    # Resuming with the portable backend continues exactly.
    assert train(artifacts, tmp_path / "resumed", "--resume", str(tmp_path / "session" / "checkpoint-3")) == 0
    manifest = Manifest.load(artifacts)
    api = load_adapter(tmp_path / "api" / "checkpoint-6", manifest)
    for run in ("session", "resumed"):
        got = load_adapter(tmp_path / run / "checkpoint-6", manifest)
        assert max(rel_err(got[n], api[n]) for n in api) < 1e-4, run
    summary = json.loads((tmp_path / "session" / "summary.json").read_text())
    assert summary["nodes_per_provider"]["CPUExecutionProvider"] > 100


def test_dropout_only_in_the_portable_training_graph(artifacts_dropout):
    directory = artifacts_dropout
    manifest = Manifest.load(directory)
    training = onnx.load(str(directory / manifest.files["portable_training_model"]), load_external_data=False)
    evaluation = onnx.load(str(directory / manifest.files["portable_eval_model"]), load_external_data=False)
    # Training-mode Dropout is spelled with its random draw (portable_ops.dropout): 2 layers x q, v.
    assert [n.op_type for n in training.graph.node].count("RandomUniformLike") == 4
    assert not any(n.op_type in ("Dropout", "RandomUniformLike") for n in evaluation.graph.node)
    backend = OrtSessionBackend(directory, manifest)
    backend.set_weights(random_weights(manifest, seed=1))
    batch = make_batch(512, "plain")
    losses = {backend.train_step(batch) for _ in range(3)}
    assert len(losses) == 3  # fresh dropout masks every step
    assert backend.eval_loss(batch) == backend.eval_loss(batch)
    assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in backend.gradients().values())


# -- the newest plain onnxruntime, in its own environment -----------------------------------------

@needs("plain-ort")
def test_newest_plain_onnxruntime_trains_like_the_training_api(artifacts, tmp_path):
    manifest = Manifest.load(artifacts)
    weights = random_weights(manifest, seed=7)
    batch = make_batch(512, "ignored", seed=4)
    np.savez(tmp_path / "in.npz", **{f"w:{k}": v for k, v in weights.items()}, **{f"b:{k}": v for k, v in batch.items()})
    version = run_in("plain-ort", f"""
        import json, sys
        import numpy as np, onnxruntime
        from onnxruntime.capi import _pybind_state as C
        from ortlora.manifest import Manifest
        from ortlora.runtime.session_backend import OrtSessionBackend
        assert not hasattr(C, "Module"), "this environment must not hold a training build"
        assert "torch" not in sys.modules
        data = np.load(r"{tmp_path / 'in.npz'}")
        from pathlib import Path
        backend = OrtSessionBackend(Path(r"{artifacts}"), Manifest.load(r"{artifacts}"))
        backend.set_weights({{k[2:]: data[k] for k in data.files if k.startswith("w:")}})
        loss = backend.train_step({{k[2:]: data[k] for k in data.files if k.startswith("b:")}})
        np.savez(r"{tmp_path / 'out.npz'}", loss=loss, **backend.gradients())
        from ortlora.runtime.cli import main
        common = ["--artifacts", r"{artifacts}", "--no-progress", "--no-plot", "--max-steps", "6", "--lr", "5e-3"]
        assert main([*common, "--out", r"{tmp_path / 'plain'}", "--save-every", "3"]) == 0
        assert main(["--resume", r"{tmp_path / 'plain' / 'checkpoint-3'}", "--out", r"{tmp_path / 'plain-resumed'}",
                     "--no-progress", "--no-plot"]) == 0
        print(json.dumps({{"onnxruntime": onnxruntime.__version__}}))
    """)["onnxruntime"]
    assert tuple(int(p) for p in version.split(".")[:2]) >= (1, 20), version

    out = np.load(tmp_path / "out.npz")
    api = OrtTrainingBackend(artifacts, manifest)
    api.set_weights(weights)
    assert float(out["loss"]) == pytest.approx(api.train_step(batch), rel=TOL)
    api_grads = api.gradients()
    for name in api_grads:
        assert rel_err(out[name], api_grads[name]) < TOL, name

    assert train(artifacts, tmp_path / "api", "--backend", "ort-training", "--max-steps", "6", "--lr", "5e-3") == 0
    reference = load_adapter(tmp_path / "api" / "checkpoint-6", manifest)
    for run in ("plain", "plain-resumed"):
        got = load_adapter(tmp_path / run / "checkpoint-6", manifest)
        assert max(rel_err(got[n], reference[n]) for n in reference) < 1e-4, run


def test_build_without_the_training_build_says_so(monkeypatch, tiny_model, tmp_path, capsys):
    from ortlora.build import cli as build_cli
    from ortlora.runtime import backend

    monkeypatch.setattr(backend, "has_training_api", lambda: False)
    assert build_cli.main(["--model", str(tiny_model), "--out", str(tmp_path / "out")]) == 2
    assert "needs onnxruntime-training-cpu 1.19.2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
