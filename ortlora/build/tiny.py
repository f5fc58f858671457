"""The built-in default model: a tiny Qwen2-architecture model with a real tokenizer.

Weights are seeded random; the tokenizer is a byte-level BPE trained on the datasets that ship
with ortlora. Both are saved as an ordinary Hugging Face model directory, so the tiny model goes
through exactly the loading code a real Qwen2.5 checkpoint does.

The same recipe makes random models of a published model's shape for benchmarks and tests (``SHAPES``:
Qwen2.5 0.5B to 7B and Qwen3 0.6B to 8B, with their dimensions and 151,936- or 152,064-row vocabularies; a
``model_type="qwen3"`` override makes a tiny Qwen3), laid out as the
published checkpoints are when asked: stored in bf16, sharded (``model-00001-of-0000n.safetensors`` and
``model.safetensors.index.json``), with Qwen2.5's real tokenizer, chat template and generation config
(``tokenizer="real"``, the copy shipped in ``QWEN25_TOKENIZER_DIR``, Apache-2.0; Qwen3's tokenizer and template
from ``QWEN3_TOKENIZER_DIR`` for qwen3). A tokenizer smaller than the vocabulary is fine, as it is for Qwen2.5
itself (151,665 tokens in 151,936 rows; Qwen3's 151,669).
"""

from __future__ import annotations

import json
import math
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

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
# The rest of the family (config.json values of the published checkpoints); all share 0.5B's tokenizer.
_QWEN25_COMMON = {key: QWEN25_05B_CONFIG[key] for key in ("max_position_embeddings", "rms_norm_eps", "rope_theta")}
QWEN25_15B_CONFIG = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936, **_QWEN25_COMMON)
QWEN25_3B_CONFIG = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                        num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936, **_QWEN25_COMMON)
QWEN25_7B_CONFIG = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064, **_QWEN25_COMMON)
# Qwen3's dense models (config.json values of the published checkpoints): head_dim 128 whatever the hidden size
# (0.6B: 16 heads of 128 from a hidden size of 1,024), tied embeddings up to 4B. tokenizer="real" gives them
# Qwen3's own tokenizer and template (QWEN3_TOKENIZER_DIR).
_QWEN3_COMMON = dict(model_type="qwen3", head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, vocab_size=151936)
QWEN3_06B_CONFIG = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, tie_word_embeddings=True, **_QWEN3_COMMON)
QWEN3_17B_CONFIG = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, tie_word_embeddings=True, **_QWEN3_COMMON)
QWEN3_4B_CONFIG = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=True, **_QWEN3_COMMON)
QWEN3_8B_CONFIG = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                       num_key_value_heads=8, tie_word_embeddings=False, **_QWEN3_COMMON)
SHAPES = {"tiny": TINY_CONFIG, "qwen2.5-0.5b": QWEN25_05B_CONFIG, "qwen2.5-1.5b": QWEN25_15B_CONFIG,
          "qwen2.5-3b": QWEN25_3B_CONFIG, "qwen2.5-7b": QWEN25_7B_CONFIG, "qwen3-0.6b": QWEN3_06B_CONFIG,
          "qwen3-1.7b": QWEN3_17B_CONFIG, "qwen3-4b": QWEN3_4B_CONFIG, "qwen3-8b": QWEN3_8B_CONFIG}
DTYPES = ("fp32", "bf16", "fp16")
TOKENIZERS = ("tiny", "real")
RANDOM_BLOCK_BYTES = 64 << 20  # float32 drawn at a time for a random model of a published shape
# Qwen2.5's real tokenizer files, shipped with ortlora (ortlora/data/qwen2.5-tokenizer: README, LICENSE).
QWEN25_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "data" / "qwen2.5-tokenizer"
QWEN25_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
# Qwen3's (ortlora/data/qwen3-tokenizer: README, LICENSE), for model_type qwen3: no config or generation config.
QWEN3_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "data" / "qwen3-tokenizer"
QWEN3_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


# The tiny tokenizer's training corpus: the built-in datasets (builtin:NAME), a fixed list, so that shipping
# another data file (tools_train.jsonl, for Qwen2.5's tokenizer) does not change the tiny model.
CORPUS = ("chat_train.jsonl", "chat_valid.jsonl", "completions_train.jsonl", "completions_valid.jsonl",
          "text_train.jsonl", "text_valid.jsonl")


def shipped_texts() -> list[str]:
    """Every string in the built-in datasets: the tiny tokenizer's training corpus."""
    texts: list[str] = []
    for name in CORPUS:
        for line in resources.files("ortlora.data").joinpath(name).read_text(encoding="utf-8").splitlines():
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


def create_random_model(out_dir: Path, shape: str, seed: int = 0, *, layers: int | None = None, dtype: str = "fp32",
                        max_shard_size: str | int | None = None, tokenizer: str = "tiny", **overrides) -> Path:
    """Write a seeded random model of one of ``SHAPES`` to ``out_dir``.

    ``layers`` keeps the first N layers of the shape; ``overrides`` change any other config value (a test's
    hidden size of 64, say; ``model_type="qwen3"`` with a ``head_dim`` makes a Qwen3 of the tiny shape).
    ``dtype`` is the stored dtype. The tiny shape is made and saved by transformers; published shapes are drawn and written block by block (``_write_random_weights``), so a 7B model takes
    64 MB of memory, not its 15 GB. ``max_shard_size`` ("50MB", or bytes) splits the weights the way
    ``save_pretrained`` writes published checkpoints; none gives one model.safetensors. ``tokenizer`` is
    "tiny" (trained here on the shipped data) or "real" (Qwen2.5's, copied from ``QWEN25_TOKENIZER_DIR``,
    with its chat template and generation_config.json; a qwen3 model_type gets Qwen3's tokenizer and chat
    template from ``QWEN3_TOKENIZER_DIR``, its generation config the one its config writes).
    """
    import torch
    import transformers
    from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerFast

    from ortlora.build.model_dir import ARCHITECTURES

    if shape not in SHAPES or dtype not in DTYPES or tokenizer not in TOKENIZERS:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, dtype one of {DTYPES}, tokenizer one of "
                         f"{TOKENIZERS}; got {shape!r}, {dtype!r}, {tokenizer!r}")
    base = {**SHAPES[shape], **overrides}
    model_type = base.pop("model_type", "qwen2")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type must be one of {sorted(ARCHITECTURES)}, got {model_type!r}")
    if layers is not None:
        if not 1 <= layers <= SHAPES[shape]["num_hidden_layers"]:
            raise ValueError(f"layers must be 1 to {SHAPES[shape]['num_hidden_layers']} for {shape}, got {layers}")
        base["num_hidden_layers"] = layers
    if tokenizer == "real":
        real = json.loads((QWEN25_TOKENIZER_DIR / "config.json").read_text())
        # Qwen2.5's published ids: <|endoftext|> 151643 begins and pads, <|im_end|> 151645 ends a turn; Qwen3's
        # tokenizer gives these tokens the same ids (tests/test_qwen3_template.py).
        ids = {key: real[key] for key in ("bos_token_id", "eos_token_id")} | {"pad_token_id": real["bos_token_id"]}
        hf_tokenizer = None
    else:
        hf_tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=train_tokenizer(),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            additional_special_tokens=SPECIAL_TOKENS[1:],
        )
        hf_tokenizer.chat_template = CHAT_TEMPLATE
        ids = dict(bos_token_id=None, eos_token_id=hf_tokenizer.convert_tokens_to_ids("<|im_end|>"),
                   pad_token_id=hf_tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        base = {"vocab_size": len(hf_tokenizer), **base}
    config = AutoConfig.for_model(model_type, **base, **ids)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    out_dir.mkdir(parents=True, exist_ok=True)
    transformers.logging.disable_progress_bar()
    if shape == "tiny":
        _save_transformers_model(out_dir, config, torch_dtype, seed, max_shard_size)
    else:
        _write_random_weights(out_dir, config.to_dict(), dtype, seed, max_shard_size)
        config.architectures = [ARCHITECTURES[model_type].name]
        config.dtype = torch_dtype
        config.save_pretrained(out_dir)
        GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(out_dir)
    else:
        source, names = ((QWEN3_TOKENIZER_DIR, QWEN3_TOKENIZER_FILES) if model_type == "qwen3"
                         else (QWEN25_TOKENIZER_DIR, QWEN25_TOKENIZER_FILES))
        for name in names:  # Qwen2.5's generation_config.json replaces the one written above
            shutil.copyfile(source / name, out_dir / name)
    return out_dir


def _save_transformers_model(out_dir: Path, config, torch_dtype, seed: int, max_shard_size) -> None:
    """The built-in model: initialised and saved by transformers (its figures in the README are of these weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    # Made in the stored dtype (transformers sets it as torch's default while it builds).
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    # Random init leaves norm weights at exactly 1 (Qwen3's q_norm / k_norm too); perturb them so tests cannot
    # pass by accident (a wrong norm would change nothing). The build no longer needs it: equal weights stay apart.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size is not None else {}))


def _write_random_weights(out_dir: Path, config: dict, dtype: str, seed: int, max_shard_size) -> None:
    """Seeded random weights of a published shape, written as save_pretrained lays them out (one
    model.safetensors, or shards of at most ``max_shard_size`` with model.safetensors.index.json), a block
    at a time: a 7B model is 15 GB in bf16, and no more than RANDOM_BLOCK_BYTES of it is ever in memory.
    Matrices and biases are N(0, initializer_range), norm weights 1 + N(0, 0.1)."""
    from transformers.utils.hub import convert_file_size_to_int

    from ortlora.build.model_dir import SAFETENSORS_INDEX, expected_weights
    from ortlora.weights import from_float32, stream_safetensors

    code = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}[dtype]
    itemsize = 4 if dtype == "fp32" else 2
    shapes = expected_weights(config)
    limit = convert_file_size_to_int(max_shard_size) if max_shard_size is not None else None
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * math.prod(shape)
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(seed)
    std = config.get("initializer_range", 0.02)

    def blocks(name: str):
        shape = shapes[name]
        rows = max(1, RANDOM_BLOCK_BYTES // (4 * math.prod(shape[1:])))
        for start in range(0, shape[0], rows):
            values = rng.standard_normal((min(rows, shape[0] - start), *shape[1:]), dtype=np.float32)
            yield from_float32(code, 1 + 0.1 * values if name.endswith("norm.weight") else std * values)

    metadata = {"format": "pt"}
    if len(shards) == 1:
        stream_safetensors(out_dir / "model.safetensors", {n: (code, shapes[n]) for n in shards[0]}, blocks, metadata)
        return
    weight_map = {}
    for k, names in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        stream_safetensors(out_dir / file, {n: (code, shapes[n]) for n in names}, blocks, metadata)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(itemsize * math.prod(shape) for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
