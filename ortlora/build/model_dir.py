"""Checks on a local Hugging Face model directory, before anything heavy is loaded.

transformers fills a missing config key with its own default and a missing weight with random values
(with a warning at most), so a wrong directory would build artifacts of another model. Everything the
build relies on is checked here first, and every problem found is named in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ortlora.errors import OrtloraError, listing
from ortlora.files import inside, json_type, read_json
from ortlora.weights import FLOAT_DTYPES, check_safetensors, shape_problems, weight_files


@dataclass(frozen=True)
class Architecture:
    """What the build needs to know of a supported architecture; everything else is transformers' own modules."""

    name: str  # config.json's architectures[0], transformers' class
    label: str  # as messages name it
    attention_biases: tuple[str, ...]  # attention projections that always have a bias
    optional_biases: tuple[str, ...]  # those that have one when config.json's attention_bias is true
    head_norms: bool  # an RMSNorm of [head_dim] on each query and key head (self_attn.q_norm, self_attn.k_norm)
    head_dim: int | None  # transformers' head_dim where config.json has none (None: hidden_size / heads)


# By config.json's model_type. Qwen3 is Qwen2 with per-head query / key norms, no q/k/v biases (all four
# projections get one with attention_bias) and an explicit head_dim (transformers' Qwen3Config default: 128).
ARCHITECTURES = {
    "qwen2": Architecture("Qwen2ForCausalLM", "Qwen2 / Qwen2.5", ("q_proj", "k_proj", "v_proj"), (), False, None),
    "qwen3": Architecture("Qwen3ForCausalLM", "Qwen3", (), ("q_proj", "k_proj", "v_proj", "o_proj"), True, 128),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "generation_config.json")
# config.json keys the build reads (transformers would take its own default for a missing one).
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings")
TORCH_DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}  # config.json's spelling
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Rotary position scaling (config.json's rope_scaling, rope_parameters in transformers 5): the types transformers
# computes (modeling_rope_utils.ROPE_INIT_FUNCTIONS, and "default"), with the keys it cannot fill in itself.
ROPE_TYPES = {"default": (), "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
              "longrope": ("short_factor", "long_factor"), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "rope_theta",
                "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def check_model_dir(path: Path) -> dict:
    """Return the model's config.json, or raise a one-line error saying what is missing."""
    if not path.is_dir():
        raise OrtloraError(f"model directory {path} does not exist" if not path.exists() else f"--model {path} is not a directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise OrtloraError(f"{path} has no config.json: is it a Hugging Face model directory?")
    config = read_json(config_path)
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        architectures = config.get("architectures")
        names = ", ".join(map(str, architectures)) if isinstance(architectures, list) else ""
        supported = ", ".join(f"{a.label} (model_type {t})" for t, a in ARCHITECTURES.items())
        raise OrtloraError(f"{path} holds a {model_type or 'unknown'} model ({names}); ortlora supports {supported}")
    _check_sizes(config, config_path)
    _check_weights(path, config)
    if not (path / "tokenizer.json").is_file():
        raise OrtloraError(f"{path} has no tokenizer.json (a fast tokenizer is needed at run time)")
    from ortlora.runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer(path)  # the tokenizer files the artifacts will ship must load
    if tokenizer.vocab_size > config["vocab_size"]:
        raise OrtloraError(f"{path / 'tokenizer.json'} has {tokenizer.vocab_size:,} tokens, more than the model's "
                           f"vocab_size {config['vocab_size']:,} in config.json")
    return config


def _check_sizes(config: dict, config_path: Path) -> None:
    bad = [f"{key} is {json_type(config[key]) if key in config else 'missing'}" for key in REQUIRED_SIZES
           if type(config.get(key)) is not int or config[key] <= 0]
    if bad:
        raise OrtloraError(f"{config_path} needs {', '.join(REQUIRED_SIZES)} as positive integers: {'; '.join(bad)}")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise OrtloraError(f"{config_path}: num_attention_heads ({config['num_attention_heads']}) is not a multiple "
                           f"of num_key_value_heads ({config['num_key_value_heads']})")
    for key in ("tie_word_embeddings", "attention_bias"):
        if not isinstance(config.get(key, False), bool):
            raise OrtloraError(f"{config_path}: {key} must be true or false")
    head_dim = config.get("head_dim")
    if head_dim is not None and (type(head_dim) is not int or head_dim <= 0):
        raise OrtloraError(f"{config_path}: head_dim must be a positive integer, not {json_type(head_dim)}")
    _check_rope(config, config_path)


def _positive_number(value) -> bool:
    return type(value) in (int, float) and 0 < value < float("inf")


def _shown(value) -> str:
    return repr(value) if type(value) in (int, float) else json_type(value)


def _check_rope(config: dict, config_path: Path) -> None:
    """rope_theta and the rotary scaling must be what transformers computes: an unknown type or a missing or
    non-numeric factor fails inside transformers (a KeyError), or is taken with a warning and computes garbage."""
    if "rope_theta" in config and not _positive_number(config["rope_theta"]):
        raise OrtloraError(f"{config_path}: rope_theta must be a positive number, not {_shown(config['rope_theta'])}")
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise OrtloraError(f"{config_path}: {key} must be an object (or null), not {json_type(rope)}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if not isinstance(kind, str) or kind not in ROPE_TYPES:
            raise OrtloraError(f"{config_path}: {key} has rope type {kind!r}, which transformers does not compute; "
                               f"the types are {', '.join(ROPE_TYPES)}")
        problems = [f"{name} is missing" for name in ROPE_TYPES[kind] if name not in rope]
        problems += [f"{name} is {_shown(rope[name])}, not a positive number" for name in ROPE_NUMBERS
                     if name in rope and rope[name] is not None and not _positive_number(rope[name])]
        if "factor" in rope and _positive_number(rope["factor"]) and rope["factor"] < 1:
            problems.append(f"factor is {rope['factor']}, below 1")
        problems += [f"{name} is not a list of positive numbers" for name in ("short_factor", "long_factor")
                     if name in rope and not (isinstance(rope[name], list) and all(map(_positive_number, rope[name])))]
        if problems:
            raise OrtloraError(f"{config_path}: {key} (rope type {kind!r}) is not one transformers can compute: "
                               f"{'; '.join(problems)}")


def architecture(config: dict) -> Architecture:
    """The supported architecture of ``config`` (config.json), by its model_type."""
    return ARCHITECTURES[config.get("model_type", "qwen2")]


def head_dim(config: dict) -> int:
    """The attention heads' width, as transformers takes it for the architecture."""
    return config.get("head_dim") or architecture(config).head_dim or config["hidden_size"] // config["num_attention_heads"]


def expected_weights(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight a model of ``config`` loads (transformers' Qwen2ForCausalLM or
    Qwen3ForCausalLM, by model_type)."""
    arch = architecture(config)
    hidden, inner, vocab, width = config["hidden_size"], config["intermediate_size"], config["vocab_size"], head_dim(config)
    q, kv = config["num_attention_heads"] * width, config["num_key_value_heads"] * width
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings", False):  # transformers' default for Qwen2 is an LM head of its own
        shapes["lm_head.weight"] = (vocab, hidden)
    biases = arch.attention_biases + (arch.optional_biases if config.get("attention_bias") else ())
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        attention = {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q)}
        shapes |= {layer + "input_layernorm.weight": (hidden,), layer + "post_attention_layernorm.weight": (hidden,)}
        for name, shape in attention.items():
            shapes[f"{layer}self_attn.{name}.weight"] = shape
            if name in biases:
                shapes[f"{layer}self_attn.{name}.bias"] = shape[:1]
        if arch.head_norms:
            shapes |= {layer + "self_attn.q_norm.weight": (width,), layer + "self_attn.k_norm.weight": (width,)}
        shapes |= {
            layer + "mlp.gate_proj.weight": (inner, hidden), layer + "mlp.up_proj.weight": (inner, hidden),
            layer + "mlp.down_proj.weight": (hidden, inner),
        }
    return shapes


def _check_weights(path: Path, config: dict) -> None:
    """The safetensors files must be readable and hold every weight of the configured shape, in a float dtype."""
    files = weight_files(path)
    if not files:
        other = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = (f" (it has {', '.join(other[:3])}: PyTorch weights, which ortlora does not load; save the model "
                "again with transformers' save_pretrained, which writes safetensors)") if other else ""
        raise OrtloraError(f"{path} has no *.safetensors weights{hint}")
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise OrtloraError(f"{index} has no weight_map (tensor name -> safetensors file)")
        missing = sorted({s for s in weight_map.values() if not inside(path, s, str(index)).is_file()})
        if missing:
            raise OrtloraError(f"{index} names weight files that are not there: {', '.join(missing[:3])}")
    tensors = {name: (dtype, shape, file) for file in files for name, (dtype, shape) in check_safetensors(file).items()}
    problems = shape_problems({name: shape for name, (_, shape, _) in tensors.items()}, expected_weights(config),
                              unexpected=False)
    problems += [f"{name} in {file.name} is {dtype}" for name, (dtype, _, file) in tensors.items()
                 if dtype not in FLOAT_DTYPES]
    if problems:
        raise OrtloraError(f"the weights in {path} do not fit its config.json (a {config['num_hidden_layers']}-layer "
                           f"{architecture(config).label} of hidden size {config['hidden_size']}): {listing(problems)}")


def source_dtype(path: Path) -> str:
    """The stored dtype of the model's weights as config.json spells it ("bfloat16" for the published Qwen2.5
    checkpoints), or the dtypes joined by "+" where they are mixed. The build computes in float32 whatever
    this is; an export of merged weights writes each weight back in its own dtype."""
    dtypes = {dtype for file in weight_files(path) for dtype, _ in check_safetensors(file).values()}
    return "+".join(sorted(TORCH_DTYPE_NAMES.get(d, d) for d in dtypes))
