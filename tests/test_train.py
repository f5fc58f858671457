"""ortlora-train end to end on the tiny model: learning, checkpoints, resume, PEFT hand-off, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file

from ortlora.manifest import Manifest
from ortlora.runtime import cli as train_cli
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.checkpoint import find_checkpoint, load_adapter
from tests.reference import peft_model, random_weights, rel_err

FAST = ["--no-progress", "--no-plot", "--batch-size", "4"]


def train(artifacts: Path, out: Path, *extra: str) -> int:
    return train_cli.main(["--artifacts", str(artifacts), "--out", str(out), *FAST, *extra])


def records(run: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_loss_goes_down_on_shipped_data(artifacts_all_linear, tmp_path):
    run = tmp_path / "run"
    assert train(artifacts_all_linear, run, "--data", "builtin:completions", "--lr", "1e-2", "--epochs", "2",
                 "--plot") == 0
    losses = [r["loss"] for r in records(run)]
    assert len(losses) == 100  # 200 examples / batch 4 = 50 steps per epoch
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:3])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 100 and summary["eval_loss"] < losses[0]
    peaks = [r["peak_rss_mb"] for r in records(run)]  # the high-water mark, in every step's record
    assert 0 < peaks[0] and peaks == sorted(peaks) and peaks[-1] <= summary["peak_rss_mb"]
    assert (run / "loss.png").stat().st_size > 1000 and (run / "checkpoint-100").is_dir()
    assert json.loads((run / "config.json").read_text())["lr"] == 0.01


def test_adapter_loads_in_peft_with_same_logits_as_ort(artifacts, tmp_path):
    """A trained checkpoint is a PEFT adapter: PeftModel.from_pretrained gives ORT's logits."""
    import onnxruntime as ort
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert train(artifacts, run, "--max-steps", "5", "--lr", "1e-2") == 0
    checkpoint = run / "checkpoint-5"
    with safe_open(str(checkpoint / "adapter_model.safetensors"), "np") as f:
        metadata = f.metadata()
    assert metadata["step"] == "5" and float(metadata["loss"]) > 0 and metadata["artifact_id"]
    manifest = Manifest.load(artifacts)
    weights = load_adapter(checkpoint, manifest)
    assert any(np.abs(w).max() > 0 for n, w in weights.items() if "lora_B" in n)  # B moved off zero
    base = AutoModelForCausalLM.from_pretrained(artifacts / "base_model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, checkpoint).eval()
    ids = np.random.default_rng(0).integers(0, 512, size=(2, 13), dtype=np.int64)
    mask = np.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    session = ort.InferenceSession(str(artifacts / manifest.files["inference_model"]), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask, **weights})[0]
    assert rel_err(logits, ref) < 1e-4


def test_resume_continues_exactly(artifacts, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    common = ["--max-steps", "6", "--save-every", "3", "--lr", "5e-3", "--schedule", "warmup-cosine", "--grad-accum", "2"]
    assert train(artifacts, full, *common) == 0
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert train_cli.main(["--resume", str(full / "checkpoint-3"), "--out", str(resumed), "--no-progress", "--no-plot"]) == 0
    a = load_file(str(full / "checkpoint-6" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "checkpoint-6" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-9)
    assert [r["loss"] for r in records(full)][3:] == pytest.approx([r["loss"] for r in records(resumed)], rel=1e-6)


def test_resume_from_run_directory_takes_latest(artifacts, tmp_path):
    run = tmp_path / "run"
    assert train(artifacts, run, "--max-steps", "2") == 0
    assert train_cli.main(["--resume", str(run), "--max-steps", "4", "--no-progress", "--no-plot"]) == 0
    assert (run / "checkpoint-4").is_dir()
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]


def test_init_adapter_from_peft(artifacts, tmp_path):
    manifest = Manifest.load(artifacts)
    weights = random_weights(manifest, seed=5)
    model = peft_model(artifacts, weights)
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_adapter(tmp_path / "adapter", manifest)
    for name, value in weights.items():
        np.testing.assert_array_equal(loaded[name], value)
    assert train(artifacts, tmp_path / "run", "--init-adapter", str(tmp_path / "adapter"), "--max-steps", "1") == 0


def test_mismatched_adapter_is_rejected(artifacts, artifacts_all_linear, tmp_path, capsys):
    assert train(artifacts_all_linear, tmp_path / "other", "--max-steps", "1") == 0
    code = train(artifacts, tmp_path / "run", "--init-adapter", str(tmp_path / "other" / "checkpoint-1"), "--max-steps", "1")
    err = capsys.readouterr().err
    assert code == 2 and "does not match the artifacts" in err and "r is 4, the artifacts have 8" in err
    assert "has shape (4, 64), expected (8, 64)" in err and "and 25 more" in err


def test_existing_run_is_not_overwritten(artifacts, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(artifacts, run, "--max-steps", "1") == 0
    capsys.readouterr()
    assert train(artifacts, run, "--max-steps", "1") == 2
    assert "--resume" in capsys.readouterr().err


BAD_DATA = {
    "malformed.jsonl": ('{"text": "fine"}\n{"text": oops}\n', "malformed.jsonl:2: not valid JSON"),
    "field.jsonl": ('{"text": "fine"}\n{"prompt": "only a prompt"}\n', "field.jsonl:2: 'prompt' and 'completion' must both be strings"),
    "other.jsonl": ('{"question": "?"}\n', "other.jsonl:1: no 'text', 'prompt'/'completion' or 'messages' field"),
    "empty.jsonl": ("", "empty.jsonl has no usable examples"),
    "masked.jsonl": ('{"messages": [{"role": "user", "content": "hi"}]}\n', "masked.jsonl:1: nothing to learn"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_named_with_file_and_line(artifacts, tmp_path, capsys, name):
    content, message = BAD_DATA[name]
    (tmp_path / name).write_text(content)
    code = train(artifacts, tmp_path / "run", "--data", str(tmp_path / name), "--max-steps", "1")
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_bad_lines_can_be_skipped_and_counted(artifacts, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "The cat sits."}\n{"text": 3}\nnot json\n{"text": "The dog runs."}\n')
    assert train(artifacts, tmp_path / "run", "--data", str(data), "--on-bad-data", "skip", "--max-steps", "1",
                 "--eval-split", "0.5") == 0
    out = capsys.readouterr().out
    assert "2 bad lines skipped" in out and "d.jsonl:2" in out


def test_truncation_is_counted(artifacts, tmp_path, capsys):
    assert train(artifacts, tmp_path / "run", "--data", "builtin:text", "--max-seq-len", "16", "--max-steps", "1") == 0
    assert "truncated to --max-seq-len" in capsys.readouterr().out


def test_config_file_and_command_line(artifacts, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('lr = 0.003\nschedule = "linear"\nmax_steps = 2\n')
    assert train(artifacts, tmp_path / "run", "--config", str(config), "--lr", "0.002") == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr"] == 0.002 and saved["schedule"] == "linear" and saved["max_steps"] == 2
    config.write_text('learning_rate = 0.1\n')
    assert train(artifacts, tmp_path / "run2", "--config", str(config)) == 2
    assert "unknown setting 'learning_rate'" in capsys.readouterr().err
    config.write_text('max_steps = "ten"\n')
    assert train(artifacts, tmp_path / "run3", "--config", str(config)) == 2
    assert "max_steps must be int" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--ep", "cuda"], "execution provider cuda is not available"),
    (["--ep", "coreml"], "execution provider coreml is not available"),  # auto: the portable backend
    (["--ep", "dml", "--backend", "ort-session"], "execution provider dml is not available"),
    (["--ep", "coreml", "--backend", "ort-training"], "training API runs on cpu and cuda only"),
])
def test_unavailable_provider(artifacts, tmp_path, capsys, args, message):
    assert train(artifacts, tmp_path / "run", *args, "--max-steps", "1") == 2
    err = capsys.readouterr().err
    assert message in err and ("this onnxruntime has: cpu" in err or "training API" in message)


def test_missing_artifacts_say_what_to_run(tmp_path, capsys):
    assert train_cli.main(["--artifacts", str(tmp_path / "none")]) == 2
    assert "ortlora-build --tiny" in capsys.readouterr().err


class NanAfter:
    """Wraps a backend; from micro-batch ``n`` on the loss is NaN."""

    def __init__(self, backend, n):
        self.backend, self.n, self.calls = backend, n, 0

    def train_step(self, batch):
        self.calls += 1
        loss = self.backend.train_step(batch)
        return float("nan") if self.calls > self.n else loss

    def __getattr__(self, name):
        return getattr(self.backend, name)


def test_nan_loss_stops_and_keeps_last_good_weights(artifacts, tmp_path, monkeypatch, capsys):
    holder = {}

    def make(c, directory, manifest):
        holder["backend"] = NanAfter(OrtTrainingBackend(directory, manifest), 3)
        return "ort-training", holder["backend"]

    monkeypatch.setattr(train_cli, "make_backend", make)
    assert train(artifacts, tmp_path / "run", "--max-steps", "5", "--lr", "1e-2", "--schedule", "constant") == 2
    assert "step 4: the loss became nan" in capsys.readouterr().err
    # Step 3's loss was finite, so the weights before update 3 are good; those after it are suspect.
    manifest = Manifest.load(artifacts)
    saved = load_adapter(tmp_path / "run" / "checkpoint-2", manifest)
    assert find_checkpoint(tmp_path / "run").name == "checkpoint-2"
    monkeypatch.undo()
    assert train(artifacts, tmp_path / "clean", "--max-steps", "2", "--lr", "1e-2", "--schedule", "constant") == 0
    clean = load_adapter(tmp_path / "clean" / "checkpoint-2", manifest)
    now = holder["backend"].weights()  # rolled back too
    for name in saved:
        np.testing.assert_array_equal(saved[name], clean[name])
        np.testing.assert_array_equal(saved[name], now[name])
    monkeypatch.setattr(train_cli, "make_backend", make)
    assert train(artifacts, tmp_path / "skip", "--max-steps", "5", "--on-nan", "skip") == 0
    assert json.loads((tmp_path / "skip" / "summary.json").read_text())["skipped_steps"] == 2


def test_runtime_trains_without_torch(artifacts, tmp_path):
    """The runtime must never import torch: run the trainer with torch made unimportable."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        class NoTorch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch.") or name in ("transformers", "peft"):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        from ortlora.runtime.cli import main
        code = main(["--artifacts", r"{artifacts}", "--out", r"{tmp_path / 'run'}", "--max-steps", "3", "--no-progress"])
        assert code == 0, code
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))
        assert not leaked, leaked
        print("trained without torch")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trained without torch" in result.stdout


@pytest.mark.parametrize("extra", [[], ["--report-to", "tensorboard"]])
def test_runtime_keeps_an_installed_torch_unloaded(artifacts, tmp_path, extra):
    """onnxruntime-training and tensorboardX import torch at import when they can; the runtime must prevent that."""
    pytest.importorskip("torch")
    script = textwrap.dedent(f"""
        import sys
        from ortlora.runtime.cli import main
        code = main(["--artifacts", r"{artifacts}", "--out", r"{tmp_path / 'run'}", "--max-steps", "2", "--no-progress",
                     *{extra!r}])
        assert code == 0, code
        assert "torch" not in sys.modules, "torch was imported"
        import torch  # still importable afterwards
        print("torch stayed out")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch stayed out" in result.stdout
    if extra:
        assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1


def test_accumulation_equals_the_large_batch(artifacts, tmp_path):
    """Batch 2 x accumulation 2 makes the same steps as batch 4 on the same examples: micro-batches weigh by
    their trained tokens (masked prompts make them differ a lot), and the logged loss is the token mean."""
    common = ["--data", "builtin:chat", "--no-shuffle", "--schedule", "constant", "--lr", "1e-2", "--max-steps", "3",
              "--weight-decay", "0.1"]
    assert train(artifacts, tmp_path / "large", *common, "--batch-size", "4") == 0
    assert train(artifacts, tmp_path / "accumulated", *common, "--batch-size", "2", "--grad-accum", "2") == 0
    large, accumulated = (load_file(str(tmp_path / run / "checkpoint-3" / "adapter_model.safetensors"))
                          for run in ("large", "accumulated"))
    for key in large:
        assert rel_err(accumulated[key], large[key]) < 1e-5, key
    assert [r["loss"] for r in records(tmp_path / "accumulated")] == \
        pytest.approx([r["loss"] for r in records(tmp_path / "large")], rel=1e-6)
    assert [r["tokens"] for r in records(tmp_path / "accumulated")] == [r["tokens"] for r in records(tmp_path / "large")]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_one_scheduled_step_learns(artifacts, tmp_path, schedule):
    """The decay reaches min_lr one step past the last, so --max-steps 1 trains: every lora_B moves off 0."""
    assert train(artifacts, tmp_path / "run", "--max-steps", "1", "--schedule", schedule) == 0
    adapter = load_file(str(tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors"))
    assert all(np.abs(value).max() > 0 for key, value in adapter.items() if "lora_B" in key)
