"""Decoder layers recomputed in the backward pass instead of keeping their activations (--recompute layers).

ORT's gradient graph keeps what each layer's backward pass reads from its forward pass: the MLP's gate
and up products and SiLU output, the attention's queries, keys, values and probabilities, the normalised
inputs. At 8 x 512 tokens on the 0.5B shape that is about 0.4 GB a layer. ``recompute_layers`` gives
each decoder layer's backward pass its own copy of the forward nodes that compute those tensors
(gradient checkpointing, as PyTorch's ``gradient_checkpointing_enable``): the forward pass then keeps a
layer's input and frees the rest once the layer is done, and the copies run when the backward pass
reaches the layer (a layer's output, the next layer's input, is kept). They read the layer's input and every other tensor from outside the layer through a
Reshape to its own shape, concatenated with an empty slice of the shape of a gradient the layer's
backward pass reads first: no data is copied, and no copy can run before the backward pass gets there
(nor be merged with the original by ONNX Runtime's common-subexpression elimination, its inputs
being other tensors). ONNX Runtime's own memory optimizer does not apply here (docs/performance.md).

Not recomputed: Shape (small, and its input may be what is freed), and Dropout (random: LoRA dropout's
output and mask are kept, so the copies see the same mask). A layer is the nodes the exporter names
/model/layers.N/ (module paths), in ORT's training model or the portable graph's source.
"""

from __future__ import annotations

import re
from collections import defaultdict

import onnx
from onnx import helper

MODES = ("none", "layers")
KEPT_OPS = {"Shape", "Size", "Dropout", "BitmaskDropout", "RandomNormal", "RandomNormalLike", "RandomUniform",
            "RandomUniformLike", "Multinomial"}
LAYER = re.compile(r"^/model/layers\.(\d+)/")
SUFFIX = "/recomputed"


def recompute_layers(model: onnx.ModelProto) -> int:
    """Give every decoder layer's backward pass recomputed copies of the activations it reads. Returns the
    number of layers rewritten."""
    graph = model.graph
    nodes = list(graph.node)
    seed = graph.output[0].name + "_grad"
    backward, tainted = set(), {seed}
    for i, node in enumerate(nodes):
        if any(x in tainted for x in node.input):
            backward.add(i)
            tainted.update(node.output)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    layers = defaultdict(set)
    for i, node in enumerate(nodes):
        found = LAYER.match(node.name)
        if found and i not in backward:
            layers[int(found.group(1))].add(i)

    # The forward pass's readers of each tensor, by their layer (None: outside every layer).
    forward_readers = defaultdict(set)
    for i, node in enumerate(nodes):
        if i not in backward:
            found = LAYER.match(node.name)
            for x in node.input:
                forward_readers[x].add(int(found.group(1)) if found else None)
    in_order = sorted(backward)

    inserted: dict[int, list[onnx.NodeProto]] = {}
    count = 0
    for layer, members in sorted(layers.items()):
        recomputable = {i for i in members if nodes[i].op_type not in KEPT_OPS}
        # The layer's output is the next layer's input, kept for that layer's copies anyway: not recomputed.
        saved = {x for i in in_order for x in nodes[i].input
                 if producer.get(x) in recomputable and not forward_readers[x] - {layer}}
        readers = [i for i in in_order if any(x in saved for x in nodes[i].input)]
        if not readers:
            continue
        copies, stack = set(), [producer[x] for x in saved]
        while stack:
            i = stack.pop()
            if i in copies:
                continue
            copies.add(i)
            stack.extend(producer[x] for x in nodes[i].input if producer.get(x) in recomputable)
        first = readers[0]
        trigger = next(x for x in nodes[first].input if x in tainted)
        outside = sorted({x for i in copies for x in nodes[i].input
                          if x and producer.get(x) not in copies and x in producer})
        new, renamed = _gates(outside, trigger, layer)
        renamed.update({out: out + SUFFIX for i in copies for out in nodes[i].output if out})
        for i in sorted(copies):
            copy = onnx.NodeProto()
            copy.CopyFrom(nodes[i])
            copy.name = nodes[i].name + SUFFIX
            _rename(copy, renamed)
            new.append(copy)
        for i in readers:
            for k, x in enumerate(nodes[i].input):
                if x in saved:
                    nodes[i].input[k] = renamed[x]
        inserted[first] = new
        count += 1
    del graph.node[:]
    graph.node.extend(new for i, node in enumerate(nodes) for new in [*inserted.get(i, []), node])
    return count


def _gates(tensors: list[str], trigger: str, layer: int) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """Each of ``tensors`` read through Reshape(x, Concat(Shape(x), Shape(trigger)[0:0])): the same tensor,
    available only once ``trigger`` is."""
    prefix = f"/model/layers.{layer}/recompute_gate"
    after = f"{prefix}/after"
    nodes = [helper.make_node("Shape", [trigger], [after], name=after, start=0, end=0)]
    renamed = {}
    for k, x in enumerate(tensors):
        shape, gated = f"{prefix}/shape_{k}", f"{prefix}/gated_{k}"
        nodes += [helper.make_node("Shape", [x], [shape + "/own"], name=shape + "/own"),
                  helper.make_node("Concat", [shape + "/own", after], [shape], name=shape, axis=0),
                  helper.make_node("Reshape", [x, shape], [gated], name=gated)]
        renamed[x] = gated
    return nodes, renamed


def _rename(node: onnx.NodeProto, renamed: dict[str, str]) -> None:
    for k, x in enumerate(node.input):
        node.input[k] = renamed.get(x, x)
    for k, x in enumerate(node.output):
        node.output[k] = renamed.get(x, x)
