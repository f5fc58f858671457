"""Shared fixtures: tiny artifact directories, built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ortlora.build.builder import BuildOptions, build
from ortlora.build.tiny import create_random_model, create_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("model") / "tiny-qwen2", seed=0)


def _build(tmp_path_factory, tiny_model: Path, name: str, **options) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / name
    build(BuildOptions(model_dir=tiny_model, out_dir=out, bundle_base=True, **options), echo=lambda *a, **k: None)
    return out


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, tiny_model) -> Path:
    """The default build: r=8, alpha=16 on q_proj,v_proj."""
    return _build(tmp_path_factory, tiny_model, "default")


@pytest.fixture
def copy(artifacts, tmp_path) -> Path:
    """A copy of the tiny artifacts that a test may damage."""
    return Path(shutil.copytree(artifacts, tmp_path / "artifacts"))


@pytest.fixture(scope="session")
def artifacts_all_linear(tmp_path_factory, tiny_model) -> Path:
    """Every projection, another rank and alpha, and label smoothing."""
    return _build(tmp_path_factory, tiny_model, "all-linear", rank=4, alpha=8.0,
                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                  label_smoothing=0.1)


@pytest.fixture(scope="session")
def artifacts_untied(tmp_path_factory) -> Path:
    """The tiny model with an LM head of its own (not tied to the embedding), as larger Qwen2.5 models have."""
    model = create_random_model(tmp_path_factory.mktemp("model") / "tiny-untied", "tiny", seed=0, tie_word_embeddings=False)
    return _build(tmp_path_factory, model, "untied")


@pytest.fixture(scope="session")
def trained_adapter(artifacts, tmp_path_factory) -> Path:
    """An adapter whose B matrices are far from zero: a few steps at a high learning rate."""
    from ortlora.runtime import cli as train_cli

    run = tmp_path_factory.mktemp("run")
    assert train_cli.main(["--artifacts", str(artifacts), "--out", str(run), "--max-steps", "5", "--lr", "0.05",
                           "--no-progress", "--no-plot"]) == 0
    return run / "checkpoint-5"


@pytest.fixture(scope="session")
def qwen3_handoff(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(model, artifacts, trained adapter) of a tiny Qwen3 with tied embeddings, as Qwen3-0.6B to 4B have, and heads
    32 wide although hidden 64 / 4 heads = 16 (Qwen3's explicit head_dim); the adapter is trained as
    ``trained_adapter`` is, so its B matrices are far from zero. For the hand-off formats' Qwen3 checks."""
    from ortlora.runtime import cli as train_cli

    model = create_random_model(tmp_path_factory.mktemp("model") / "tiny-qwen3", "tiny", seed=5, model_type="qwen3",
                                head_dim=32, tie_word_embeddings=True)
    artifacts = _build(tmp_path_factory, model, "qwen3")
    run = tmp_path_factory.mktemp("run")
    assert train_cli.main(["--artifacts", str(artifacts), "--out", str(run), "--max-steps", "5", "--lr", "0.05",
                           "--no-progress", "--no-plot"]) == 0
    return model, artifacts, run / "checkpoint-5"
