"""What the user sees: a progress bar, a JSON Lines log, a summary, a loss-curve picture and, with
--report-to tensorboard, TensorBoard event files.

Every record is a plain dict handed to each callback, so a progress bar, a log file and a test
consume the same numbers. A train record holds step, total_steps, epoch, loss, lr, grad_norm (before
clipping), tokens (trained in the step), trained_tokens (in the run so far, across resumes),
step_seconds, tokens_per_s (this process's average), elapsed and peak_rss_mb; an eval record step,
eval_loss and eval_perplexity.
"""

from __future__ import annotations

import io
import json
import resource
import sys
from pathlib import Path

from ortlora.errors import OrtloraError
from ortlora.runtime.run_dir import TENSORBOARD_DIR

# Log record field -> TensorBoard scalar tag (transformers' names where it has them), by record kind.
TENSORBOARD_SCALARS = {
    "train": {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
              "tokens_per_s": "train/tokens_per_s", "trained_tokens": "train/trained_tokens",
              "peak_rss_mb": "train/peak_rss_mb"},
    "eval": {"eval_loss": "eval/loss", "eval_perplexity": "eval/perplexity"},
}


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def format_step(r: dict) -> str:
    return (f"step {r['step']}/{r['total_steps']}: loss {r['loss']:.4f}, lr {r['lr']:.2e}, "
            f"grad norm {r['grad_norm']:.3f}, {r['tokens_per_s']:.0f} tok/s")


class JsonlLog:
    """Records appended to a log that the run directory made (run_dir.RunDir.begin)."""

    def __init__(self, path: Path):
        self._file = path.open("a", encoding="utf-8")

    def __call__(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def tensorboard_writer():
    """tensorboardX's SummaryWriter, or a one-line error saying what to install. tensorboardX imports torch
    when it can (only to accept torch tensors); the runtime never loads torch, so it is kept out of the import."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects without torch
    try:
        from tensorboardX import SummaryWriter
    except ImportError as e:
        raise OrtloraError(f"--report-to tensorboard writes with tensorboardX, which cannot be imported ({e}): "
                           "pip install \"ortlora[tensorboard]\"") from None
    finally:
        if blocked and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return SummaryWriter


class TensorBoardLog:
    """Train and eval records as TensorBoard scalars by step, in RUN/tensorboard (one event file per process).

    ``purge_step``: a resume logs again from there, so TensorBoard drops what earlier event files hold at and
    after that step (a SessionLog START event, TensorBoard's own rule for restarted runs)."""

    def __init__(self, run_dir: Path, purge_step: int | None, suffix: str):
        # tensorboardX names a file by the second it opened it and truncates one of the same name: a resume within
        # the second (or in the same process) would erase the earlier events. The suffix keeps names unique and in
        # the order written, which is the order TensorBoard reads them in.
        self._writer = tensorboard_writer()(str(run_dir / TENSORBOARD_DIR), purge_step=purge_step, flush_secs=10,
                                            filename_suffix=suffix)

    def __call__(self, record: dict) -> None:
        for key, tag in TENSORBOARD_SCALARS.get(record["kind"], {}).items():
            if record.get(key) is not None:
                self._writer.add_scalar(tag, record[key], record["step"])

    def close(self) -> None:
        self._writer.close()


class ProgressBar:
    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr)

    def __call__(self, record: dict) -> None:
        if record["kind"] == "train":
            self._bar.update(record["step"] - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
        elif record["kind"] == "eval":
            self._bar.write(f"step {record['step']}: eval loss {record['eval_loss']:.4f}, perplexity {record['eval_perplexity']:.2f}")
        elif record["kind"] == "message":
            self._bar.write(record["text"])

    def close(self) -> None:
        self._bar.close()


def plot_losses(log_path: Path) -> bytes | None:
    """Train (and eval) loss against step as a PNG's bytes; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ortlora.runtime.run_dir import read_log

    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    return png.getvalue()
