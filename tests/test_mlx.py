"""mlx-lm's LoRA adapters, checked with mlx-lm 0.32.2 itself (on mlx's CPU build, in .venv-mlx): its own loader
(mlx_lm.tuner.utils.load_adapters) puts ``ortlora-export --to mlx`` on the base model and gives the merged Hugging
Face model's logits; an adapter mlx-lm made is read by --init-adapter and --adapter and written back unchanged.
Each for Qwen2 and for Qwen3 (mlx_lm/models/qwen3.py: the tiny tied Qwen3 with heads 32 wide)."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ortlora.errors import OrtloraError
from ortlora.handoff import cli as export_cli
from ortlora.handoff import mlx_adapter
from ortlora.manifest import Manifest
from ortlora.runtime import cli as train_cli
from ortlora.runtime.checkpoint import load_adapter
from ortlora.weights import read_tensors, write_safetensors
from tests.conftest import _build
from tests.environments import needs, run_in
from tests.handoff_helpers import IDS, export, merged_logits, random_adapter

# float32 on both sides, summed in other orders: the largest logit difference measured is 1e-5 for Qwen2 and 6e-6
# for Qwen3 (logits up to 7)
TOL = 5e-5


@pytest.fixture(scope="module")
def dora_artifacts(tmp_path_factory, tiny_model) -> Path:
    """DoRA with rsLoRA on the last of the two layers, a per-module alpha, a projection without bias."""
    return _build(tmp_path_factory, tiny_model, "mlx-dora", dora=True, rslora=True, layers="1",
                  alpha_pattern={"v_proj": 32}, targets=("q_proj", "v_proj", "down_proj"))


def mlx_base(artifacts: Path, out: Path) -> Path:
    """The base model as mlx-lm reads it. mlx-lm 0.32's Qwen2 reads rope_theta from the top of config.json (default
    1e6); transformers 5 keeps it in rope_parameters, so it is copied up (published Qwen2.5 configs have it there).
    Its Qwen3 reads rope_parameters itself: a Qwen3 base is left as transformers wrote it."""
    shutil.copytree(artifacts / Manifest.load(artifacts).model["source"], out)
    config = json.loads((out / "config.json").read_text())
    if config["model_type"] == "qwen2":
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
        (out / "config.json").write_text(json.dumps(config))
    return out


MLX_LOGITS = """
    import json, pathlib, numpy as np, mlx.core as mx
    from mlx_lm.utils import load_model
    from mlx_lm.tuner.utils import load_adapters
    model, _ = load_model(pathlib.Path({base!r}))
    if {adapter!r}:
        model = load_adapters(model, {adapter!r})
    model.eval()
    np.save({out!r}, np.array(model(mx.array([{ids!r}]))[0].astype(mx.float32)))
    print(json.dumps({{"ok": True}}))
"""


def mlx_logits(base: Path, adapter: Path | None, out: Path) -> np.ndarray:
    run_in("mlx", MLX_LOGITS.format(base=str(base), adapter=str(adapter or ""), ids=IDS, out=str(out)))
    return np.load(out)


@needs("mlx")
@pytest.mark.parametrize("variant", ["trained", "dora", "qwen3"])
def test_mlx_lm_applies_the_export_as_the_merged_model(variant, request, tmp_path):
    if variant == "trained":
        arts, adapter = request.getfixturevalue("artifacts"), request.getfixturevalue("trained_adapter")
    elif variant == "qwen3":
        _, arts, adapter = request.getfixturevalue("qwen3_handoff")
    else:
        arts = request.getfixturevalue("dora_artifacts")
        adapter = random_adapter(arts, tmp_path / "peft", seed=1)
    exported = export(arts, adapter, "mlx", tmp_path / "mlx")
    config = json.loads((exported / "adapter_config.json").read_text())
    manifest = Manifest.load(arts)
    if variant == "dora":  # the first module's scaling, alpha / sqrt(r); v_proj's alpha 32 folded into its lora_b
        assert config["fine_tune_type"] == "dora" and config["num_layers"] == 1
        assert config["lora_parameters"]["scale"] == pytest.approx(16 / np.sqrt(8))
        assert "model.layers.1.mlp.down_proj.m" in read_tensors(exported / "adapters.safetensors")
    if variant == "qwen3":  # q_proj is 4 heads of head_dim 32 = 128 wide, not hidden_size 64; r=8 of alpha 16
        assert config["num_layers"] == 2 and config["lora_parameters"]["scale"] == 2.0
        tensors = read_tensors(exported / "adapters.safetensors")
        assert tensors["model.layers.1.self_attn.q_proj.lora_b"].shape == (8, 128)
        assert tensors["model.layers.1.self_attn.v_proj.lora_b"].shape == (8, 64)  # 2 key / value heads of 32
    assert config["lora_parameters"]["rank"] == manifest.lora["rank"]
    expected = merged_logits(export(arts, adapter, "merged", tmp_path / "merged"))
    base = mlx_base(arts, tmp_path / "base")
    got = mlx_logits(base, exported, tmp_path / "mlx.npy")
    np.testing.assert_allclose(got, expected, rtol=0, atol=TOL)
    without = mlx_logits(base, None, tmp_path / "base.npy")  # the adapter is what makes them equal
    assert np.abs(without - expected).max() > 100 * TOL


MLX_TRAINED = """
    import json, pathlib, numpy as np, mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.lora import CONFIG_DEFAULTS
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, save_config
    mx.random.seed(3)
    model, _ = load_model(pathlib.Path({base!r}))
    model.freeze()
    args = dict(CONFIG_DEFAULTS, model={base!r}, num_layers=2, adapter_path={out!r},
                lora_parameters={{"rank": 8, "dropout": 0.0, "scale": 2.0,
                                  "keys": ["self_attn.q_proj", "self_attn.v_proj"]}})
    linear_to_lora_layers(model, args["num_layers"], args["lora_parameters"])   # as mlx_lm.lora's train_model
    for _, module in model.named_modules():  # lora_b starts at zero; a trained one is not
        if "lora_b" in module:
            module.lora_b = 0.2 * mx.random.normal(module.lora_b.shape)
    out = pathlib.Path({out!r})
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    save_config(args, out / "adapter_config.json")                          # as the trainer saves both
    model.eval()
    np.save(str(out) + ".npy", np.array(model(mx.array([{ids!r}]))[0].astype(mx.float32)))
    print(json.dumps({{"ok": True}}))
"""


@needs("mlx")
@pytest.mark.parametrize("model", ["qwen2", "qwen3"])
def test_an_mlx_lm_adapter_is_read_and_written_back_unchanged(model, request, tmp_path):
    artifacts = request.getfixturevalue("artifacts") if model == "qwen2" else request.getfixturevalue("qwen3_handoff")[1]
    base = mlx_base(artifacts, tmp_path / "base")
    made = tmp_path / "mlx-made"
    run_in("mlx", MLX_TRAINED.format(base=str(base), out=str(made), ids=IDS))
    mlx_own = np.load(str(made) + ".npy")

    back = export(artifacts, made, "mlx", tmp_path / "back")
    before, after = read_tensors(made / "adapters.safetensors"), read_tensors(back / "adapters.safetensors")
    assert before.keys() == after.keys() and len(before) == 8
    for name in before:
        assert np.array_equal(before[name], after[name]), name
    config_before = json.loads((made / "adapter_config.json").read_text())
    config_after = json.loads((back / "adapter_config.json").read_text())
    for key in ("fine_tune_type", "num_layers", "lora_parameters"):
        assert config_after[key] == config_before[key], key

    # The imported weights mean what they meant in mlx-lm: merged, they give mlx-lm's logits.
    merged = export(artifacts, made, "merged", tmp_path / "merged")
    np.testing.assert_allclose(merged_logits(merged), mlx_own, rtol=0, atol=TOL)

    # --init-adapter starts training from it (one step at a negligible learning rate moves nothing visible).
    run = tmp_path / "run"
    assert train_cli.main(["--artifacts", str(artifacts), "--out", str(run), "--init-adapter", str(made),
                           "--max-steps", "1", "--lr", "1e-9", "--no-progress", "--no-plot"]) == 0
    manifest = Manifest.load(artifacts)
    started, imported = load_adapter(run / "checkpoint-1", manifest), mlx_adapter.load_mlx(made, manifest)
    for name in imported:
        np.testing.assert_allclose(started[name], imported[name], rtol=0, atol=1e-6)


def test_adapters_mlx_lm_cannot_hold_are_refused(artifacts, trained_adapter, tmp_path, capsys):
    manifest = Manifest.load(artifacts)
    args = argparse.Namespace(artifacts=artifacts, with_base=False, gguf_type=None)
    # a per-module rank: mlx-lm's lora_parameters hold one
    ranks = replace(manifest, parameters=[replace(p, shape=(4, p.shape[1])) if p.kind == "A" and p.module == "v_proj"
                                          else p for p in manifest.parameters])
    with pytest.raises(OrtloraError, match=r"one rank for every module; .* ranks \[4, 8\]"):
        mlx_adapter.check_exportable(args, ranks)
    # adapted layers that are not the last N: mlx-lm's num_layers counts from the end
    first = replace(manifest, parameters=[p for p in manifest.parameters if p.layer == 0])
    with pytest.raises(OrtloraError, match=r"adapts the last N decoder layers"):
        mlx_adapter.check_exportable(args, first)

    # An mlx-lm adapter of another rank: one line naming the mismatches, nothing written.
    exported = export(artifacts, trained_adapter, "mlx", tmp_path / "mlx")
    tensors = {k: ("F32", np.ascontiguousarray(v[..., :4] if k.endswith("lora_a") else v[:4]))
               for k, v in read_tensors(exported / "adapters.safetensors").items()}
    write_safetensors(exported / "adapters.safetensors", tensors)
    out = tmp_path / "out"
    assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(exported), "--to", "peft",
                            "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mlx-lm adapter" in err and "does not match the artifacts" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert export_cli.main(["--artifacts", str(artifacts), "--adapter", str(trained_adapter), "--to", "mlx",
                            "--out", str(out), "--with-base"]) == 2
    assert "go with --to gguf" in capsys.readouterr().err and not out.exists()


def test_a_qwen3_is_exported_unless_mlx_lm_cannot_load_it(qwen3_handoff, tmp_path):
    """mlx-lm's qwen3 has the qwen2 adapter layout, so a Qwen3's artifacts pass; a Qwen3 with attention_bias true
    does not, since mlx_lm/models/qwen3.py builds every projection without a bias and would refuse the base."""
    _, artifacts, _ = qwen3_handoff
    manifest = Manifest.load(artifacts)
    args = argparse.Namespace(artifacts=artifacts, with_base=False, gguf_type=None)
    mlx_adapter.check_exportable(args, manifest)
    config = json.loads((artifacts / manifest.files["config"]).read_text())
    (tmp_path / manifest.files["config"]).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / manifest.files["config"]).write_text(json.dumps(dict(config, attention_bias=True)))
    with pytest.raises(OrtloraError, match=r"attention_bias is true; mlx-lm's qwen3 has no attention biases"):
        mlx_adapter.check_exportable(argparse.Namespace(artifacts=tmp_path, with_base=False, gguf_type=None), manifest)
