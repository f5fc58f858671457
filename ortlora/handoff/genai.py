"""An onnxruntime-genai model folder: the artifacts' decoder, its weights, the tokenizer, genai_config.json
and the adapter as an ``.onnx_adapter``.

    model.onnx              the artifacts' decoder_model.onnx, unchanged: input_ids, attention_mask,
                            past.{i}.key/value -> logits, present.{i}.key/value; every LoRA weight an
                            input whose default (its initializer) is the untrained LoRA, so no adapter = the base
    frozen_weights.bin      its external data, copied: a hard link would save the disk, but the onnx package's
                            checker then refuses the model, and the artifacts' own (its file has "multiple hard
                            links, indicating a potential hardlink attack")
    adapter.onnx_adapter    the exported adapter (onnx_adapter.py)
    tokenizer.json, ...     the artifacts' tokenizer files
    genai_config.json       model type qwen2 or qwen3, the decoder's shapes and I/O names, eos / pad ids, and search
                            defaults from generation_config.json (Qwen2.5's: do_sample, temperature 0.7, top_p 0.8,
                            top_k 20, repetition_penalty 1.05 to 1.1), as GenAI's own model builder writes them

GenAI then swaps adapters per request without re-exporting: ``og.Adapters(model).load(path, name)`` and
``generator.set_active_adapter(adapters, name)``; any ``--to onnx-adapter`` export of the same artifacts
loads into the same folder. GenAI's config names the decoder's inputs and outputs (inputs.past_key_names
and so on, src/config.cpp), so the graph is the very file ortlora-generate runs, not a renamed copy: no
onnx package is needed and the two cannot drift. Positions come from the attention mask inside the graph,
so the folder has no position_ids input, and the cache grows by concatenation, so
past_present_share_buffer is off (GenAI would otherwise hand the graph a max-length buffer to write into).
For Qwen3 the graph holds the per-head q_norm / k_norm itself; the config's part is head_size, the key/value
cache's width, which is config.json's head_dim (Qwen3-0.6B: 128, not 1024 / 16 = 64), as GenAI's builder takes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ortlora.build.model_dir import head_dim  # torch-free: config.json checks
from ortlora.errors import REBUILD, OrtloraError
from ortlora.files import artifact_file, read_json
from ortlora.handoff.onnx_adapter import ADAPTER_FILE, write_adapter
from ortlora.manifest import Manifest
from ortlora.onnx_files import check_external_data, read_external_data_locations

CONFIG_FILE = "genai_config.json"
MODEL_FILE = "model.onnx"
# generation_config.json keys that become GenAI's search defaults, with transformers' defaults
SEARCH_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def _int(config: dict, key: str, path: Path) -> int:
    value = config.get(key)
    if type(value) is not int or value <= 0:
        raise OrtloraError(f"{path}: {key} must be a positive integer, not {value!r}; {REBUILD}")
    return value


def _ids(value) -> list[int]:
    ids = value if isinstance(value, list) else [] if value is None else [value]
    return [i for i in ids if type(i) is int]


# What a genai_config.json is written and checked for: the architecture -> GenAI's model.type, as its model builder
# names it (architectures[0] up to "For", lower case). onnxruntime-genai 0.18 runs both as decoder-only models
# (src/models/model_type.h, ModelType::IsLLM); the type adds Qwen's tool-call / think token ids, nothing to the graph.
MODEL_TYPES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def check_exportable(manifest: Manifest) -> None:
    """Refuse, in one line, artifacts of an architecture whose GenAI folder is not written yet."""
    if manifest.model.get("architecture") not in MODEL_TYPES:
        raise OrtloraError(f"--to genai writes {' and '.join(MODEL_TYPES)} folders only; these artifacts are of "
                           f"{manifest.model.get('architecture')}: use --to onnx-adapter, onnx or merged")


def genai_config(artifacts: Path, manifest: Manifest) -> dict:
    """genai_config.json for the artifacts' decoder (names from the manifest, sizes from config.json)."""
    from ortlora.runtime.tokenizer import Tokenizer

    config_path = artifacts / manifest.files["config"]
    config = read_json(config_path, REBUILD)
    layers, heads = _int(config, "num_hidden_layers", config_path), _int(config, "num_attention_heads", config_path)
    hidden = _int(config, "hidden_size", config_path)
    head_size = head_dim(config)  # the width of the cache GenAI allocates: Qwen3's explicit head_dim
    io = manifest.io["decoder"]
    names = {"past_key_names": "past.%d.key", "past_value_names": "past.%d.value"}
    present = {"present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    expected_in = [n % i for i in range(layers) for n in names.values()]
    expected_out = ["logits", *[n % i for i in range(layers) for n in present.values()]]
    if io["inputs"][:2] != ["input_ids", "attention_mask"] or not set(expected_in) <= set(io["inputs"]) \
            or io["outputs"] != expected_out:
        raise OrtloraError(f"the artifacts' decoder does not have the inputs and outputs this ortlora expects; {REBUILD}")

    generation_path = artifact_file(artifacts, "generation_config.json")
    generation = read_json(generation_path, REBUILD) if generation_path.is_file() else {}
    # The same end-of-sequence set as ortlora-generate: the tokenizer's eos token and generation_config's.
    eos = sorted({Tokenizer(artifacts).eos_id, *_ids(generation.get("eos_token_id"))})
    pad = next(iter(_ids(generation.get("pad_token_id")) or _ids(config.get("pad_token_id")) or eos))
    context = manifest.context_length(artifacts)
    search = {key: generation.get(key, default) for key, default in SEARCH_DEFAULTS.items()}
    model = {
        "type": MODEL_TYPES[manifest.model["architecture"]],
        "context_length": context,
        "vocab_size": _int(config, "vocab_size", config_path),
        "eos_token_id": eos,
        "pad_token_id": pad,
        "decoder": {
            "filename": MODEL_FILE,
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "head_size": head_size,
            "hidden_size": hidden,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": config.get("num_key_value_heads") or heads,
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", **names},
            "outputs": {"logits": "logits", **present},
        },
    }
    bos = _ids(config.get("bos_token_id"))
    if bos:
        model["bos_token_id"] = bos[0]
    return {"model": model, "search": {"max_length": context, "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                                       "past_present_share_buffer": False, **search}}


def export(artifacts: Path, manifest: Manifest, weights: dict, staging: Path) -> str:
    """``ortlora-export --to genai``: the folder described above, assembled in ``staging``."""
    artifacts = Path(artifacts)
    config = genai_config(artifacts, manifest)  # checks the decoder's I/O first
    write_adapter(manifest, weights, staging / ADAPTER_FILE)  # refuses what the format cannot hold
    decoder = artifacts / manifest.files["decoder_model"]
    check_external_data(decoder, artifacts)
    shutil.copy2(decoder, staging / MODEL_FILE)
    for location in dict.fromkeys(read_external_data_locations(decoder)):  # relative to the model: keep the names
        (staging / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(decoder.parent / location, staging / location)
    for name in manifest.files["tokenizer"]:
        shutil.copy2(artifacts / name, staging / Path(name).name)
    (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return f"onnxruntime-genai folder ({MODEL_FILE}, {CONFIG_FILE}, {ADAPTER_FILE}, tokenizer)"
