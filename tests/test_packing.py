"""--pack without cross-talk: a packed example's loss and gradients are those it has alone in its row."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ortlora.manifest import MANIFEST_NAME, Manifest
from ortlora.runtime import cli as train_cli
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.cli import data_path
from ortlora.runtime.data import collate, load_jsonl, pack, trained_tokens
from ortlora.runtime.session_backend import OrtSessionBackend
from ortlora.runtime.tokenizer import Tokenizer
from tests.reference import random_weights, rel_err

BACKENDS = {"ort-training": OrtTrainingBackend, "ort-session": OrtSessionBackend}


@pytest.fixture(scope="module")
def chat_examples(artifacts):
    examples, _ = load_jsonl(data_path("builtin:chat", "train"), Tokenizer(artifacts), 128)
    return examples[:7]


def loss_and_grads(backend, batch) -> tuple[float, dict[str, np.ndarray]]:
    backend.zero_grad()
    loss = backend.train_step(batch)
    return loss, backend.gradients()


def test_pack_numbers_the_examples(chat_examples):
    packed = pack(chat_examples, 128)
    assert 1 < len(packed) < len(chat_examples)
    for row in packed:
        assert len(row.input_ids) <= 128 and row.segments[0] == 1
        assert np.all(np.diff(row.segments) >= 0) and np.all(np.diff(row.segments) <= 1)
    assert sum(int(row.segments[-1]) for row in packed) == len(chat_examples)
    batch = collate(packed, pad_id=0)
    assert batch["attention_mask"].max() > 1  # segment ids, not 0/1
    assert (batch["attention_mask"] > 0).sum() == sum(len(e.input_ids) for e in chat_examples)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_packed_examples_equal_their_unpacked_runs(artifacts, chat_examples, backend_name):
    """Packed loss = the token-weighted mean of each example's own loss, and the same for every LoRA
    gradient; with a plain 0/1 mask over the packed row (examples attending to each other) it is not."""
    manifest = Manifest.load(artifacts)
    backend = BACKENDS[backend_name](artifacts, manifest)
    backend.set_weights(random_weights(manifest, seed=3))
    packed = collate(pack(chat_examples, 128), pad_id=0)

    alone = [(trained_tokens(b), *loss_and_grads(backend, b)) for b in (collate([e], 0) for e in chat_examples)]
    total = sum(n for n, _, _ in alone)
    expected_loss = sum(n * loss for n, loss, _ in alone) / total
    expected_grads = {name: sum(n * g[name] for n, _, g in alone) / total for name in alone[0][2]}

    loss, grads = loss_and_grads(backend, packed)
    assert abs(loss - expected_loss) / expected_loss < 1e-5
    for name, expected in expected_grads.items():
        assert rel_err(grads[name], expected) < 1e-4, name
    assert abs(backend.eval_loss(packed) - expected_loss) / expected_loss < 1e-5

    crosstalk = dict(packed, attention_mask=(packed["attention_mask"] > 0).astype(np.int64))
    assert abs(backend.train_step(crosstalk) - expected_loss) / expected_loss > 1e-3


def test_pack_refuses_artifacts_that_would_mix_examples(artifacts, tmp_path, capsys):
    """Artifacts built before segment masks read any non-zero mask as 1: --pack would silently mix examples."""
    old = tmp_path / "old"
    shutil.copytree(artifacts, old)
    data = json.loads((old / MANIFEST_NAME).read_text())
    del data["model"]["attention_mask"]
    (old / MANIFEST_NAME).write_text(json.dumps(data))
    assert train_cli.main(["--artifacts", str(old), "--out", str(tmp_path / "run"), "--pack", "--no-progress"]) != 0
    assert "rebuild it with ortlora-build, or train without --pack" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
