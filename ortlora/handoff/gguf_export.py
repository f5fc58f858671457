"""GGUF for llama.cpp and Ollama: the LoRA adapter alone (``--to gguf``) or the merged model (``--to gguf-merged``).

Written with the ``gguf`` package, the writer llama.cpp's own convert scripts use, as they write Qwen2 and Qwen3:

    adapter   general.type "adapter", adapter.type "lora", adapter.lora.alpha; per adapted weight
              blk.N.attn_q.weight.lora_a   PEFT's A (r x in), GGUF ne = [in, r]   (convert_lora_to_gguf.py)
              blk.N.attn_q.weight.lora_b   PEFT's B (out x r), GGUF ne = [r, out]
              llama.cpp adds (alpha / r) * B (A x), with r read from each lora_b (llama-adapter.h, get_scale)
    model     architecture "qwen2" or "qwen3", its hyperparameters, the BPE tokenizer (tokens, types, merges,
              special ids, chat template) and every weight under llama.cpp's names; norms and biases float32, the
              rest f32, f16, bf16 or q8_0 (a row that is no multiple of 32 stays f16)   (convert_hf_to_gguf.py)

Qwen3 is Qwen2's layout plus an RMSNorm over each query and key head (self_attn.q_norm / k_norm, [head_dim]),
written as blk.N.attn_q_norm.weight and blk.N.attn_k_norm.weight (float32, as every norm), and no attention biases
(convert_hf_to_gguf.py's Qwen3Model is its Qwen2Model with MODEL_ARCH.QWEN3). Its head_dim, which need not be
hidden / heads, is qwen3.attention.key_length and value_length. A tied LM head is no tensor: llama.cpp reads
token_embd.weight in its place. A Qwen3 with attention_bias is refused: llama.cpp's qwen3 reads no o_proj bias.

One adapter.lora.alpha holds one scaling per rank: where a module's scaling is not alpha / r (rsLoRA's
alpha / sqrt(r), an alpha_pattern), that module's B is multiplied by scaling * r / alpha, which gives llama.cpp
the same product. DoRA has no form in llama.cpp's LoRA GGUF: it is refused (--to gguf-merged folds it in).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from ortlora.build.model_dir import head_dim  # torch-free: config.json checks
from ortlora.errors import OrtloraError
from ortlora.files import artifact_file, read_json
from ortlora.handoff.merge import base_model_dir, lora_pairs, write_merged
from ortlora.lora_config import module_scaling
from ortlora.manifest import Manifest
from ortlora.weights import read_safetensors, stored_tensors, to_float32, weight_files

ADAPTER_FILE = "adapter.gguf"
MODEL_FILE = "model.gguf"
BASE_FILE = "base.gguf"
ADAPTER_TYPES = ("f32", "f16")
MODEL_TYPES = ("f32", "f16", "bf16", "q8_0")
# config.json's architecture -> gguf.MODEL_ARCH's member (llama.cpp's "qwen2", "qwen3")
ARCHITECTURES = {"Qwen2ForCausalLM": "QWEN2", "Qwen3ForCausalLM": "QWEN3"}
# Qwen2.5's pre-tokenizer split (tokenizer.json); llama.cpp calls it "qwen2" (llama-vocab.cpp)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise OrtloraError('--to gguf and gguf-merged write with the gguf package: pip install "ortlora[gguf]"') from None
    return gguf


def _arch(gguf, architecture: str):
    """llama.cpp's architecture (gguf.MODEL_ARCH) of a Hugging Face one that is in ARCHITECTURES."""
    return gguf.MODEL_ARCH[ARCHITECTURES[architecture]]


def check_type(target: str, given: str | None) -> str:
    """The --gguf-type of ``target`` (default: f32 for the adapter, f16 for a model)."""
    allowed = ADAPTER_TYPES if target == "gguf" else MODEL_TYPES
    value = given or allowed[0 if target == "gguf" else 1]
    if value not in allowed:
        raise OrtloraError(f"--gguf-type {value} is not one of {', '.join(allowed)} for --to {target}")
    return value


def refusal(manifest: Manifest) -> str | None:
    """Why llama.cpp's LoRA GGUF cannot hold adapters of these artifacts, or None."""
    if manifest.model.get("architecture") not in ARCHITECTURES:
        return (f"--to gguf and gguf-merged write {' and '.join(ARCHITECTURES)} models only; these artifacts are of "
                f"{manifest.model.get('architecture')}: use --to peft or merged")
    if manifest.lora.get("dora"):
        return ("--to gguf cannot hold a DoRA adapter (llama.cpp's LoRA GGUF has no magnitude vector); "
                "use --to gguf-merged, which folds it into the weights")
    return None


def check_exportable(args: argparse.Namespace, manifest: Manifest) -> None:
    """Refuse before anything is written: the gguf package missing, a --gguf-type the target has not, DoRA."""
    _gguf()
    # base.gguf is f16 unless --gguf-type f32 is asked for by name (the adapter's own default is f32)
    args.base_gguf_type = "f32" if args.gguf_type == "f32" else "f16"
    args.gguf_type = check_type(args.to, args.gguf_type)
    if args.with_base and args.to != "gguf":
        raise OrtloraError("--with-base goes with --to gguf (--to gguf-merged writes the whole model)")
    if args.to == "gguf" and (reason := refusal(manifest)):
        raise OrtloraError(reason)
    if args.to == "gguf-merged" and manifest.model.get("architecture") not in ARCHITECTURES:
        raise OrtloraError(refusal(manifest))


def export(args: argparse.Namespace, manifest: Manifest, weights: dict[str, np.ndarray], out: Path,
           max_shard: int) -> str:
    """ortlora-export --to gguf / gguf-merged into the staging directory ``out``. Returns a summary."""
    if args.to == "gguf":
        summary = write_adapter(manifest, weights, out / ADAPTER_FILE, args.gguf_type)
        if args.with_base:
            base = base_model_dir(args.artifacts, manifest, args.base)
            summary += "; base " + write_model(base, args.artifacts, out / BASE_FILE, args.base_gguf_type, base.name)
        return summary
    base = base_model_dir(args.artifacts, manifest, args.base)
    merged = out / ".merged"  # the merged Hugging Face model first: one merge (DoRA and patterns included)
    merged.mkdir()
    write_merged(base, manifest, weights, merged, args.artifacts, max_shard)
    summary = write_model(merged, args.artifacts, out / MODEL_FILE, args.gguf_type, f"{base.name}-lora-merged")
    shutil.rmtree(merged)
    return summary


def write_adapter(manifest: Manifest, weights: dict[str, np.ndarray], path: Path, dtype: str) -> str:
    """Write the adapter as llama.cpp's LoRA GGUF. Returns a summary."""
    gguf = _gguf()
    if reason := refusal(manifest):
        raise OrtloraError(reason)
    pairs = lora_pairs(manifest, weights)
    layers = 1 + max(p.layer for p in manifest.parameters)
    arch = _arch(gguf, manifest.model["architecture"])
    names = gguf.get_tensor_name_map(arch, layers)
    alpha = float(manifest.lora["alpha"])
    tensors, folded = [], 0
    for base_name, ab in pairs.items():
        gguf_name = names.get_name(base_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise OrtloraError(f"llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} has no tensor for {base_name}")
        rank = ab["A"].shape[0]
        factor = module_scaling(manifest.lora, base_name.removesuffix(".weight")) * rank / alpha
        b = ab["B"]
        if not np.isclose(factor, 1.0, rtol=1e-12, atol=0):
            b, folded = (b.astype(np.float64) * factor).astype(np.float32), folded + 1
        tensors += [(gguf_name + ".lora_a", ab["A"]), (gguf_name + ".lora_b", b)]

    numpy_dtype = np.float32 if dtype == "f32" else np.float16
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(Path(manifest.model["source"]).name or "adapter")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, array in tensors:
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=numpy_dtype))
    _write_all(writer, path)
    note = f", scaling folded into B of {folded} module{'s' * (folded != 1)}" if folded else ""
    return f"llama.cpp LoRA adapter ({len(pairs)} modules, {dtype}, alpha {alpha:g}{note})"


def write_model(model_dir: Path, tokenizer_dir: Path, path: Path, dtype: str, name: str) -> str:
    """Write the Hugging Face Qwen2 or Qwen3 model in ``model_dir`` as a GGUF model file, with the tokenizer of
    ``tokenizer_dir`` (tokenizer.json, tokenizer_config.json, chat_template.jinja). Returns a summary."""
    gguf = _gguf()
    config = read_json(artifact_file(model_dir, "config.json"))
    architectures = config.get("architectures")
    if not (isinstance(architectures, list) and len(architectures) == 1 and architectures[0] in ARCHITECTURES):
        raise OrtloraError(f"{model_dir}: --to gguf-merged writes {' and '.join(ARCHITECTURES)} models, not "
                           f"{architectures}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise OrtloraError(f"{model_dir}: rope type {rope.get('rope_type', rope.get('type'))!r} is not written to GGUF "
                           f"by ortlora (only the default RoPE)")
    layers = config["num_hidden_layers"]
    arch = _arch(gguf, architectures[0])
    if arch == gguf.MODEL_ARCH.QWEN3 and config.get("attention_bias"):
        # llama.cpp's qwen3 reads q/k/v biases but not o_proj's, and refuses the file ("wrong number of tensors")
        raise OrtloraError(f"{model_dir}: a Qwen3 with attention biases (config.json's attention_bias) has an "
                           f"o_proj bias, which llama.cpp's qwen3 does not read: use --to merged")
    names = gguf.get_tensor_name_map(arch, layers)
    files = weight_files(model_dir)
    plan = []  # (file, name, gguf name, shape, qtype), in the order the data is written
    for file in files:
        for tensor, stored in stored_tensors([file]).items():
            gguf_name = names.get_name(tensor, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise OrtloraError(f"{file}: llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]} has no tensor for {tensor}")
            plan.append((tensor, gguf_name, tuple(stored.shape), _qtype(gguf, gguf_name, stored.shape, dtype)))

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(sum(int(np.prod(shape)) for _, _, shape, _ in plan), 0, 0, 0))
    _add_sampling(writer, artifact_file(model_dir, "generation_config.json"),
                  artifact_file(tokenizer_dir, "generation_config.json"))
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    # Qwen3's width where config.json has none is transformers' 128, not the hidden / heads llama.cpp would take
    width = head_dim(config) if arch == gguf.MODEL_ARCH.QWEN3 else config.get("head_dim")
    if width is not None:
        writer.add_key_length(width)
        writer.add_value_length(width)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = _add_tokenizer(gguf, writer, tokenizer_dir, config["vocab_size"])

    for _, gguf_name, shape, qtype in plan:
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float16), int(np.prod(shape)) * 2)
        else:
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    kinds = {qtype for *_, qtype in plan}
    order = iter(plan)
    for file in files:  # one tensor in memory at a time
        for name, stored_dtype, array in read_safetensors(file):
            expected, _, _, qtype = next(order)
            assert name == expected, (name, expected)
            writer.write_tensor_data(gguf.quants.quantize(to_float32(stored_dtype, array), qtype))
    writer.close()
    kept = "" if dtype == "f32" else f" (norms and biases f32{', some rows f16' if len(kinds) > 2 else ''})"
    return f"GGUF model ({len(plan)} tensors, {dtype}{kept}, {vocab} tokens)"


def _qtype(gguf, gguf_name: str, shape, dtype: str):
    """convert_hf_to_gguf.py's choice: 1-D tensors and norms float32, the rest the file type (q8_0 where rows allow)."""
    types = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or dtype == "f32":
        return types.F32
    if dtype == "q8_0":
        block, _ = gguf.GGML_QUANT_SIZES[types.Q8_0]
        return types.Q8_0 if shape[-1] % block == 0 else types.F16
    return {"f16": types.F16, "bf16": types.BF16}[dtype]


def _add_tokenizer(gguf, writer, model_dir: Path, vocab_size: int) -> int:
    """The BPE tokenizer as convert_hf_to_gguf.py's _set_vocab_gpt2 writes it, read from tokenizer.json."""
    path = artifact_file(model_dir, "tokenizer.json")
    if not path.is_file():
        raise OrtloraError(f"{model_dir} has no tokenizer.json, which the GGUF model's vocabulary is read from")
    tokenizer = read_json(path)
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise OrtloraError(f"{path}: a {model.get('type')} tokenizer; --to gguf-merged writes byte-level BPE ones")
    pre = _pre_tokenizer(tokenizer.get("pre_tokenizer"), path)
    by_id = {i: token for token, i in model["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= vocab_size:
        raise OrtloraError(f"{path} has token id {max(by_id)}, past the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):  # rows past the tokenizer (Qwen2.5 pads 151,665 tokens to 151,936) are unused
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            text = by_id[i]
            special = added[i].get("special") or (text.startswith("<|") and text.endswith("|>"))
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    for kind in ("bos", "eos"):  # Hugging Face adds neither to Qwen2 or Qwen3 text; neither should llama.cpp
        special.add_special_token.setdefault(kind, False)
    special.add_to_gguf(writer, quiet=True)
    return len(by_id)


def _add_sampling(writer, *candidates: Path) -> None:
    """The default sampling of generation_config.json, as convert_hf_to_gguf.py's metadata carries it."""
    path = next((c for c in candidates if c.is_file()), None)
    config = read_json(path) if path else {}
    for key, add in (("top_k", writer.add_sampling_top_k), ("top_p", writer.add_sampling_top_p),
                     ("temperature", writer.add_sampling_temp), ("repetition_penalty", writer.add_sampling_penalty_repeat)):
        if isinstance(config.get(key), (int, float)) and not isinstance(config.get(key), bool):
            add(config[key])


def _pre_tokenizer(pre: dict | None, path: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: GPT-2's byte-level split or Qwen2's regular expression.

    convert_hf_to_gguf.py recognises a pre-tokenizer by hashing a published vocabulary's tokens of a test text;
    a vocabulary trained here has no published hash, so the split itself is read."""
    pre = pre or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if (steps and len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT and steps[0].get("behavior") == "Isolated"
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "qwen2"
    raise OrtloraError(f"{path}: its pre-tokenizer is neither GPT-2's byte-level split nor Qwen2's; "
                       f"llama.cpp would split text differently")


def _write_all(writer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
