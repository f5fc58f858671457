"""The artifact manifest (``ortlora.json``): the only contract between build and runtime.

Torch-free. The build step writes it last, so a directory without it is not a finished build.

``Manifest.load`` checks what it can from the manifest alone, so that a hand-edited or damaged one is refused
before anything trains on it: every field's type (SCHEMA); each frozen weight's place in frozen_weights.bin against
its dtype and shape, and each row view (frozen_views) against the matrix it is rows of; the LoRA settings (rank,
alpha and the patterns positive, scaling equal to what alpha and rank make, dropout and label smoothing in [0, 1));
and the LoRA parameters against them and against each other: at least one; names unique and the ones that layer,
module and kind make; every module of ``lora.targets`` in every adapted layer (``lora.layers``, else every layer of
the base in the frozen layout) with its lora_A (rank, in) and lora_B (out, rank), and DoRA's magnitude (out) with
--dora; in and out those of the module's base weight in the frozen layout (the model's dimensions the manifest
records), or where there is none the same for one module in every layer; counts.trainable their sum; the portable
training graph's inputs and gradient outputs (io) naming them in their order.

Checked where the files are opened, not here: the LoRA weights of ORT's checkpoint and initial_lora.safetensors
and the LoRA inputs of the portable and decoder graphs against the manifest (runtime/backend.py,
session_backend.py, generate.py), NaN and infinity in frozen_weights.bin's float tensors (runtime/frozen.py).
Not checked at all: wrong but finite values in frozen_weights.bin, or a damaged int8 / int4 weight (not
detectable without a hash of the file, which the build does not record; hashing 2 GB would cost about as much
again as the NaN pass); the graphs beyond their LoRA inputs and outputs (ONNX Runtime validates them as it loads
them); the training_model / eval_model of ORT's training API beyond what ORT's checkpoint holds; config.json
beyond max_position_embeddings; the tokenizer files (the tokenizer checks those).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ortlora.errors import REBUILD, OrtloraError, listing
from ortlora.files import MANIFEST_NAME, artifact_file, inside, json_type, read_json
from ortlora.lora_config import module_rank, scaling
from ortlora.weights import byte_length

FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."

# What the runtime reads from a manifest, and as what: a type (or a tuple of types), [spec] for an
# array of spec, {key: spec} for an object with those keys ("key?": optional; others are allowed),
# {str: spec} for an object of any keys whose values are all spec.
NUMBER = (int, float)
SCHEMA = {
    "format": int,
    "model": {"architecture": str, "model_type": str, "source": str, "weights_sha256": str, "source_dtype?": str,
              "hub_id?": str, "revision?": str,  # a Hub model: its id and commit
              "base_precision?": str, "block_size?": int, "recompute?": str, "attention_mask?": str},
    "lora": {"rank": int, "alpha": NUMBER, "scaling": NUMBER, "dropout": NUMBER, "targets": [str], "init": str,
             "seed": int, "rslora?": bool, "layers?": [int], "rank_pattern?": {str: int}, "alpha_pattern?": {str: NUMBER},
             "dora?": bool},
    "label_smoothing": NUMBER,
    "parameters": [{"onnx_name": str, "peft_name": str, "shape": [int], "layer": int, "module": str, "kind": str}],
    "files": {"training_model": str, "eval_model": str, "checkpoint": str, "initial_lora": str, "config": str,
              "tokenizer": [str], "optimizer_model?": str, "inference_model?": str, "decoder_model?": str,
              "portable_training_model?": str, "portable_eval_model?": str, "frozen_weights?": str,
              # a bf16, int8 or int4 base's portable graphs for OpenVINO's provider (portable_graph.unordered_widening,
              # openvino_quantized.compressed_products)
              "portable_training_openvino_model?": str, "portable_eval_openvino_model?": str,
              # every base's, for --precision bf16 on OpenVINO: fp32 kept where autocast keeps it (openvino_precision)
              "portable_training_openvino_bf16_model?": str, "portable_eval_openvino_bf16_model?": str,
              # the portable graphs without NonZero and LogSoftmax, for onnxruntime-ggml (dense_loss.py)
              "portable_training_ggml_model?": str, "portable_eval_ggml_model?": str,
              # the CPU provider's portable training graph: the head's loss in a Loop over row chunks (portable_graph)
              "portable_training_cpu_model?": str,
              "external_data?": [str]},
    "io": {"training": {"inputs": [str], "outputs": [str]}, str: {"inputs": [str], "outputs": [str]}},
    "counts": {"trainable": int, "total": int},
    "versions": dict,
    "artifact_id": str,
    "frozen?": {str: {"dtype": str, "shape": [int], "offset": int, "length": int}},
    # rows [start, end) of a frozen matrix, read as a weight of their own: the vocabulary's chunks (quantize.row_views)
    "frozen_views?": {str: {"of": str, "rows": [int]}},
    "extra?": dict,
}
KINDS = {int: "an integer", NUMBER: "a number", str: "a string", dict: "an object", bool: "true or false"}
FROZEN_DTYPES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool", "uint4")
# Qwen2's adaptable projections and where each lives in a decoder layer; a LoRA parameter's name by its kind.
PARENTS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
LEAVES = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}


@dataclass(frozen=True)
class LoraParameter:
    onnx_name: str  # "model.layers.0.self_attn.q_proj.lora_A.weight": the ONNX initializer / input
    peft_name: str  # "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": adapter key
    shape: tuple[int, ...]
    layer: int
    module: str  # "q_proj"
    kind: str  # "A", "B", or "magnitude" (DoRA's lora_magnitude_vector)

    @property
    def module_path(self) -> str:
        """The adapted module's name in the base model, "model.layers.0.self_attn.q_proj" (its weight: + ".weight")."""
        marker = f".{self.module}."
        return self.onnx_name[: self.onnx_name.index(marker) + len(marker) - 1]


@dataclass
class Manifest:
    model: dict  # architecture, source dir, base weights hash; a Hub model's hub_id and revision (its commit)
    lora: dict  # rank, alpha, dropout, scaling, targets, init, seed, rslora, layers, rank/alpha_pattern, dora
    label_smoothing: float
    parameters: list[LoraParameter]
    files: dict  # role -> file name inside the artifact directory
    io: dict  # graph -> {"inputs": [...], "outputs": [...]}
    counts: dict  # trainable / total parameters
    versions: dict
    artifact_id: str
    format: int = FORMAT_VERSION
    # name -> dtype, shape, offset, length of every frozen weight in files["frozen_weights"]
    frozen: dict = field(default_factory=dict)
    # name -> {"of": a frozen matrix, "rows": [start, end]}: the same bytes as that matrix's rows
    frozen_views: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        data = asdict(self)
        (directory / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        directory = Path(directory)
        path = artifact_file(directory, MANIFEST_NAME)
        if not path.is_file():
            raise OrtloraError(
                f"{directory} is not an ortlora artifact directory (no {MANIFEST_NAME}); "
                f"build one first: ortlora-build --tiny --out {directory}"
            )
        data = read_json(path, REBUILD)
        if data.get("format") != FORMAT_VERSION:
            raise OrtloraError(f"{path} has format {data.get('format')!r}, this ortlora reads {FORMAT_VERSION}; {REBUILD}")
        problems = [f"unknown field {key!r}" for key in data if key not in {f.name for f in fields(cls)}]
        problems = problems or _problems(data, SCHEMA, "") or _value_problems(data) or _lora_problems(data)
        if problems:
            raise OrtloraError(f"{path} is damaged: {listing(problems)}; {REBUILD}")
        data["parameters"] = [LoraParameter(**{f.name: p[f.name] for f in fields(LoraParameter)} | {"shape": tuple(p["shape"])})
                              for p in data["parameters"]]
        manifest = cls(**data)
        missing = [f for f in manifest.all_files() if not inside(directory, f, str(path)).is_file()]
        if missing:
            raise OrtloraError(f"{directory} is incomplete, missing {', '.join(missing)}; {REBUILD}")
        if not Path(manifest.model["source"]).is_absolute():  # the base model bundled in the artifacts
            inside(directory, manifest.model["source"], f"{path} (model.source)")
        return manifest

    def base_model_dir(self, artifacts: Path) -> Path:
        """The base model the artifacts were built from (the tiny one is bundled inside them)."""
        source = Path(self.model["source"])
        return source if source.is_absolute() else Path(artifacts) / source

    def context_length(self, artifacts: Path) -> int:
        """The most tokens a sequence may hold: max_position_embeddings of the model's config.json."""
        path = Path(artifacts) / self.files["config"]
        value = read_json(path, REBUILD).get("max_position_embeddings")
        if type(value) is not int or value <= 0:
            raise OrtloraError(f"{path}: max_position_embeddings must be a positive integer, not {value!r}; {REBUILD}")
        return value

    def all_files(self) -> list[str]:
        files: list[str] = []
        for value in self.files.values():
            files.extend(value if isinstance(value, list) else [value])
        return files


def _problems(value, spec, where: str) -> list[str]:
    """Every place where ``value`` does not match ``spec`` (see SCHEMA), named like "lora.rank"."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{where} must be an object, not {json_type(value)}"]
        problems = []
        for key, inner in spec.items():
            if key is str:  # every other key
                keys = [k for k in value if k not in spec and f"{k}?" not in spec]
            else:
                keys = [key.rstrip("?")]
                if keys[0] not in value:
                    problems += [] if key.endswith("?") else [f"{where}.{keys[0]}".lstrip(".") + " is missing"]
                    continue
            problems += [p for k in keys for p in _problems(value[k], inner, f"{where}.{k}".lstrip("."))]
        return problems
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{where} must be an array, not {json_type(value)}"]
        return [p for i, item in enumerate(value) for p in _problems(item, spec[0], f"{where}[{i}]")]
    if (isinstance(value, bool) and spec is not bool) or not isinstance(value, spec):  # JSON's true is no number
        return [f"{where} must be {KINDS[spec]}, not {json_type(value)}"]
    return []


def _value_problems(data: dict) -> list[str]:
    """Values of the right type that still cannot be right: no rank, or a frozen weight that does not fit
    its place in the file (the runtime maps each one as dtype and shape at offset, for length bytes)."""
    problems = [] if data["lora"]["rank"] > 0 else [f"lora.rank must be positive, not {data['lora']['rank']}"]
    frozen, files = data.get("frozen") or {}, data["files"]
    if frozen and "frozen_weights" not in files:
        problems.append("files.frozen_weights is missing")
    if "portable_training_model" in files and "portable_training" not in data["io"]:
        problems.append("io.portable_training is missing")
    for name, entry in frozen.items():
        if entry["dtype"] not in FROZEN_DTYPES:
            problems.append(f"frozen.{name}.dtype is {entry['dtype']!r}, not one of {', '.join(FROZEN_DTYPES)}")
            continue
        size = byte_length(entry["dtype"], 1)
        needed = byte_length(entry["dtype"], int(np.prod(entry["shape"])))
        if min(entry["shape"], default=0) < 0 or entry["offset"] < 0 or entry["offset"] % size:
            problems.append(f"frozen.{name} has a negative dimension or a misaligned offset")
        elif entry["length"] != needed:
            problems.append(f"frozen.{name} is {entry['length']} bytes long, its dtype and shape need {needed}")
    for name, view in (data.get("frozen_views") or {}).items():
        of, rows = frozen.get(view["of"]), view["rows"]
        if name in frozen or of is None or len(of["shape"]) != 2 or of["dtype"] == "uint4" or len(rows) != 2 \
                or not 0 <= rows[0] < rows[1] <= of["shape"][0]:
            problems.append(f"frozen_views.{name} is not a range of rows of a frozen matrix")
    if problems:
        return problems
    # No two weights share bytes: an offset edited onto another weight would read its values in silence.
    places = sorted((entry["offset"], entry["offset"] + entry["length"], name) for name, entry in frozen.items())
    problems += [f"frozen.{name} overlaps frozen.{before} in the file" for (_, end, before), (start, _, name)
                 in zip(places, places[1:]) if start < end]
    return problems


def _lora_problems(data: dict) -> list[str]:
    """The LoRA settings and parameters against each other and the frozen base weights (see the module's
    docstring): a manifest whose adapter the graphs, PEFT or a merge would read as another is refused."""
    lora, params = data["lora"], data["parameters"]
    if not params:
        return ["parameters is empty: the artifacts would train an adapter of no weights"]
    problems = []
    for key in ("alpha", "scaling"):
        if not _positive(lora[key]):
            problems.append(f"lora.{key} must be a positive number, not {lora[key]!r}")
    for where, value in (("lora.dropout", lora["dropout"]), ("label_smoothing", data["label_smoothing"])):
        if not 0 <= value < 1:
            problems.append(f"{where} must be at least 0 and below 1, not {value!r}")
    for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        problems += [f"lora.{key}.{k} must be a positive {'integer' if kind is int else 'number'}, not {v!r}"
                     for k, v in (lora.get(key) or {}).items() if not isinstance(v, kind) or not _positive(v)]
        for k in lora.get(key) or {}:
            try:
                re.compile(k)
            except re.error as e:
                problems.append(f"lora.{key} key {k!r} is not a regular expression ({e})")
    unknown = [t for t in lora["targets"] if t not in PARENTS]
    if unknown or len(set(lora["targets"])) != len(lora["targets"]) or not lora["targets"]:
        problems.append(f"lora.targets is {lora['targets']}, expected some of {', '.join(PARENTS)}, each once")
    if problems:
        return problems
    made = scaling(lora["alpha"], lora["rank"], bool(lora.get("rslora")))
    if not math.isclose(lora["scaling"], made, rel_tol=1e-9):
        problems.append(f"lora.scaling is {lora['scaling']}, lora.alpha and lora.rank make {made}")

    modules: dict[str, dict[str, tuple]] = {}  # "model.layers.0.self_attn.q_proj" -> kind -> shape
    for i, p in enumerate(params):
        if p["kind"] not in LEAVES or p["module"] not in lora["targets"] or p["layer"] < 0:
            problems.append(f"parameters[{i}] (kind {p['kind']!r}, module {p['module']!r}, layer {p['layer']}) is not "
                            f"an A, B or magnitude of one of lora.targets ({', '.join(lora['targets'])})")
            continue
        path = f"model.layers.{p['layer']}.{PARENTS[p['module']]}.{p['module']}"
        name = f"{path}.{LEAVES[p['kind']]}"
        if (p["onnx_name"], p["peft_name"]) != (name, PEFT_PREFIX + name):
            problems.append(f"parameters[{i}] is named {p['onnx_name']!r} / {p['peft_name']!r}, its layer, module and "
                            f"kind make {name!r} / {PEFT_PREFIX + name!r}")
        elif p["kind"] in modules.get(path, {}):
            problems.append(f"parameters[{i}] repeats {name}")
        else:
            modules.setdefault(path, {})[p["kind"]] = tuple(p["shape"])
    if any(problem.startswith("parameters[") for problem in problems):  # what follows would only repeat them
        return problems

    layers = sorted({int(path.split(".")[2]) for path in modules})
    frozen = data.get("frozen") or {}
    model = sorted({int(n.split(".")[2]) for n in frozen if n.startswith("model.layers.")})  # the base's layers
    wanted = lora["layers"] if "layers" in lora else model or list(range(len(layers)))  # none: every layer
    if layers != sorted(set(wanted)) or not set(layers) <= set(model or layers):
        problems.append(f"the parameters adapt layers {layers}, lora.layers says "
                        + (f"{lora['layers']}" if "layers" in lora else f"every layer ({model or '0 to N-1'})")
                        + (f" of the base's {model}" if model and "layers" in lora else ""))
    missing = [f"model.layers.{i}.{PARENTS[t]}.{t}" for i in layers for t in lora["targets"]
               if f"model.layers.{i}.{PARENTS[t]}.{t}" not in modules]
    if missing:
        problems.append(f"lora.targets has no parameters for {listing(missing, 3)}")

    kinds = {"A", "B"} | ({"magnitude"} if lora.get("dora") else set())
    dims: dict[str, tuple[int, int]] = {}
    for path, shapes in modules.items():
        rank, module = module_rank(lora, path), path.split(".")[-1]
        a, b, m = shapes.get("A"), shapes.get("B"), shapes.get("magnitude")
        if set(shapes) != kinds:
            problems.append(f"{path} has {', '.join(sorted(shapes))}, a{' DoRA' if lora.get('dora') else ''} "
                            f"module has {', '.join(sorted(kinds))}")
        elif len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank or min(a + b) <= 0 or m not in (None, b[:1]):
            problems.append(f"{path} has lora_A {list(a)}, lora_B {list(b)}" + (f", magnitude {list(m)}" if m else "")
                            + f"; its rank {rank} needs [{rank}, in], [out, {rank}]" + (", [out]" if m else ""))
        elif frozen:  # the base weight: [in, out] stored transposed, else [out, in] (float or quantized)
            base = frozen.get(f"{path}.weight.T", {}).get("shape")
            base = base[::-1] if base else (frozen.get(f"{path}.weight") or frozen.get(f"{path}.weight.q") or {}).get("shape")
            if base is None:
                problems.append(f"{path} has no base weight in frozen")
            elif [b[0], a[1]] != list(base):
                problems.append(f"{path} has lora_A {list(a)} and lora_B {list(b)}, its base weight is {list(base)} "
                                "(out, in)")
        elif dims.setdefault(module, (b[0], a[1])) != (b[0], a[1]):
            problems.append(f"{path} is {b[0]} x {a[1]} (out x in), {module} of another layer {dims[module][0]} x "
                            f"{dims[module][1]}")
    total = sum(math.prod(p["shape"]) for p in params)
    if data["counts"]["trainable"] != total:
        problems.append(f"counts.trainable is {data['counts']['trainable']}, the parameters hold {total}")
    # The portable backend feeds every parameter by name and binds each gradient output to the parameter in the
    # same place: loss, then one NAME_grad per parameter, in the parameters' order.
    names = [p["onnx_name"] for p in params]
    portable = data["io"].get("portable_training")
    if portable and portable["outputs"] != ["loss"] + [f"{name}_grad" for name in names]:
        problems.append("io.portable_training.outputs are not loss and the gradient of each parameter, in order")
    elif portable and not set(names) <= set(portable["inputs"]):
        problems.append(f"io.portable_training.inputs lack {listing(sorted(set(names) - set(portable['inputs'])), 2)}")
    return problems


def _positive(value) -> bool:
    """A finite positive number (an integer too large for a float is not one)."""
    try:
        return not isinstance(value, bool) and math.isfinite(value) and value > 0
    except (OverflowError, TypeError):
        return False
