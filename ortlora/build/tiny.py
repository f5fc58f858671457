"""The built-in default model: a tiny Qwen2-architecture model with a real tokenizer.

Weights are seeded random; the tokenizer is a byte-level BPE trained on the datasets that ship
with ortlora. Both are saved as an ordinary Hugging Face model directory, so the tiny model goes
through exactly the loading code a real Qwen2.5 checkpoint does.

The same recipe makes random models of a real model's shape for benchmarks (``SHAPES``): the
Qwen2.5-0.5B shape has that model's dimensions and 151,936-entry vocabulary, with the tiny
tokenizer (a tokenizer smaller than the vocabulary is fine, as it is for Qwen2.5 itself).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

# ChatML, as Qwen2.5 uses it (without the tool-calling branches).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# 2 layers, hidden 64, grouped-query attention (4 query heads, 2 key/value heads) like Qwen2.5.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    # Wide enough that logits can move: with the usual 0.02 a 64-wide model barely learns.
    initializer_range=0.2,
)
TINY_VOCAB = 512

QWEN25_05B_CONFIG = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    vocab_size=151936,
)
SHAPES = {"tiny": TINY_CONFIG, "qwen2.5-0.5b": QWEN25_05B_CONFIG}


def shipped_texts() -> list[str]:
    """Every string in the shipped datasets: the tokenizer's training corpus."""
    texts: list[str] = []
    for entry in sorted(resources.files("ortlora.data").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".jsonl"):
            continue
        for line in entry.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for key in ("text", "prompt", "completion"):
                if key in row:
                    texts.append(row[key])
            for message in row.get("messages", []):
                texts.append(message["content"])
    return texts


def train_tokenizer(vocab_size: int = TINY_VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(shipped_texts(), trainer=trainer)
    return tokenizer


def create_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny model (config, safetensors weights, tokenizer) to ``out_dir``."""
    return create_random_model(out_dir, "tiny", seed)


def create_random_model(out_dir: Path, shape: str, seed: int = 0, **overrides) -> Path:
    """Write a seeded random Qwen2 model of one of ``SHAPES`` (with ``overrides`` of its config), with
    the tiny tokenizer, to ``out_dir``."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(
        **{"vocab_size": len(tokenizer), **SHAPES[shape], **overrides},
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Random init leaves norm weights at exactly 1; perturb them so tests cannot pass by accident
    # (and so the exporter, which merges initializers of equal value, keeps every norm its own).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    out_dir.mkdir(parents=True, exist_ok=True)
    transformers.logging.disable_progress_bar()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
