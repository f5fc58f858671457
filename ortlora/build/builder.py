"""The build step: HF model directory -> artifact directory (ONNX graphs, ORT artifacts, manifest)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ortlora import hub
from ortlora.build import dense_loss, frozen_weights, portable_graph, training_artifacts
from ortlora.build.export import stamp_ir_version
from ortlora.build.model_dir import TOKENIZER_FILES, architecture, check_model_dir, expected_weights, source_dtype
from ortlora.build.quantize import BLOCK_SIZE, PRECISIONS, QMAX, chunks_by_matrix, row_views
from ortlora.build.recompute import MODES as RECOMPUTE_MODES
from ortlora.errors import OrtloraError
from ortlora.files import byte_size
from ortlora.lora_config import scaling
from ortlora.manifest import PEFT_PREFIX, LoraParameter, Manifest
from ortlora.output_dirs import check_output_dir, replace_dir, staging_dir
from ortlora.weights import stored_tensors, weight_files, weights_sha256

INFERENCE_MODEL = "inference_model.onnx"
DECODER_MODEL = "decoder_model.onnx"
INITIAL_LORA = "initial_lora.safetensors"  # the LoRA weights before training, by ONNX name
BASE_CONFIG = "config.json"
BUNDLED_BASE = "base_model"
FREE_SPACE_MARGIN = 64 << 20  # graphs, tokenizer and checkpoint beside the frozen weights


@dataclass
class BuildOptions:
    model_dir: Path
    out_dir: Path
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    label_smoothing: float = 0.0
    seed: int = 0
    force: bool = False
    bundle_base: bool = False  # copy the base model into the artifacts (the tiny default)
    base_precision: str = "fp32"  # the frozen matrices: fp32, bf16, or blockwise int8 / int4 (quantize.py)
    block_size: int = BLOCK_SIZE  # inputs that share a scale in a quantized base
    recompute: str = "none"  # "layers": decoder layers recomputed in the backward pass (recompute.py)
    # LoRA variants, PEFT's (lora_config.py): A's initialisation, rsLoRA, a subset of the decoder layers
    # ("last:N", "N" or "0,1,5-7"; None: all), a rank / alpha per module name (a dict, or the CLI's text), DoRA.
    init: str = "gaussian"
    rslora: bool = False
    layers: str | None = None
    rank_pattern: dict | str | None = None
    alpha_pattern: dict | str | None = None
    dora: bool = False


class Stages:
    """Prints each stage of the build with its wall time."""

    def __init__(self, total: int, echo=print):
        self.total, self.done, self.echo, self.times = total, 0, echo, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.done += 1
        self.echo(f"[{self.done}/{self.total}] {name} ...", flush=True)
        start = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - start, 2)
        self.echo(f"      done in {self.times[name]:.1f} s", flush=True)


def check_out_dir(out_dir: Path, force: bool, model_dir: Path | None = None) -> None:
    """Refuse an --out that --force may not replace (output_dirs.check_output_dir), before any work."""
    check_output_dir(out_dir, flag="--force", replace=force, what="ortlora-build",
                     reads=[model_dir] if model_dir else [])


def check_free_space(directory: Path, needed: int, replacing: bool = False) -> None:
    """The frozen weights are written in float32 (4 bytes a parameter, twice a bf16 checkpoint): say so
    before the work when the disk cannot hold them, not when a write fails half-way."""
    free, needed = shutil.disk_usage(directory).free, needed + FREE_SPACE_MARGIN
    if free < needed:
        beside = ", beside the build in --out until the new one is complete" if replacing else ""
        raise OrtloraError(f"{directory.parent} has {byte_size(free)} free and the artifacts need {byte_size(needed)} "
                           f"(the frozen weights{beside}); free some space or choose an --out on another disk")


def check_training_build() -> None:
    """generate_artifacts needs ORT's training build; the plain onnxruntime package only trains."""
    from ortlora.runtime.backend import has_training_api

    if not has_training_api():
        import onnxruntime

        raise OrtloraError(f"ortlora-build needs onnxruntime-training-cpu 1.19.2 (CPython 3.11 or 3.12), and this "
                           f"onnxruntime {onnxruntime.__version__} is the plain package; build in such an environment, "
                           f"then train anywhere")


def build(options: BuildOptions, echo=print) -> Manifest:
    """Build the artifacts into a staging directory beside ``out_dir``, then move them in place.

    A build that fails leaves ``out_dir`` as it was: nothing half-written carries a manifest.
    """
    config = check_model_dir(options.model_dir)
    check_out_dir(options.out_dir, options.force, options.model_dir)
    check_training_build()
    if not 0.0 <= options.label_smoothing < 1.0:
        raise OrtloraError(f"--label-smoothing must be in [0, 1), got {options.label_smoothing}")
    if options.recompute not in RECOMPUTE_MODES:
        raise OrtloraError(f"--recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {options.recompute}")
    if options.base_precision not in PRECISIONS:
        raise OrtloraError(f"--base-precision must be one of {', '.join(PRECISIONS)}, got {options.base_precision}")
    # Every matrix is quantized in blocks along its inputs: the hidden and intermediate sizes, and the
    # attention heads' width (o_proj), which differs from the hidden size where config.json sets head_dim.
    widths = sorted({shape[1] for shape in expected_weights(config).values() if len(shape) == 2})
    if options.base_precision in QMAX and (options.block_size <= 0 or any(w % options.block_size for w in widths)):
        raise OrtloraError(f"--block-size must divide the input width of every matrix of the model "
                           f"({', '.join(map(str, widths))}), got {options.block_size}")
    variant = lora_variant(options, config)
    with staging_dir(options.out_dir) as staging:
        manifest = _build_into(staging, config, options, variant, echo)
        replace_dir(staging, options.out_dir, "ortlora-build")
    return manifest


def lora_variant(options: BuildOptions, config: dict) -> dict:
    """The LoRA variant's settings, checked and resolved against the model (lora.inject_lora's keywords)."""
    from ortlora.build.lora import ATTENTION_TARGETS
    from ortlora.lora_config import INITS, parse_layers, parse_pattern, unmatched_keys

    if options.init not in INITS:
        raise OrtloraError(f"--init must be one of {', '.join(INITS)}, got {options.init}")
    if options.dora and options.base_precision != "fp32":
        raise OrtloraError(f"--dora needs an fp32 base: DoRA's weight norms read the whole base matrix, which a "
                           f"--base-precision {options.base_precision} build does not support yet")
    patterns = {}
    for field, option, integer in (("rank_pattern", "--rank-pattern", True), ("alpha_pattern", "--alpha-pattern", False)):
        value = getattr(options, field) or {}
        patterns[field] = parse_pattern(value if isinstance(value, str) else json.dumps(value), option, integer)
    layers = None if options.layers is None else parse_layers(str(options.layers), config["num_hidden_layers"])
    # A pattern key that matches no adapted module is most likely a typo (PEFT would ignore it): say so now.
    modules = [f"model.layers.{i}.{'self_attn' if t in ATTENTION_TARGETS else 'mlp'}.{t}"
               for i in (layers if layers is not None else range(config["num_hidden_layers"])) for t in options.targets]
    problems = unmatched_keys(patterns, modules)
    if problems:
        raise OrtloraError(f"{'; '.join(problems)} (adapted: {', '.join(options.targets)} in layers "
                           f"{', '.join(map(str, layers)) if layers is not None else 'all'})")
    return {"init": options.init, "rslora": bool(options.rslora), "layers": layers, **patterns, "dora": bool(options.dora)}


def _initial_magnitudes(model_dir: Path, names: list[str]) -> dict:
    """DoRA's initial magnitude of each adapted module: the L2 norm of each row of its base weight W (B is
    zero, so ||W + scaling B A|| is ||W||), read from the checkpoint one matrix at a time."""
    import numpy as np

    from ortlora.build.lora import MAGNITUDE
    from ortlora.weights import to_float32

    stored = stored_tensors(weight_files(model_dir))
    result = {}
    for name in names:
        if name.endswith(MAGNITUDE):
            tensor = stored[name[: -len(MAGNITUDE)] + "weight"]
            result[name] = np.linalg.norm(to_float32(tensor.dtype, tensor.read()), axis=1).astype(np.float32)
    return result


def _build_into(staging: Path, config: dict, options: BuildOptions, variant: dict, echo) -> Manifest:
    import onnxruntime
    import torch
    import transformers
    from safetensors.numpy import save_file

    from ortlora.build.decoder import cache_names, export_decoder
    from ortlora.build.export import CausalLMLogits, CausalLMLoss, export_onnx, inputs_to_initializers, load_exported
    from ortlora.build.skeleton import load_skeleton

    onnxruntime.set_default_logger_severity(3)  # ORT's graph-transformer chatter is not for users
    transformers.logging.disable_progress_bar()
    stages = Stages(8, echo)
    with stages("reading the model's shape from config.json (no weight is loaded)"):
        skeleton = load_skeleton(options.model_dir, list(options.targets), options.rank, options.alpha,
                                 options.dropout, options.seed, **variant)
        model, lora_values, frozen = skeleton.model, skeleton.lora, skeleton.frozen
        lora_names = list(lora_values)
        for name, norms in _initial_magnitudes(options.model_dir, lora_names).items():
            lora_values[name].copy_(torch.from_numpy(norms))
        total_base, trainable = skeleton.frozen_count, sum(v.numel() for v in lora_values.values())
        echo(f"      trainable params: {trainable:,} || all params: {total_base + trainable:,} "
             f"|| trainable%: {100 * trainable / (total_base + trainable):.4f}")

    # A small example batch drives tracing; every axis that matters is exported as dynamic.
    example_ids = torch.randint(0, config["vocab_size"], (2, 8))
    example_mask = torch.ones_like(example_ids)
    lora_inputs = tuple(lora_values.values())
    work = staging / "work"
    work.mkdir()

    with stages("exporting the graphs (loss, inference, decoder with key/value cache)"):
        if options.dropout > 0:
            for module in model.modules():
                if type(module).__name__ == "LoRALinear":
                    module.lora_dropout.train()
        export_onnx(CausalLMLoss(model, lora_names, options.label_smoothing),
                    (example_ids, example_mask, example_ids.clone(), *lora_inputs),
                    ["input_ids", "attention_mask", "labels", *lora_names], ["loss"], work / "loss.onnx",
                    fold=options.dropout == 0, frozen=frozen)
        model.eval()
        export_onnx(CausalLMLogits(model, lora_names), (example_ids, example_mask, *lora_inputs),
                    ["input_ids", "attention_mask", *lora_names], ["logits"], work / "inference.onnx", fold=True,
                    frozen=frozen)
        export_decoder(model, lora_names, lora_values, work / "decoder.onnx", frozen)
        graphs = {name: load_exported(work / f"{name}.onnx") for name in ("loss", "inference", "decoder")}
        shutil.rmtree(work)
        storage = frozen_weights.plan(list(graphs.values()), {name: tuple(t.shape) for name, t in frozen.items()},
                                      options.base_precision, options.block_size)
        for graph in graphs.values():
            frozen_weights.fold(graph, storage)

    places = frozen_weights.layout(storage)
    size = sum(place["length"] for place in places.values())
    check_free_space(staging, size, replacing=options.out_dir.exists())
    stored_as = {"fp32": "float32", "bf16": "bfloat16 matrices"}.get(options.base_precision,
                                                                     f"{options.base_precision} matrices")
    with stages(f"writing {frozen_weights.FROZEN_WEIGHTS} from the checkpoint ({byte_size(size)}, {stored_as})"):
        with tqdm(total=size, unit="B", unit_scale=True, leave=False, disable=None) as bar:
            frozen_weights.write(storage, places, stored_tensors(weight_files(options.model_dir)),
                                 staging / frozen_weights.FROZEN_WEIGHTS, bar.update)
        views = row_views(places)
        references = frozen_weights.references(places, views=views)

    with stages("generating training artifacts (gradient graph, optimizer, checkpoint)"):
        loss_model = graphs.pop("loss")
        inputs_to_initializers(loss_model, lora_values, keep_as_inputs=False)
        _check_lora_initializers(loss_model, lora_values)
        stamp_ir_version(loss_model)
        lora_arrays = {name: value.numpy() for name, value in lora_values.items()}
        whole_head, chunked_head = training_artifacts.generate(loss_model, lora_arrays, references, staging,
                                                                options.label_smoothing, options.recompute,
                                                                chunks_by_matrix(views))

    with stages("writing the portable training graph (standard ONNX for any onnxruntime)"):
        frozen_weights.attach(loss_model, references)
        lora_shapes = {name: value.shape for name, value in lora_arrays.items()}
        portable_graph.write(loss_model, whole_head, chunked_head, references, lora_shapes, staging)
        # The same graphs without NonZero and LogSoftmax, for onnxruntime-ggml (dense_loss.py): a float32 base only
        # (ggml 0.2.0 refused bf16 tensors and took none of an int8 base's), and no label smoothing.
        ggml_graphs = dense_loss.write(staging) if options.base_precision == "fp32" and not options.label_smoothing \
            else {}
        save_file(lora_arrays, str(staging / INITIAL_LORA))
        del loss_model

    with stages("saving the inference and generation graphs"):
        for name, path in (("inference", INFERENCE_MODEL), ("decoder", DECODER_MODEL)):
            _save_with_lora_defaults(graphs.pop(name), lora_values, staging / path, references)

    with stages("copying tokenizer and config"):
        tokenizer_files = [f for f in TOKENIZER_FILES if (options.model_dir / f).is_file()]
        for name in [*tokenizer_files, BASE_CONFIG]:
            shutil.copy2(options.model_dir / name, staging / name)
        base_hash = weights_sha256(options.model_dir)
        if options.bundle_base:
            shutil.copytree(options.model_dir, staging / BUNDLED_BASE)

    with stages("checking that ONNX Runtime loads every artifact"):
        _check_loads(staging, lora_names, places, views)

    past_names, present_names = cache_names(config["num_hidden_layers"])
    files = {
        "training_model": training_artifacts.TRAINING_MODEL,
        "eval_model": training_artifacts.EVAL_MODEL,
        "optimizer_model": training_artifacts.OPTIMIZER_MODEL,
        "checkpoint": training_artifacts.CHECKPOINT,
        "inference_model": INFERENCE_MODEL,
        "decoder_model": DECODER_MODEL,
        "portable_training_model": portable_graph.PORTABLE_TRAINING,
        "portable_eval_model": portable_graph.PORTABLE_EVAL,
        "portable_training_cpu_model": portable_graph.CPU_TRAINING,
        **({"portable_training_openvino_model": portable_graph.OPENVINO_TRAINING,
            "portable_eval_openvino_model": portable_graph.OPENVINO_EVAL} if options.base_precision != "fp32" else {}),
        "portable_training_openvino_bf16_model": portable_graph.OPENVINO_BF16_TRAINING,
        "portable_eval_openvino_bf16_model": portable_graph.OPENVINO_BF16_EVAL,
        **ggml_graphs,
        "frozen_weights": frozen_weights.FROZEN_WEIGHTS,
        "initial_lora": INITIAL_LORA,
        "config": BASE_CONFIG,
        "tokenizer": tokenizer_files,
        # Weights of large models, beside the files that point into them (inference_model.onnx.data, ...).
        "external_data": sorted(p.name for p in staging.glob("*.data")),
    }
    lora = {
        "rank": options.rank,
        "alpha": options.alpha,
        "scaling": scaling(options.alpha, options.rank, variant["rslora"]),  # modules' own with a pattern
        "dropout": options.dropout,
        "targets": list(options.targets),
        "init": variant["init"],
        "seed": options.seed,
        "rslora": variant["rslora"],
        **({"layers": variant["layers"]} if variant["layers"] is not None else {}),  # absent: every layer
        "rank_pattern": variant["rank_pattern"],
        "alpha_pattern": variant["alpha_pattern"],
        "dora": variant["dora"],
    }
    model_info = {
        "architecture": (config.get("architectures") or [architecture(config).name])[0],
        "model_type": config["model_type"],
        # Relative paths are inside the artifact directory.
        "source": BUNDLED_BASE if options.bundle_base else str(options.model_dir.resolve()),
        **hub.snapshot_record(options.model_dir),  # a Hub model (a snapshot in huggingface_hub's cache): id, commit
        "weights_sha256": base_hash,
        "source_dtype": source_dtype(options.model_dir),
        # The frozen matrices as stored: fp32 or bf16 whatever the source, or blockwise int8 / int4.
        "base_precision": options.base_precision,
        **({"block_size": options.block_size} if options.base_precision in QMAX else {}),
        # How the training graphs keep activations: "layers" recomputes each decoder layer in the backward pass.
        "recompute": options.recompute,
        # The loss graphs read attention_mask as segment ids: examples packed into a row attend to themselves.
        "attention_mask": "segments",
    }
    identity = json.dumps([model_info["weights_sha256"], lora, options.label_smoothing, options.base_precision,
                           options.block_size if options.base_precision in QMAX else None], sort_keys=True)
    manifest = Manifest(
        model=model_info,
        lora=lora,
        label_smoothing=options.label_smoothing,
        parameters=[_describe(name, tuple(value.shape)) for name, value in lora_values.items()],
        files=files,
        frozen=places,
        frozen_views=views,
        io={
            "training": {"inputs": ["input_ids", "attention_mask", "labels"], "outputs": ["loss"]},
            "inference": {"inputs": ["input_ids", "attention_mask", *lora_names], "outputs": ["logits"]},
            "decoder": {"inputs": ["input_ids", "attention_mask", *lora_names, *past_names],
                        "outputs": ["logits", *present_names]},
            "portable_training": {"inputs": ["input_ids", "attention_mask", "labels", *lora_names],
                                  "outputs": ["loss", *(n + portable_graph.GRAD_SUFFIX for n in lora_names)]},
        },
        counts={"trainable": trainable, "total": total_base + trainable},
        versions=_versions(),
        artifact_id=hashlib.sha256(identity.encode()).hexdigest()[:16],
        extra={"build_seconds": stages.times},
    )
    manifest.save(staging)  # written last: its presence marks a complete build
    return manifest


def _save_with_lora_defaults(model, lora_values: dict, path: Path, references: dict) -> None:
    """Save an exported graph whose LoRA weights stay inputs, with their initial values as defaults:
    any adapter can be fed in, and without one the graph is the base model. Its frozen weights are
    read from frozen_weights.bin (``references``)."""
    from ortlora.build.export import inputs_to_initializers, save_model

    inputs_to_initializers(model, lora_values, keep_as_inputs=True)
    frozen_weights.attach(model, references, fused_products=True)
    stamp_ir_version(model)
    save_model(model, path)


def _describe(name: str, shape: tuple[int, ...]) -> LoraParameter:
    # name: model.layers.{layer}.{self_attn|mlp}.{module}.lora_{A|B}.weight or ....{module}.lora_magnitude_vector
    parts = name.split(".")
    return LoraParameter(
        onnx_name=name,
        peft_name=PEFT_PREFIX + name,
        shape=shape,
        layer=int(parts[2]),
        module=parts[4],
        kind="magnitude" if parts[5] == "lora_magnitude_vector" else parts[5][-1],
    )


def _check_lora_initializers(model, lora_values: dict) -> None:
    """Every LoRA weight must be its own initializer (see the exporter's de-duplication pass)."""
    initializers = {init.name: tuple(init.dims) for init in model.graph.initializer}
    bad = [n for n, v in lora_values.items() if initializers.get(n) != tuple(v.shape)]
    if bad:
        raise RuntimeError(f"export lost or reshaped LoRA weights: {bad[:3]}")


def _check_loads(directory: Path, lora_names: list[str], places: dict[str, dict], views: dict[str, dict]) -> None:
    """Create every session the runtime creates, as it does: the frozen weights mapped once and handed to
    each session (runtime/frozen.py), so ONNX Runtime reads none of them into memory of its own (left to
    itself, ORT's training API failed to allocate a 7B model's 28 GiB here)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state as C

    from ortlora.runtime.frozen import share_with
    from ortlora.weights import map_layout, views_of

    weights = map_layout(directory / frozen_weights.FROZEN_WEIGHTS, places)
    weights |= views_of(weights, views)
    shared = []  # the OrtValues over the mapping, which must outlive the sessions

    def options(frozen: bool = True):
        result = ort.SessionOptions()
        result.log_severity_level = 3  # LoRA inputs with default initializers are intended, not a warning
        result.add_session_config_entry("session.disable_prepacking", "1")  # no second copy of the weights
        if frozen:
            shared.extend(share_with(result, weights))
        return result

    state = C.load_checkpoint(str(directory / training_artifacts.CHECKPOINT))
    device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
    module = C.Module(
        str(directory / training_artifacts.TRAINING_MODEL),
        state,
        str(directory / training_artifacts.EVAL_MODEL),
        device,
        options(),
    )
    C.Optimizer(str(directory / training_artifacts.OPTIMIZER_MODEL), state, device, options(frozen=False))
    names = sorted(state.parameter_names())
    trainable = sorted(n for n in names if state.get_parameter(n).requires_grad)
    if names != sorted(lora_names) or trainable != names:
        raise RuntimeError(f"the checkpoint should hold exactly the LoRA weights, all trainable: {names[:4]}")
    del module, state
    for name in (INFERENCE_MODEL, DECODER_MODEL, portable_graph.PORTABLE_TRAINING, portable_graph.PORTABLE_EVAL):
        ort.InferenceSession(str(directory / name), options(), providers=["CPUExecutionProvider"])
    # The CPU provider's training graph (the head in the training model's Loop), checked by onnx only, as ggml's below
    # (a session of a training graph costs seconds at 0.5B); tests/test_portable.py and the ort-session parity tests
    # run it.
    onnx.checker.check_model(str(directory / portable_graph.CPU_TRAINING), full_check=True)
    four_bit = any(place["dtype"] == "uint4" for place in places.values())
    # One provider's graphs: OpenVINO's of a bf16 / int8 / int4 base, loaded unoptimized (the CPU provider would fold a
    # float32 copy of each matrix), or checked by onnx only for int4 (ONNX Runtime 1.19 cannot Reshape uint4 blocks);
    # OpenVINO's of a float32 base (the default graphs and one output) and ggml's, checked by onnx only (a session of
    # the training graph took 4.7 s of a 0.5B build's 48, the checker 0.3 s; tests/test_dense_loss.py and
    # tests/test_precision.py run the rewrites against the default graphs).
    float_base = not any(place["dtype"] in ("bfloat16", "int8", "uint4") for place in places.values())
    for name in (portable_graph.OPENVINO_TRAINING, portable_graph.OPENVINO_EVAL, portable_graph.OPENVINO_BF16_TRAINING,
                 portable_graph.OPENVINO_BF16_EVAL, dense_loss.GGML_TRAINING, dense_loss.GGML_EVAL):
        if not (directory / name).is_file():
            continue
        if four_bit or float_base or name in (dense_loss.GGML_TRAINING, dense_loss.GGML_EVAL):
            onnx.checker.check_model(str(directory / name), full_check=True)
            continue
        unoptimized = options()
        unoptimized.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        ort.InferenceSession(str(directory / name), unoptimized, providers=["CPUExecutionProvider"])


def _versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    import ortlora

    return {
        "ortlora": ortlora.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
