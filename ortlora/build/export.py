"""Export the LoRA-injected model to ONNX: a loss graph for training and a logits graph for inference.

The LoRA weights enter both exports as graph *inputs*, so constant folding cannot rename or
transpose them; ``inputs_to_initializers`` turns them back into named initializers afterwards.
The build exports the weightless skeleton (skeleton.py), whose frozen weights are graph inputs too,
named after the checkpoint (``frozen``): frozen_weights.py stores them and points the graphs at them.

No export depends on weight values: every export goes through ``torchscript_export``, which turns
off the exporter's merging of initializers with identical values (see there), so a freshly
initialised model (every norm weight 1.0, every bias 0.0) exports the same graph as a trained one.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ortlora.build.lora import external_lora_weights

IGNORE_INDEX = -100
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime-training 1.19 loads IR <= 10


def _at_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).index_select(0, rows)


def _decoder_layer_at_rows(layer: nn.Module, rows: torch.Tensor, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """Qwen2's decoder layer with its output computed at ``rows`` (flat batch x sequence indices) only.

    Every position's keys and values still go into the attention, but the output projection, the
    residual adds and the MLP run at ``rows``, and the result is [rows, hidden].
    """
    residual = _at_rows(hidden_states, rows)
    hook = layer.self_attn.o_proj.register_forward_pre_hook(lambda _, args: (_at_rows(args[0], rows),))
    try:
        attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
    finally:
        hook.remove()
    hidden = residual + attention
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@contextlib.contextmanager
def last_layer_at_rows(decoder: nn.Module, rows: torch.Tensor):
    """Run ``decoder`` (a Qwen2Model) with its last layer computing its output at ``rows`` only.

    Nothing reads the last layer's output at ignored positions, so its output projection and MLP
    skip them (the norm after it is per row, so it does not mind). The layer keeps its place in the
    module tree, so the exported graph keeps its node and weight names.
    """
    last = decoder.layers[-1]
    last.forward = functools.partial(_decoder_layer_at_rows, last, rows)
    try:
        yield decoder
    finally:
        del last.forward


def segment_attention(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss graphs' attention_mask, [batch, seq] segment ids -> (additive mask [batch, 1, seq, seq], positions).

    0 is padding, and 1, 2, ... number the examples packed into a row (a plain row is all 1, then 0s). A
    position attends to the positions of its own segment up to itself, and its position id counts from the
    segment's start, so each packed example is computed exactly as if it were alone in its row (as
    transformers' padding-free collator makes flash attention do). Padding attends to padding, so no row of
    the mask is empty (an empty row would make the softmax 0/0, and its NaN would reach the gradients).
    """
    index = torch.arange(segments.shape[1], device=segments.device)
    allowed = (segments[:, :, None] == segments[:, None, :]) & (index[None, :] <= index[:, None])[None]
    positions = allowed.sum(-1) - 1
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None], positions


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy over positions whose (already shifted) label is not ignored.

    Ignored positions (padding, masked prompts) cost no vocabulary projection and no softmax: hidden
    states are gathered at labelled positions before the LM head, and in the last layer already
    after the attention (``last_layer_at_rows``). With label smoothing e the loss is
    (1 - e) * nll + e * mean_over_vocab(-log p), as torch.nn.functional.cross_entropy.
    """

    def __init__(self, model: nn.Module, lora_names: list[str], label_smoothing: float):
        super().__init__()
        self.model = model
        self.lora_names = lora_names
        self.label_smoothing = label_smoothing

    def forward(self, input_ids, attention_mask, labels, *weights):
        lora = weights[: len(self.lora_names)]  # any frozen weights after them reach the modules themselves
        flat_labels = labels.reshape(-1)
        keep = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(1)
        with external_lora_weights(self.model, dict(zip(self.lora_names, lora))), \
                last_layer_at_rows(self.model.model, keep) as decoder:
            mask, positions = segment_attention(attention_mask)
            rows = decoder(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state
        logits = self.model.lm_head(rows)
        targets = flat_labels.index_select(0, keep)
        loss = F.cross_entropy(logits, targets)
        if self.label_smoothing > 0:
            # A separate LogSoftmax keeps the gradient exact (see ORT_FACTS: SoftmaxCrossEntropyLossGrad
            # ignores gradients that flow into its log_prob output).
            smooth = -F.log_softmax(logits, dim=-1).mean()
            loss = (1 - self.label_smoothing) * loss + self.label_smoothing * smooth
        return loss


class CausalLMLogits(nn.Module):
    """input_ids, attention_mask, LoRA weights -> logits [batch, seq, vocab]."""

    def __init__(self, model: nn.Module, lora_names: list[str]):
        super().__init__()
        self.model = model
        self.lora_names = lora_names

    def forward(self, input_ids, attention_mask, *weights):
        lora = weights[: len(self.lora_names)]  # any frozen weights after them reach the modules themselves
        with external_lora_weights(self.model, dict(zip(self.lora_names, lora))):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def torchscript_export(module: nn.Module, args: tuple, path: Path, **options) -> None:
    """``torch.onnx.export`` with the TorchScript exporter, every parameter its own initializer.

    The TorchScript exporter de-duplicates initializers: ``_jit_pass_onnx_deduplicate_initializers``
    (called from ``_export`` in ``torch/onnx/_internal/torchscript_exporter/utils.py`` in torch 2.13,
    ``torch/onnx/utils.py`` in older releases) merges parameters whose values are equal into one tensor.
    A freshly initialised Qwen2 has every RMSNorm weight at 1.0 and every bias at 0.0, so the graph
    would depend on the values: norms and biases of different layers became one initializer (the
    tiny model lost 4 of its 26 weights), and two equal norms made ORT's gradient builder fail with
    ``Duplicate definition of name (...post_attention_layernorm.weight_grad)``.

    The exporter's own switch turns the pass off: with ``keep_initializers_as_inputs=True`` it is
    not run (documented in torch.onnx.export; checked on torch 2.13.0, and tests/test_build.py
    ``test_equal_weights_stay_apart`` fails if a torch release stops honouring it). The switch also
    lists every initializer as a graph input; ``load_exported`` drops those inputs again. It costs
    nothing: no value is touched or copied, and the pass's comparisons of weights are skipped.
    A tied LM head is one parameter of the module, so it stays one initializer (or input).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), opset_version=OPSET, dynamo=False,
                          keep_initializers_as_inputs=True, **options)


def load_exported(path: Path) -> onnx.ModelProto:
    """Load a ``torchscript_export`` output, its initializers no longer listed as graph inputs."""
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    kept = [i for i in graph.input if i.name not in initializers]
    del graph.input[:]
    graph.input.extend(kept)
    return model


def export_onnx(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str], path: Path, fold: bool,
                frozen: dict[str, torch.Tensor] | None = None) -> None:
    """Export ``module(*args)``. ``frozen``: placeholders of frozen weights (skeleton.py), the modules' own
    tensors, which become graph inputs of their names after the others."""
    frozen = frozen or {}
    args, input_names = (*args, *frozen.values()), [*input_names, *frozen]
    dynamic = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "labels") if name in input_names}
    if "logits" in output_names:
        dynamic["logits"] = {0: "batch", 1: "sequence"}
    torchscript_export(
        module,
        args,
        path,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic,
        do_constant_folding=fold,
        training=torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE,
    )


def inputs_to_initializers(model: onnx.ModelProto, values: dict[str, torch.Tensor], keep_as_inputs: bool) -> None:
    """Give each named graph input an initializer holding its value.

    keep_as_inputs=False: the input disappears (a training parameter of ORT's artifacts).
    keep_as_inputs=True: it stays an input whose initializer is its default (overridable at run time).
    """
    graph = model.graph
    for name, value in values.items():
        graph.initializer.append(numpy_helper.from_array(value.detach().cpu().numpy(), name))
    if not keep_as_inputs:
        kept = [i for i in graph.input if i.name not in values]
        del graph.input[:]
        graph.input.extend(kept)


# Protobuf cannot serialise 2 GiB, and serialising a large model makes a second copy of it in memory;
# from 1 GiB of weights on, they go to an external file instead (which ONNX Runtime can also map).
EXTERNAL_DATA_FROM = 2**30


def is_large(model: onnx.ModelProto) -> bool:
    # ByteSize() itself serialises, and fails past 2 GB: count the weights instead.
    return sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_FROM


def save_external(model: onnx.ModelProto, path: Path) -> None:
    """Save with every weight over 1 KiB in one external ``NAME.data`` file beside ``path``.

    As onnx.save does, this moves the weights out of ``model``: it is left holding references.
    """
    path = path.resolve()
    # onnx >= 1.17 refuses a `location` that exists relative to the current directory (not the
    # model's): save from the model's directory, so the check is about the file it writes.
    with contextlib.chdir(path.parent):
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=1024)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save, with every weight in one external ``NAME.data`` file when the weights exceed 1 GiB."""
    if is_large(model):
        save_external(model, path)
    else:
        onnx.save(model, str(path))


def stamp_ir_version(model: onnx.ModelProto) -> None:
    model.ir_version = min(model.ir_version, MAX_IR_VERSION)
