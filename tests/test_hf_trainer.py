"""Side by side with transformers' Trainer + PEFT: the same starting adapter, the same batches, AdamW with weight
decay and clipping, a constant learning rate (and gradient accumulation). Every step's loss and grad norm, and
the adapter at the end, agree to fp32 precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from ortlora.manifest import Manifest
from ortlora.runtime import cli as train_cli
from ortlora.runtime.backend import OrtTrainingBackend
from ortlora.runtime.cli import data_path
from ortlora.runtime.data import IGNORE_INDEX, batches_in_epoch, load_jsonl
from ortlora.runtime.tokenizer import Tokenizer
from tests.reference import peft_key, peft_model, rel_err

STEPS, BATCH, LR = 12, 4, 5e-3


def unshifted(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """ortlora's batch (labels[t] = token t + 1) as transformers takes it (labels[t] = token t, shifted inside the
    model): one more position, whose own prediction is never scored."""
    labels = batch["labels"]
    last = np.where(labels[:, -1:] == IGNORE_INDEX, pad_id, labels[:, -1:])
    ids = np.concatenate([batch["input_ids"], last], axis=1)
    for row, n in enumerate(batch["attention_mask"].sum(axis=1)):  # the token after each row's last input
        ids[row, n] = labels[row, n - 1] if labels[row, n - 1] != IGNORE_INDEX else pad_id
    mask = np.concatenate([batch["attention_mask"], batch["attention_mask"][:, -1:]], axis=1)
    mask[np.arange(len(ids)), batch["attention_mask"].sum(axis=1).clip(max=mask.shape[1] - 1)] = 1
    hf_labels = np.concatenate([np.full((len(ids), 1), IGNORE_INDEX), labels], axis=1)
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(hf_labels)}


def hf_run(artifacts: Path, data: str, grad_accum: int, out: Path) -> tuple[list[float], list[float], dict]:
    from transformers import Trainer, TrainingArguments

    manifest = Manifest.load(artifacts)
    tokenizer = Tokenizer(artifacts)
    examples, _ = load_jsonl(data_path(data, "train"), tokenizer, 512)
    batches = [unshifted(b, tokenizer.pad_id) for b in
               batches_in_epoch(examples, BATCH, epoch=0, seed=0, shuffle=False, pad_id=tokenizer.pad_id)]
    model = peft_model(artifacts, OrtTrainingBackend(artifacts, manifest).weights())  # ortlora's starting adapter
    model.train()
    losses = []

    class SameBatches(Trainer):
        def get_train_dataloader(self):
            return batches[: STEPS * grad_accum]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss.detach()))
            return loss

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=grad_accum,
                             learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
                             adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", max_steps=STEPS,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = SameBatches(model=model, args=args)
    trainer.train()
    norms = [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]
    params = dict(model.named_parameters())
    adapter = {p.onnx_name: params[peft_key(p)].detach().numpy().copy() for p in manifest.parameters}
    return losses, norms, adapter


@pytest.mark.parametrize("data,grad_accum", [("builtin:completions", 1), ("builtin:chat", 1), ("builtin:chat", 2)])
def test_same_steps_as_transformers_trainer(artifacts, tmp_path, data, grad_accum):
    hf_losses, hf_norms, hf_adapter = hf_run(artifacts, data, grad_accum, tmp_path / "hf")
    run = tmp_path / "ortlora"
    assert train_cli.main(["--artifacts", str(artifacts), "--out", str(run), "--data", data, "--no-shuffle",
                           "--batch-size", str(BATCH), "--grad-accum", str(grad_accum), "--max-steps", str(STEPS),
                           "--schedule", "constant", "--lr", str(LR), "--weight-decay", "0.01", "--max-grad-norm", "1.0",
                           "--no-progress", "--no-plot"]) == 0
    records = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    # transformers computes each micro-batch's loss as its sum over the step's trained tokens (num_items_in_batch)
    # and logs their sum; ortlora logs the step's token mean: the same number.
    hf_step_losses = [sum(hf_losses[i: i + grad_accum]) for i in range(0, len(hf_losses), grad_accum)]
    assert len(records) == len(hf_step_losses) == len(hf_norms) == STEPS
    assert np.allclose([r["loss"] for r in records], hf_step_losses, rtol=2e-6, atol=0)
    assert np.allclose([r["grad_norm"] for r in records], hf_norms, rtol=2e-5, atol=0)
    ours = load_file(str(run / f"checkpoint-{STEPS}" / "adapter_model.safetensors"))
    manifest = Manifest.load(artifacts)
    for p in manifest.parameters:
        assert rel_err(ours[p.peft_name], hf_adapter[p.onnx_name]) < 3e-5, p.onnx_name  # 12 AdamW steps of fp32 rounding
    assert max(abs(a - b) for a, b in zip(hf_step_losses[:1], hf_step_losses[-1:])) > 0.1  # it trained
