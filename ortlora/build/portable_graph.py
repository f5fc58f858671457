"""The portable training graph: ORT's gradient graph rewritten into standard ONNX.

ONNX Runtime's training packages ended at 1.19.2, and the training model that
``generate_artifacts`` writes uses operators only training builds implement (ConcatTraining,
SliceGrad, SoftmaxCrossEntropyLossGrad, InPlaceAccumulatorV2, ...). Each of them is a few lines of
standard ONNX, so the build rewrites that model into one any ONNX Runtime can run with an
InferenceSession, on any execution provider:

    inputs   input_ids, attention_mask, labels, and every LoRA weight (by its ONNX name)
    outputs  loss, and NAME_grad, the gradient of every LoRA weight
    frozen   weights are initializers (external data in frozen_weights.bin, which every training
             graph reads)

The contrib operators of ORT's forward graph (FusedMatMul, QuickGelu, SimplifiedLayerNormalization)
are decomposed too, so the result is plain ai.onnx opset 17 and passes ``onnx.checker``'s full
check. The rewrites of single operators are in portable_ops.py; they also respell a few standard
operators that execution providers refuse or compute wrongly (PROVIDER_SPELLINGS), in both graphs.

The pipeline, in order (make_portable):

    _strip_accumulators   ORT's gradient accumulators off (the runtime accumulates)
    _live_nodes           only what the loss and the LoRA gradients need
    distinct_positions    which index tensors cannot repeat (gather gradients need no reduction there)
    rewrite_node          every node in standard ONNX, spelled for the providers
    names_without_slash   computed tensors renamed without "/" (OpenVINO's provider cuts names there)
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper, numpy_helper

from ortlora.build import openvino_precision, openvino_quantized, quantize
from ortlora.build.portable_ops import (
    PROVIDER_SPELLINGS,
    UnsupportedNode,
    attrs,
    is_standard,
    local_names,
    read_names,
    rewrite_node,
    subgraphs,
)
from ortlora.build.training_artifacts import disable_dropout, spell_out_slow_kernels

OPSET = 17
ACCUMULATOR = "InPlaceAccumulatorV2"
GRAD_SUFFIX = "_grad"


# -- the whole graph ---------------------------------------------------------------------------

def make_portable(training_model: onnx.ModelProto, lora_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """Turn ORT's training model (whose frozen weights are initializers, as ``generate`` leaves them) into the
    portable training graph. ``lora_shapes``: every LoRA weight by ONNX name, in the order the
    gradients are to be output.
    """
    graph = training_model.graph
    lora_names = list(lora_shapes)
    grads = _strip_accumulators(graph, set(lora_names))
    missing = [n for n in lora_names if n not in grads]
    if missing:
        raise UnsupportedNode(f"the training model has no gradient for {missing[:3]}")

    loss = graph.output[0]
    outputs = [loss] + [helper.make_tensor_value_info(n + GRAD_SUFFIX, TensorProto.FLOAT, lora_shapes[n]) for n in lora_names]
    renames = [helper.make_node("Identity", [grads[n]], [n + GRAD_SUFFIX]) for n in lora_names if grads[n] != n + GRAD_SUFFIX]
    live = _live_nodes(list(graph.node) + renames, [o.name for o in outputs])
    weights = {t.name: list(t.dims) for t in graph.initializer}
    distinct = distinct_positions(live, graph.initializer)
    nodes = in_order([new for node in live for new in rewrite_node(node, weights, distinct)])

    feeds = {"input_ids", "attention_mask", "labels", *lora_names}
    inputs = [i for i in graph.input if i.name in feeds]
    used = {name for node in nodes for name in read_names(node)}
    initializers = [t for t in graph.initializer if t.name in used]
    absent = [i.name for i in graph.input if i.name not in feeds and i.name in used]
    if absent:
        raise UnsupportedNode(f"no value for the frozen inputs {absent[:3]}")

    names_without_slash(nodes, keep={i.name for i in inputs} | {o.name for o in outputs} | {t.name for t in initializers})
    portable = helper.make_graph(nodes, "ortlora_portable_training", inputs, outputs, initializers)
    model = helper.make_model(portable, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ortlora")
    model.ir_version = 10
    if quantize.opset_of(training_model) > OPSET:  # a quantized base: DequantizeLinear's blocks need opset 21
        quantize.raise_opset(model)
    return model


def _strip_accumulators(graph: onnx.GraphProto, lora: set[str]) -> dict[str, str]:
    """Drop ORT's gradient accumulators (the runtime accumulates); return parameter -> gradient tensor."""
    grads, kept = {}, []
    for node in graph.node:
        if node.op_type == ACCUMULATOR:
            buffer, value = node.input[0], node.input[1]
            param = buffer.split(GRAD_SUFFIX + ".accumulation.buffer")[0]
            if param in lora:
                grads[param] = value
            continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return grads


def _live_nodes(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in their original (topological) order."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    needed, stack, live = set(), list(outputs), set()
    while stack:
        name = stack.pop()
        if name in needed or name not in producer:
            needed.add(name)
            continue
        needed.add(name)
        index = producer[name]
        if index not in live:
            live.add(index)
            stack.extend(read_names(nodes[index]))  # a Loop's body's reads from the graph too
    result = []
    for i, node in enumerate(nodes):
        if i in live:
            # Outputs nobody reads become optional (""), so rewrites skip computing them.
            for k, out in enumerate(node.output):
                if k > 0 and out and out not in needed and not is_standard(node):
                    node.output[k] = ""
            result.append(node)
    return result


def in_order(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes sorted so that each comes after those it reads from (a Loop's body's reads too), otherwise in their
    order. chunked_loss appends the Loop and the loss after it, after backward nodes that read them; ONNX Runtime
    sorts a graph itself, but ONNX requires the order."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    placed, order = [False] * len(nodes), []
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, ready = stack.pop()
            if placed[i]:
                continue
            if ready:
                placed[i] = True
                order.append(nodes[i])
                continue
            stack.append((i, True))
            stack.extend((producer[name], False) for name in reversed(read_names(nodes[i]))
                         if name in producer and not placed[producer[name]] and producer[name] != i)
    return order


def distinct_positions(nodes: list[onnx.NodeProto], initializers) -> set[str]:
    """Tensors holding positions that cannot repeat: the nonzero positions of a 1-D tensor.

    The loss graph gathers the labelled rows at ``nonzero(labels != ignore_index).squeeze(1)``
    (export.py), which the exporter writes as NonZero -> Transpose -> Squeeze(axis 1). Squeezing
    axis 1 succeeds only where NonZero's input was 1-D, and NonZero lists each position once, so the
    gradient of a gather at these indices writes every row once and needs no summing
    (portable_ops.gather_grad). Any other index tensor is taken to possibly repeat.
    """
    constants = {t.name: t for t in initializers if t.data_location != TensorProto.EXTERNAL}
    constants.update({n.output[0]: n.attribute[0].t for n in nodes if n.op_type == "Constant"
                      and n.attribute and n.attribute[0].name == "value"})
    producer = {out: node for node in nodes for out in node.output if out}

    def axes(node: onnx.NodeProto) -> list[int] | None:
        if "axes" in attrs(node):
            return list(attrs(node)["axes"])
        value = constants.get(node.input[1]) if len(node.input) > 1 else None
        return None if value is None else numpy_helper.to_array(value).reshape(-1).tolist()

    found = set()
    for node in nodes:
        if node.op_type != "Squeeze" or axes(node) not in ([1], [-1]):  # NonZero's output is 2-D: -1 is axis 1
            continue
        transpose = producer.get(node.input[0])
        if transpose is None or transpose.op_type != "Transpose" or attrs(transpose).get("perm", [1, 0]) != [1, 0]:
            continue
        nonzero = producer.get(transpose.input[0])
        if nonzero is not None and nonzero.op_type == "NonZero":
            found.add(node.output[0])
    return found


def names_without_slash(nodes: list[onnx.NodeProto], keep: set[str]) -> None:
    """Rename every tensor the nodes compute so that it has no "/" (in place; "/" becomes ".").

    The exporter names tensors after module paths (/model/layers.0/self_attn/Reshape_output_0).
    Where OpenVINO's provider takes part of a graph and folds a tensor it hands back to a constant,
    it looks the tensor up by its name cut at the first "/" and fails ("Output names mismatch between
    OpenVINO and ONNX", onnxruntime-openvino 1.24). Graph inputs, outputs and weights (``keep``)
    keep their names; node names keep theirs too (profiles show them).
    """
    taken = set(keep) | {out for node in nodes for out in node.output}
    renamed: dict[str, str] = {}
    for node in nodes:
        for out in node.output:
            if "/" not in out or out in keep or out in renamed:
                continue
            new = base = out.replace("/", ".")
            suffix = 0
            while new in taken:
                suffix += 1
                new = f"{base}_{suffix}"
            taken.add(new)
            renamed[out] = new
    for node in nodes:
        _rename_reads(node, renamed)
        for k, name in enumerate(node.output):
            node.output[k] = renamed.get(name, name)


def _rename_reads(node: onnx.NodeProto, renamed: dict[str, str]) -> None:
    """``node``'s inputs renamed, and what its subgraphs (a Loop's body) read from the graph."""
    for k, name in enumerate(node.input):
        node.input[k] = renamed.get(name, name)
    for inner in subgraphs(node):
        local = local_names(inner)
        outer = {name: new for name, new in renamed.items() if name not in local}
        for n in inner.node:
            _rename_reads(n, outer)


# -- files -------------------------------------------------------------------------------------

PORTABLE_TRAINING = "portable_training.onnx"
PORTABLE_EVAL = "portable_eval.onnx"
# A bf16, int8 or int4 base's portable graphs as OpenVINO's provider takes them (unordered_widening,
# openvino_quantized.compressed_products); and every base's for --precision bf16 on OpenVINO, the same with fp32
# kept where autocast keeps it (openvino_precision), which costs OpenVINO's fp32 runs speed and memory.
OPENVINO_TRAINING = "portable_training_openvino.onnx"
OPENVINO_EVAL = "portable_eval_openvino.onnx"
OPENVINO_BF16_TRAINING = "portable_training_openvino_bf16.onnx"
OPENVINO_BF16_EVAL = "portable_eval_openvino_bf16.onnx"
# The CPU provider's training graph: the LM head and its loss in a Loop over row chunks, as ORT's training model
# has them (chunked_loss.py), so that no [tokens, vocab] tensor is whole (0.5B shape, 8 x 512, onnxruntime 1.32:
# 23,366 MB with the head whole, 17,623 MB in the Loop). Only there: OpenVINO's reader refuses the Loop, and a provider
# without Loop kernels would run it on the CPU, copying the head's weight to the device each chunk.
CPU_TRAINING = "portable_training_cpu.onnx"


def eval_graph(loss_model: onnx.ModelProto, weights: dict[str, TensorProto], lora_shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto:
    """The forward loss graph with the LoRA weights as inputs and without dropout."""
    graph = loss_model.graph
    lora_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in lora_shapes.items()]
    inputs = [i for i in graph.input if i.name not in lora_shapes] + lora_inputs
    initializers = [weights[t.name] for t in graph.initializer if t.name not in lora_shapes]
    result = helper.make_graph(graph.node, "ortlora_portable_eval", inputs, list(graph.output), initializers)
    model = helper.make_model(result, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ortlora")
    model.ir_version = 10
    disable_dropout(model)  # evaluation runs without dropout
    spell_out_slow_kernels(model)
    dims = {t.name: list(t.dims) for t in graph.initializer}
    nodes = [new for node in model.graph.node
             for new in (rewrite_node(node, dims) if node.op_type in PROVIDER_SPELLINGS else [node])]
    names_without_slash(nodes, keep={i.name for i in inputs} | {o.name for o in graph.output} | {t.name for t in initializers})
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if quantize.opset_of(loss_model) > OPSET:
        quantize.raise_opset(model)
    return model


def write(loss_model: onnx.ModelProto, training_model: onnx.ModelProto, chunked_model: onnx.ModelProto,
          frozen: dict[str, TensorProto], lora_shapes: dict[str, tuple[int, ...]], out_dir: Path) -> None:
    """Write the portable training and eval graphs into ``out_dir``.

    ``loss_model``: the exported loss graph. ``training_model``: ORT's training model with the loss
    whole, and ``chunked_model`` with it in a Loop, as training_artifacts.generate returns them. ``frozen``:
    references into the frozen weights file (frozen_weights.py), which the eval graph reads (the training models
    already do).
    """
    evaluation, training = eval_graph(loss_model, frozen, lora_shapes), make_portable(training_model, lora_shapes)
    onnx.save(evaluation, str(out_dir / PORTABLE_EVAL))
    onnx.save(training, str(out_dir / PORTABLE_TRAINING))
    onnx.save(make_portable(chunked_model, lora_shapes), str(out_dir / CPU_TRAINING))
    stored = frozen_precision(frozen)
    if stored != "fp32":  # OpenVINO's spelling of the base
        spell = unordered_widening if stored == "bf16" else openvino_quantized.compressed_products
        evaluation, training = spell(evaluation), spell(training)
        onnx.save(evaluation, str(out_dir / OPENVINO_EVAL))
        onnx.save(training, str(out_dir / OPENVINO_TRAINING))
    onnx.save(openvino_precision.fp32_as_autocast(evaluation), str(out_dir / OPENVINO_BF16_EVAL))
    onnx.save(openvino_precision.fp32_as_autocast(training), str(out_dir / OPENVINO_BF16_TRAINING))


def frozen_precision(frozen: dict[str, TensorProto]) -> str:
    """bf16, int8 / int4 (quantized) or fp32: how the frozen weights are stored."""
    if any(t.data_type == TensorProto.BFLOAT16 for t in frozen.values()):
        return "bf16"
    return "quantized" if any(t.data_type in quantize.PRECISION_OF for t in frozen.values()) else "fp32"


def unordered_widening(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a bf16 base's graph in which each Cast reads its matrix (or row view) directly, not through
    the empty slice of another tensor's Shape that orders it after its product's other operand
    (quantize._widened). ONNX Runtime's CPU provider needs that order; OpenVINO's provider compiles the graph
    whole and fails on it (an empty tensor crossing from a CPU-provider node into an OpenVINO subgraph:
    "Tensor data equal nullptr"), while Convert into MatMul is the weight decompression its CPU plugin runs on
    compressed weights."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    bf16 = {t.name for t in graph.initializer if t.data_type == TensorProto.BFLOAT16}
    same: dict[str, str] = {}  # output of a Reshape of a matrix to its own shape -> the matrix
    nodes = []
    for node in quantize.without_ordering_slices(graph.node):
        if node.op_type == "Reshape" and node.input[0] in bf16:
            same[node.output[0]] = node.input[0]
            continue
        for k, name in enumerate(node.input):
            node.input[k] = same.get(name, name)
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(_live_nodes(nodes, [o.name for o in graph.output]))  # (portable graphs have no subgraphs)
    return model
