"""The generation graph: the decoder with a key/value cache, so each new token costs one position.

    inputs   input_ids [batch, new], attention_mask [batch, past + new], past.{i}.key / past.{i}.value
             [batch, kv_heads, past, head_dim] for every layer, and the LoRA weights (optional:
             their initial values are the defaults, so any adapter can be fed, or none)
    outputs  logits [batch, new, vocab], present.{i}.key / present.{i}.value (past + new positions)

The forward pass is Qwen2's and Qwen3's (whose attention normalises each query and key head first:
``self_attn.q_norm`` / ``k_norm``), written over the model's own modules (so LoRA and the weights are
the model's) with the cache as explicit tensors: positions come from the attention mask (left
padding works), and each query sees the keys up to its own position that the mask keeps.
tests/test_generate.py checks it against transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from ortlora.build.export import torchscript_export
from ortlora.build.lora import external_lora_weights


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return past, [name.replace("past.", "present.") for name in past]


def head_norm(attention: nn.Module, name: str) -> nn.Module:
    """The attention's per-head norm of queries or keys (Qwen3's q_norm / k_norm), or none (Qwen2)."""
    norm = getattr(attention, name, None)
    return nn.Identity() if norm is None else norm


class DecoderWithPast(nn.Module):
    def __init__(self, model: nn.Module, lora_names: list[str]):
        super().__init__()
        self.model, self.lora_names = model, lora_names
        self.layers = len(model.model.layers)

    def forward(self, input_ids, attention_mask, *rest):
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        # Frozen weights may follow the cache: they reach the modules themselves (skeleton.py).
        lora, past = rest[: len(self.lora_names)], rest[len(self.lora_names): len(self.lora_names) + 2 * self.layers]
        core = self.model.model
        new = input_ids.shape[1]
        past_len = attention_mask.shape[1] - new
        # Max, not clamp: an int64 Clip with no upper bound comes out all zeros under OpenVINO's CPU
        # plugin (it computes int64 as int32, so the default upper bound wraps to -1), which put every
        # token at position 0 (onnxruntime-openvino 1.24.1). Max(x, 0) is the same on every provider.
        counted = attention_mask.cumsum(-1) - 1
        positions = torch.maximum(counted, torch.zeros_like(counted))[:, past_len:]
        query_pos = past_len + torch.arange(new).unsqueeze(1)
        key_pos = torch.arange(attention_mask.shape[1]).unsqueeze(0)
        visible = (key_pos <= query_pos).unsqueeze(0) & attention_mask.bool()[:, None, :]
        bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill(~visible, torch.finfo(torch.float32).min)
        bias = bias.unsqueeze(1)  # [batch, 1, new, past + new]

        presents = []
        with external_lora_weights(self.model, dict(zip(self.lora_names, lora))):
            hidden = core.embed_tokens(input_ids)
            cos, sin = core.rotary_emb(hidden, positions)
            for i, layer in enumerate(core.layers):
                attn = layer.self_attn
                x = layer.input_layernorm(hidden)
                shape = (x.shape[0], new, -1, attn.head_dim)
                q = head_norm(attn, "q_norm")(attn.q_proj(x).view(shape)).transpose(1, 2)
                k = head_norm(attn, "k_norm")(attn.k_proj(x).view(shape)).transpose(1, 2)
                v = attn.v_proj(x).view(shape).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = torch.cat([past[2 * i], k], dim=2)
                v = torch.cat([past[2 * i + 1], v], dim=2)
                presents += [k, v]
                groups = q.shape[1] // k.shape[1]  # grouped-query attention: each KV head serves `groups` heads
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
                scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + bias
                context = torch.matmul(torch.softmax(scores, dim=-1), v)
                hidden = hidden + attn.o_proj(context.transpose(1, 2).reshape(x.shape[0], new, -1))
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            logits = self.model.lm_head(core.norm(hidden))
        return (logits, *presents)


def export_decoder(model: nn.Module, lora_names: list[str], lora_values: dict, path, frozen: dict | None = None) -> None:
    """Export the decoder with past to ``path`` (TorchScript exporter, dynamic batch / lengths); load it
    with ``export.load_exported``. ``frozen``: as for export.export_onnx."""
    frozen = frozen or {}
    config = model.config
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    past, present = cache_names(layers)
    batch, past_len, new = 2, 3, 2
    ids = torch.randint(0, config.vocab_size, (batch, new))
    mask = torch.ones(batch, past_len + new, dtype=torch.int64)
    cache = [torch.randn(batch, config.num_key_value_heads, past_len, head_dim) for _ in past]
    dynamic = {"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "total"},
               "logits": {0: "batch", 1: "new"}}
    dynamic.update({name: {0: "batch", 2: "past"} for name in past})
    dynamic.update({name: {0: "batch", 2: "total"} for name in present})
    torchscript_export(
        DecoderWithPast(model, lora_names).eval(),
        (ids, mask, *[lora_values[n] for n in lora_names], *cache, *frozen.values()),
        path,
        input_names=["input_ids", "attention_mask", *lora_names, *past, *frozen],
        output_names=["logits", *present],
        dynamic_axes=dynamic,
        do_constant_folding=True,
    )
