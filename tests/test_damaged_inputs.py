"""Damaged artifacts and adapters taken at their word (issue 25): each is refused in one ``error:`` line that says what
is wrong and what to do, before anything trains, generates or is exported from it.

1. A manifest that contradicts itself (no parameters, shapes or rank that do not fit each other, the frozen base
   weights or ORT's checkpoint) and a frozen_weights.bin of the right size holding NaN or garbage.
2. Adapters: integer or boolean LoRA tensors, an mlx-lm adapter_config.json whose scale, rank, num_layers or keys
   disagree with its tensors, and a PEFT adapter_config.json that PEFT would read as another adapter (lm_head in
   its targets, modules_to_save, ...), which ``ortlora-export --to peft`` would otherwise copy.
3. A safetensors file is judged by its header before any tensor is read: a huge tensor under a name or of a shape
   not expected costs its header alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ortlora.errors import OrtloraError
from ortlora.handoff import cli as export_cli
from ortlora.manifest import Manifest
from ortlora.runtime import cli as train_cli
from ortlora.runtime import generate_cli
from ortlora.runtime.backend import has_training_api
from ortlora.runtime.checkpoint import load_adapter, load_resume_state
from ortlora.weights import f32_to_bf16, read_expected, write_safetensors
from tests.cli_helpers import one_line

FAST = ["--no-progress", "--no-plot", "--batch-size", "4", "--max-steps", "1"]
needs_training_api = pytest.mark.skipif(not has_training_api(), reason="needs onnxruntime-training")


@pytest.fixture
def adapter(trained_adapter, tmp_path) -> Path:
    """A copy of a trained checkpoint (a PEFT adapter with ortlora's adapter_config.json) that a test may damage."""
    return Path(shutil.copytree(trained_adapter, tmp_path / "adapter"))


def train(artifacts: Path, tmp_path: Path, *extra: str) -> int:
    return train_cli.main(["--artifacts", str(artifacts), "--out", str(tmp_path / "run"), *FAST, *extra])


def generate(artifacts: Path, *extra: str) -> int:
    return generate_cli.main(["--artifacts", str(artifacts), "--prompt", "hi", "--max-new-tokens", "2", *extra])


def export(artifacts: Path, adapter: Path, to: str, out: Path) -> int:
    return export_cli.main(["--artifacts", str(artifacts), "--adapter", str(adapter), "--to", to, "--out", str(out)])


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))  # NaN and Infinity as Python's json writes them (and reads them back)


# -- 1. damaged artifacts ------------------------------------------------------------------------------

def _same_rank(rank: int):
    """Rank, scaling, shapes and count all edited to one other rank: a manifest consistent in itself."""
    def change(d):
        d["lora"].update(rank=rank, scaling=d["lora"]["alpha"] / rank)
        for p in d["parameters"]:
            p["shape"] = [rank, p["shape"][1]] if p["kind"] == "A" else [p["shape"][0], rank]
        d["counts"]["trainable"] = sum(math.prod(p["shape"]) for p in d["parameters"])
    return change


MANIFESTS = {
    "no parameters": (lambda d: d.update(parameters=[]), "parameters is empty"),
    "rank edited": (lambda d: d["lora"].update(rank=4), "q_proj has lora_A [8, 64], lora_B [64, 8]; its rank 4 needs"),
    "a shape edited": (lambda d: d["parameters"][0].update(shape=[8, 32]),
                       "model.layers.0.self_attn.q_proj has lora_A [8, 32] and lora_B [64, 8], its base weight is "
                       "[64, 64] (out, in)"),
    "a parameter twice": (lambda d: d["parameters"].__setitem__(1, d["parameters"][0]),
                          "parameters[1] repeats model.layers.0.self_attn.q_proj.lora_A.weight"),
    "a parameter dropped": (lambda d: d["parameters"].pop(1), "model.layers.0.self_attn.q_proj has A, a module has A, B"),
    "a module dropped": (lambda d: d["parameters"].__delitem__(slice(0, 2)),
                         "lora.targets has no parameters for model.layers.0.self_attn.q_proj"),
    "a target without parameters": (lambda d: d["lora"].update(targets=["q_proj", "k_proj", "v_proj"]),
                                    "lora.targets has no parameters for model.layers.0.self_attn.k_proj"),
    "lm_head as a target": (lambda d: d["lora"].update(targets=["q_proj", "v_proj", "lm_head"]),
                            "lora.targets is ['q_proj', 'v_proj', 'lm_head'], expected some of q_proj"),
    "a parameter of another module": (lambda d: d["parameters"][0].update(module="k_proj"),
                                      "parameters[0] (kind 'A', module 'k_proj', layer 0) is not an A, B or magnitude"),
    "a renamed parameter": (lambda d: d["parameters"][0].update(peft_name="lm_head.lora_A.weight"),
                            "its layer, module and kind make 'model.layers.0.self_attn.q_proj.lora_A.weight'"),
    "alpha edited": (lambda d: d["lora"].update(alpha=32.0), "lora.scaling is 2.0, lora.alpha and lora.rank make 4.0"),
    "alpha NaN": (lambda d: d["lora"].update(alpha=float("nan")), "lora.alpha must be a positive number, not nan"),
    "dropout 1.5": (lambda d: d["lora"].update(dropout=1.5), "lora.dropout must be at least 0 and below 1, not 1.5"),
    "DoRA without magnitudes": (lambda d: d["lora"].update(dora=True), "a DoRA module has A, B, magnitude"),
    "layers edited": (lambda d: d["lora"].update(layers=[0]), "the parameters adapt layers [0, 1], lora.layers says [0]"),
    "rank pattern edited": (lambda d: d["lora"].update(rank_pattern={"v_proj": 4}),
                            "v_proj has lora_A [8, 64], lora_B [32, 8]; its rank 4 needs [4, in], [out, 4]"),
    "count edited": (lambda d: d["counts"].update(trainable=5), "counts.trainable is 5, the parameters hold 3584"),
    "alpha beyond any float": (lambda d: d["lora"].update(alpha=10**400), "lora.alpha must be a positive number"),
    "a rank pattern that is no regular expression": (lambda d: d["lora"].update(rank_pattern={"(": 4}),
                                                     "lora.rank_pattern key '(' is not a regular expression"),
    # Two LoRA weights of the same shape swapped: the portable backend would bind each gradient to the other.
    "parameters swapped": (lambda d: d.update(parameters=[d["parameters"][4], *d["parameters"][1:4],
                                                          d["parameters"][0], *d["parameters"][5:]]),
                           "io.portable_training.outputs are not loss and the gradient of each parameter, in order"),
    "a frozen weight moved onto another": (
        lambda d: d["frozen"]["model.layers.1.self_attn.q_proj.weight.T"].update(
            offset=d["frozen"]["model.layers.0.self_attn.q_proj.weight.T"]["offset"]),
        "frozen.model.layers.1.self_attn.q_proj.weight.T overlaps frozen.model.layers.0.self_attn.q_proj.weight.T"),
    "rows beyond their matrix": (lambda d: d.update(frozen_views={"head.rows0_9999": {
        "of": "model.embed_tokens.weight", "rows": [0, 9999]}}), "frozen_views.head.rows0_9999 is not a range of rows"),
    "rows of no frozen weight": (lambda d: d.update(frozen_views={"head.rows0_10": {"of": "lm_head", "rows": [0, 10]}}),
                                 "frozen_views.head.rows0_10 is not a range of rows of a frozen matrix"),
    "the last layer dropped": (lambda d: [d.update(parameters=[p for p in d["parameters"] if p["layer"] == 0]),
                                          d["counts"].update(trainable=1792)],
                               "the parameters adapt layers [0], lora.layers says every layer ([0, 1])"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_a_manifest_that_contradicts_itself_is_one_line(copy, tmp_path, capsys, case):
    change, message = MANIFESTS[case]
    edit_json(copy / "ortlora.json", change)
    err = one_line(capsys, train(copy, tmp_path))
    assert str(copy / "ortlora.json") in err and message in err and "rebuild the artifacts" in err


def test_every_command_reads_the_manifest_checked(copy, adapter, tmp_path, capsys):
    edit_json(copy / "ortlora.json", lambda d: d.update(parameters=[]))
    assert "parameters is empty" in one_line(capsys, generate(copy))
    assert "parameters is empty" in one_line(capsys, export(copy, adapter, "peft", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend", [pytest.param("ort-training", marks=needs_training_api), "ort-session"])
def test_a_consistently_edited_rank_is_refused_by_the_weights_it_meets(copy, tmp_path, capsys, backend):
    """Rank, scaling, shapes and counts edited together: the manifest agrees with itself (and with the frozen base,
    rank being no base dimension), but not with the LoRA weights of ORT's checkpoint or initial_lora.safetensors."""
    edit_json(copy / "ortlora.json", _same_rank(4))
    Manifest.load(copy)  # consistent in itself
    err = one_line(capsys, train(copy, tmp_path, "--backend", backend))
    source = "checkpoint" if backend == "ort-training" else "initial_lora.safetensors"
    assert f"{copy / source} does not match the manifest" in err and "rebuild the artifacts" in err
    assert "model.layers.0.self_attn.q_proj.lora_A.weight has shape (8, 64), expected (4, 64)" in err


@pytest.mark.parametrize("command", ["ort-session", "generate"])
def test_graphs_whose_lora_weights_differ_from_the_manifest_are_one_line(copy, tmp_path, capsys, command):
    """The manifest and initial_lora.safetensors edited together to rank 4: the graphs still take rank 8, and
    feeding them would fail at the first step (was: error: unexpected RuntimeError ... invalid dimensions)."""
    edit_json(copy / "ortlora.json", _same_rank(4))
    initial = load_file(copy / "initial_lora.safetensors")
    save_file({n: np.ascontiguousarray(a[:4] if "lora_A" in n else a[:, :4]) for n, a in initial.items()},
              copy / "initial_lora.safetensors")
    code = generate(copy) if command == "generate" else train(copy, tmp_path, "--backend", command)
    err = one_line(capsys, code)
    graph = "decoder_model.onnx" if command == "generate" else "portable_training_cpu.onnx"  # the CPU provider's
    assert f"{copy / graph} does not match the manifest: model.layers.0.self_attn.q_proj.lora_A.weight is [8, 64], " \
           "the manifest says [4, 64]" in err and "rebuild the artifacts" in err


def _nan_in_one_weight(artifacts: Path) -> str:
    manifest = Manifest.load(artifacts)
    name = next(n for n, p in manifest.frozen.items() if "layers.1.mlp" in n and p["dtype"] == "float32")
    with open(artifacts / "frozen_weights.bin", "r+b") as f:
        f.seek(manifest.frozen[name]["offset"] + 40)
        f.write(np.array([np.nan], np.float32).tobytes())
    return name


def _garbage(artifacts: Path) -> str:
    path = artifacts / "frozen_weights.bin"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))  # the right size, random bits
    return "model.embed_tokens.weight"


@pytest.mark.parametrize("damage", [_nan_in_one_weight, _garbage])
@pytest.mark.parametrize("command", [pytest.param("ort-training", marks=needs_training_api), "ort-session", "generate"])
def test_frozen_weights_holding_nan_or_garbage_are_one_line(copy, tmp_path, capsys, damage, command):
    name = damage(copy)
    code = generate(copy) if command == "generate" else train(copy, tmp_path, "--backend", command)
    err = one_line(capsys, code)
    assert f"{copy / 'frozen_weights.bin'} holds NaN or infinite values in {name}" in err
    assert "rebuild the artifacts" in err


# -- 2. adapters taken without checking -----------------------------------------------------------------

def _retyped(path: Path, change) -> str:
    """Store the first tensor of a safetensors file as ``change`` makes it; returns its name."""
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = change(tensors[name])
    save_file(tensors, path)
    return name


INTEGERS = {
    "I32": lambda a: (a * 100).astype(np.int32),
    "I64": lambda a: (a * 100).astype(np.int64),
    "I8": lambda a: np.sign(a).astype(np.int8),
    "U8": lambda a: (a > 0).astype(np.uint8),
    "BOOL": lambda a: a > 0,
}


@pytest.mark.parametrize("dtype", sorted(INTEGERS))
def test_integer_or_boolean_lora_tensors_are_refused(artifacts, adapter, tmp_path, capsys, dtype):
    name = _retyped(adapter / "adapter_model.safetensors", INTEGERS[dtype])
    err = one_line(capsys, train(artifacts, tmp_path, "--init-adapter", str(adapter)))
    assert f"adapter {adapter} does not match the artifacts: {name} is {dtype}, expected floating point" in err


def test_integer_tensors_are_refused_by_every_command(artifacts, adapter, tmp_path, capsys):
    _retyped(adapter / "adapter_model.safetensors", INTEGERS["I32"])
    assert "is I32, expected floating point" in one_line(capsys, generate(artifacts, "--adapter", str(adapter)))
    for to in ("peft", "merged", "mlx"):
        assert "is I32, expected floating point" in one_line(capsys, export(artifacts, adapter, to, tmp_path / to))
        assert not (tmp_path / to).exists()


def test_integer_moments_in_the_optimizer_state_are_refused(artifacts, adapter, tmp_path, capsys):
    name = _retyped(adapter / "optimizer.safetensors", lambda a: a.astype(np.int32))
    err = one_line(capsys, train(artifacts, tmp_path, "--resume", str(adapter), "--max-steps", "8"))
    assert f"{adapter / 'optimizer.safetensors'} does not match the artifacts: {name} is I32" in err


def test_floating_point_adapters_of_any_width_are_read(artifacts, adapter, tmp_path):
    """The refusal is of integers, not of other float types: float16, bfloat16 and float64 read as float32, and a
    float64 beyond float32's range is refused, not read as infinity."""
    manifest = Manifest.load(artifacts)
    tensors = load_file(adapter / "adapter_model.safetensors")
    exact = load_adapter(adapter, manifest)
    for dtype, stored in (("F16", lambda a: a.astype(np.float16)), ("F64", lambda a: a.astype(np.float64)),
                          ("BF16", f32_to_bf16)):
        write_safetensors(adapter / "adapter_model.safetensors", {n: (dtype, stored(a)) for n, a in tensors.items()})
        loaded = load_adapter(adapter, manifest)
        for name, value in exact.items():
            assert loaded[name].dtype == np.float32
            np.testing.assert_allclose(loaded[name], value, rtol=1e-2 if dtype != "F64" else 0, atol=1e-3)
    name = sorted(tensors)[0]
    write_safetensors(adapter / "adapter_model.safetensors",
                      {n: ("F64", a.astype(np.float64) * (1e300 if n == name else 1)) for n, a in tensors.items()})
    with pytest.raises(OrtloraError, match=f"{name} holds NaN or infinite values"):
        load_adapter(adapter, manifest)


@pytest.fixture
def mlx(artifacts, trained_adapter, tmp_path) -> Path:
    """The trained adapter exported for mlx-lm (adapters.safetensors + mlx-lm's adapter_config.json)."""
    assert export(artifacts, trained_adapter, "mlx", tmp_path / "mlx") == 0
    return tmp_path / "mlx"


def _lora_parameters(**values):
    return lambda c: c["lora_parameters"].update(values)


MLX_CONFIGS = {
    "scale NaN": (_lora_parameters(scale=float("nan")), "lora_parameters.scale is nan, not a finite number"),
    "scale infinite": (_lora_parameters(scale=float("inf")), "lora_parameters.scale is inf, not a finite number"),
    "scale a string": (_lora_parameters(scale="2.0"), "lora_parameters.scale is '2.0', not a finite number"),
    "scale true": (_lora_parameters(scale=True), "lora_parameters.scale is True, not a finite number"),
    "scale beyond float32": (_lora_parameters(scale=1e300), "lora_parameters.scale 1e+300 takes "
                             "model.layers.0.self_attn.q_proj.lora_b beyond float32's range"),
    "rank": (_lora_parameters(rank=4), "lora_parameters.rank is 4, its tensors have rank 8"),
    "rank a string": (_lora_parameters(rank="8"), "lora_parameters.rank is '8', its tensors have rank 8"),
    "num_layers": (lambda c: c.update(num_layers=1), "num_layers is 1, its tensors adapt 2 layers"),
    "num_layers too many": (lambda c: c.update(num_layers=16), "num_layers is 16, its tensors adapt 2 layers"),
    "num_layers a float": (lambda c: c.update(num_layers=2.0), "num_layers is 2.0, its tensors adapt 2 layers"),
    "keys": (_lora_parameters(keys=["self_attn.q_proj"]),
             "lora_parameters.keys is ['self_attn.q_proj'], its tensors adapt self_attn.q_proj, self_attn.v_proj"),
    "keys of lm_head": (_lora_parameters(keys=["self_attn.q_proj", "self_attn.v_proj", "lm_head"]),
                        "lora_parameters.keys is ['self_attn.q_proj', 'self_attn.v_proj', 'lm_head']"),
    "keys a string": (_lora_parameters(keys="self_attn.q_proj"), "lora_parameters.keys is 'self_attn.q_proj'"),
    "scale beyond any float": (_lora_parameters(scale=-10**400), "lora_parameters.scale is -1000"),
}


@pytest.mark.parametrize("case", sorted(MLX_CONFIGS))
def test_an_mlx_adapter_config_that_disagrees_with_its_tensors_is_one_line(artifacts, mlx, tmp_path, capsys, case):
    change, message = MLX_CONFIGS[case]
    edit_json(mlx / "adapter_config.json", change)
    err = one_line(capsys, train(artifacts, tmp_path, "--init-adapter", str(mlx)))
    assert f"mlx-lm adapter {mlx}" in err and message in err
    assert message in one_line(capsys, export(artifacts, mlx, "peft", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_mlx_adapter_as_mlx_lm_may_write_it_is_read(artifacts, mlx):
    """What mlx-lm itself writes or accepts stays accepted: num_layers -1 (every layer) when every layer is
    adapted, keys in another order, and rank, keys and num_layers left to mlx-lm's defaults."""
    manifest = Manifest.load(artifacts)
    before = load_adapter(mlx, manifest)
    edit_json(mlx / "adapter_config.json", lambda c: [c.update(num_layers=-1), _lora_parameters(keys=[
        "self_attn.v_proj", "self_attn.q_proj"])(c)])
    load_adapter(mlx, manifest)
    edit_json(mlx / "adapter_config.json", lambda c: [c.pop("num_layers"), c["lora_parameters"].pop("keys"),
                                                      c["lora_parameters"].pop("rank")])
    after = load_adapter(mlx, manifest)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_an_mlx_adapter_of_layers_not_the_last_n_is_refused(artifacts, mlx):
    """mlx-lm adapts the last num_layers layers: tensors of layer 0 alone (of 2) under num_layers 1 would be put on
    nothing in mlx-lm, and -1 would mean both layers. (Artifacts adapting layer 0 alone, as the manifest says.)"""
    manifest = Manifest.load(artifacts)
    first = replace(manifest, parameters=[p for p in manifest.parameters if p.layer == 0],
                    lora={**manifest.lora, "layers": [0]})
    tensors = load_file(mlx / "adapters.safetensors")
    save_file({n: a for n, a in tensors.items() if n.startswith("model.layers.0.")}, mlx / "adapters.safetensors")
    edit_json(mlx / "adapter_config.json", lambda c: c.update(num_layers=1))
    with pytest.raises(OrtloraError, match=r"num_layers 1 means the last 1 of the base's 2 layers, its tensors adapt "
                                           r"layers \[0\]"):
        load_adapter(mlx, first)
    edit_json(mlx / "adapter_config.json", lambda c: c.update(num_layers=-1))
    with pytest.raises(OrtloraError, match="num_layers is -1, its tensors adapt 1 layers"):
        load_adapter(mlx, first)


def test_integer_mlx_tensors_are_refused(artifacts, mlx, tmp_path, capsys):
    name = _retyped(mlx / "adapters.safetensors", INTEGERS["I32"])
    err = one_line(capsys, train(artifacts, tmp_path, "--init-adapter", str(mlx)))
    assert f"mlx-lm adapter {mlx} does not match the artifacts: {name} is I32, expected floating point" in err


PEFT_CONFIGS = {
    "lm_head in target_modules": (lambda c: c.update(target_modules=["q_proj", "v_proj", "lm_head"]),
                                  "target_modules ['q_proj', 'v_proj', 'lm_head'] adapts lm_head, which the artifacts "
                                  "do not adapt"),
    "a regex reaching lm_head": (lambda c: c.update(target_modules=r".*(q_proj|v_proj|lm_head)"),
                                 "adapts lm_head, which the artifacts do not adapt"),
    "all-linear": (lambda c: c.update(target_modules="all-linear"),
                   "adapts down_proj, gate_proj, k_proj, o_proj, up_proj, which the artifacts do not adapt"),
    "a target left out": (lambda c: c.update(target_modules=["q_proj"]), "leaves out v_proj, which the artifacts adapt"),
    "target_modules a number": (lambda c: c.update(target_modules=5), "target_modules is 5, not a list of module names"),
    "a bad regex": (lambda c: c.update(target_modules="(q_proj"), "is not a valid regular expression"),
    "exclude_modules": (lambda c: c.update(exclude_modules=["v_proj"]), "exclude_modules ['v_proj'] excludes v_proj"),
    "modules_to_save": (lambda c: c.update(modules_to_save=["lm_head"]),
                        "modules_to_save is ['lm_head'], which adds to plain LoRA weights what the artifacts do not"),
    "lora_bias": (lambda c: c.update(lora_bias=True), "lora_bias is True, which adds"),
    "bias": (lambda c: c.update(bias="all"), "bias is 'all': the artifacts train no biases"),
    "layers_to_transform": (lambda c: c.update(layers_to_transform=[0]),
                            "layers_to_transform is [0], the artifacts adapt every layer (null)"),
    "init pissa": (lambda c: c.update(init_lora_weights="pissa"), "init_lora_weights is 'pissa'"),
    "peft_type": (lambda c: c.update(peft_type="LOHA"), "peft_type is 'LOHA', not 'LORA'"),
    "task_type": (lambda c: c.update(task_type="SEQ_CLS"), "task_type is 'SEQ_CLS'"),
    "r a float": (lambda c: c.update(r=8.0), "r is 8.0, the artifacts have 8"),
    "use_dora a string": (lambda c: c.update(use_dora="false"), "use_dora is 'false', not true or false"),
    "lora_alpha beyond any float": (lambda c: c.update(lora_alpha=10**400), "lora_alpha is 1000"),
    "lora_dropout NaN": (lambda c: c.update(lora_dropout=float("nan")), "lora_dropout is nan, not a probability"),
    "layers_to_transform a float": (lambda c: c.update(layers_to_transform=1.5),
                                    "layers_to_transform is 1.5, the artifacts adapt every layer (null)"),
}


@pytest.mark.parametrize("case", sorted(PEFT_CONFIGS))
def test_a_peft_config_that_peft_would_read_as_another_adapter_is_refused(artifacts, adapter, tmp_path, capsys, case):
    change, message = PEFT_CONFIGS[case]
    edit_json(adapter / "adapter_config.json", change)
    err = one_line(capsys, export(artifacts, adapter, "peft", tmp_path / "out"))
    assert f"adapter {adapter} does not match the artifacts" in err and message in err
    assert not (tmp_path / "out").exists()
    assert message in one_line(capsys, train(artifacts, tmp_path, "--init-adapter", str(adapter)))


@pytest.mark.parametrize("key", ["peft_type", "r", "lora_alpha", "target_modules", "target_modules null"])
def test_a_copied_peft_config_must_say_what_peft_would_otherwise_default(artifacts, adapter, tmp_path, capsys, key):
    """--init-adapter takes a key left out as the artifacts' own; PEFT would take its default (r 8, lora_alpha 8,
    its own targets for Qwen2), so the copy --to peft makes must hold them."""
    key, null = key.split()[0], key.endswith("null")
    edit_json(adapter / "adapter_config.json", lambda c: c.update({key: None}) if null else c.pop(key))
    load_adapter(adapter, Manifest.load(artifacts))
    err = one_line(capsys, export(artifacts, adapter, "peft", tmp_path / "out"))
    assert f"{adapter / 'adapter_config.json'} does not describe the artifacts' adapter" in err
    assert f"{key} is missing" in err and not (tmp_path / "out").exists()


def test_a_peft_config_that_names_the_same_modules_otherwise_is_copied(artifacts, adapter, tmp_path):
    """PEFT's other spellings of the same modules stay accepted: a regular expression, full names' last parts, and
    every layer listed by index."""
    for targets in (r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)", ["self_attn.v_proj", "q_proj"]):
        edit_json(adapter / "adapter_config.json", lambda c: c.update(target_modules=targets, layers_to_transform=[1, 0]))
        assert export(artifacts, adapter, "peft", tmp_path / "out") == 0
        assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["target_modules"] == targets
        shutil.rmtree(tmp_path / "out")


def test_a_directory_of_two_adapters_is_refused(artifacts, adapter, mlx, tmp_path, capsys):
    shutil.copy(mlx / "adapters.safetensors", adapter / "adapters.safetensors")
    err = one_line(capsys, train(artifacts, tmp_path, "--init-adapter", str(adapter)))
    assert f"{adapter} holds both a PEFT adapter (adapter_model.safetensors) and an mlx-lm adapter" in err


# -- 3. the header is read first and bounded ------------------------------------------------------------

HUGE = 64 << 20  # float32 values: 256 MiB declared, never written (a sparse file) and never to be read


def _with_huge_tensor(path: Path, name: str, shape: tuple[int, ...], drop: str | None = None) -> None:
    """Rewrite a safetensors file with one more tensor, ``name`` of ``shape`` (float32), after the others (``drop``
    left out): its bytes are declared, and the file is extended to hold them without writing them."""
    tensors = {n: a for n, a in load_file(path).items() if n != drop}
    header, offset = {}, 0
    for n, a in [*tensors.items(), (name, None)]:
        size = a.nbytes if a is not None else 4 * math.prod(shape)
        header[n] = {"dtype": "F32" if a is None else {"float32": "F32", "int64": "I64"}[a.dtype.name],
                     "shape": list(shape if a is None else a.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())
        f.truncate(8 + len(encoded) + offset)


def _peak_bytes(call) -> tuple[int, str]:
    """The peak of memory Python and numpy allocate during ``call``, and the OrtloraError it raises."""
    tracemalloc.start()
    try:
        with pytest.raises(OrtloraError) as error:
            call()
        return tracemalloc.get_traced_memory()[1], str(error.value)
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("where", ["unexpected name", "expected name, other shape"])
@pytest.mark.parametrize("file", ["adapter_model.safetensors", "adapters.safetensors", "optimizer.safetensors"])
def test_a_huge_tensor_not_expected_is_refused_from_the_header(artifacts, adapter, mlx, file, where):
    manifest = Manifest.load(artifacts)
    directory = mlx if file == "adapters.safetensors" else adapter
    first = sorted(load_file(directory / file))[0]
    if where == "unexpected name":
        name, shape, drop = "base_model.model.lm_head.lora_A.weight", (HUGE,), None
    else:
        name, shape, drop = first, (8, HUGE // 8), first
    _with_huge_tensor(directory / file, name, shape, drop)
    if file == "optimizer.safetensors":
        peak, message = _peak_bytes(lambda: load_resume_state(directory, manifest))
    else:
        peak, message = _peak_bytes(lambda: load_adapter(directory, manifest))
    assert "does not match the artifacts" in message
    assert (f"unexpected {name}" if where == "unexpected name" else f"{name} has shape {shape}") in message
    assert peak < 16 << 20, f"{peak:,} bytes allocated to refuse it"  # the 256 MiB tensor was never read


def test_a_header_or_data_section_that_lies_about_its_size_is_one_line(artifacts, adapter, tmp_path, capsys):
    path = adapter / "adapter_model.safetensors"
    sound = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 100 << 30) + sound[8:])  # a header of 100 GB claimed
    peak, message = _peak_bytes(lambda: read_expected(path, {}))
    assert f"{path} is not a readable safetensors file" in message and peak < 16 << 20
    path.write_bytes(sound)
    _with_huge_tensor(path, "extra", (4,))
    with open(path, "r+b") as f:  # the data section 8 bytes shorter than its header declares
        f.truncate(os.path.getsize(path) - 8)
    err = one_line(capsys, train(artifacts, tmp_path, "--init-adapter", str(adapter)))
    assert f"{path} is not a readable safetensors file" in err
