"""AdamW against torch.optim.AdamW, and the learning-rate schedules at their edges."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ortlora.runtime.optim import AdamW, AdamWConfig
from ortlora.runtime.schedules import Schedule


@pytest.mark.parametrize("weight_decay, clip", [(0.0, None), (0.1, None), (0.01, 0.5)])
def test_adamw_trajectory_matches_torch(weight_decay, clip):
    rng = np.random.default_rng(0)
    shapes = {"a": (8, 16), "b": (16, 8)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    torch_params = [torch.nn.Parameter(torch.from_numpy(params[k].copy())) for k in shapes]
    ours = AdamW(AdamWConfig(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay, max_grad_norm=clip))
    ref = torch.optim.AdamW(torch_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    sched = Schedule("warmup-cosine", lr=1e-2, total=200, warmup=10)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda step: sched(step) / 1e-2)
    for step in range(200):
        grads = {k: rng.standard_normal(s).astype(np.float32) * (1 + step % 7) for k, s in shapes.items()}
        ours.step(params, grads, sched(step))
        for p, k in zip(torch_params, shapes):
            p.grad = torch.from_numpy(grads[k].copy())
        if clip:
            torch.nn.utils.clip_grad_norm_(torch_params, clip)
        ref.step()
        ref_sched.step()
    for p, k in zip(torch_params, shapes):
        err = np.abs(params[k] - p.detach().numpy()).max() / np.abs(p.detach().numpy()).max()
        assert err < 1e-5, (k, err)


def test_adamw_state_round_trip():
    params = {"w": np.ones((3,), np.float32)}
    opt = AdamW(AdamWConfig())
    opt.step(params, {"w": np.array([1.0, -2.0, 3.0], np.float32)}, 0.1)
    clone = AdamW(AdamWConfig())
    clone.load_state_dict(opt.state_dict())
    a, b = dict(params), {"w": params["w"].copy()}
    opt.step(a, {"w": np.array([0.5, 0.5, 0.5], np.float32)}, 0.1)
    clone.step(b, {"w": np.array([0.5, 0.5, 0.5], np.float32)}, 0.1)
    np.testing.assert_array_equal(a["w"], b["w"])


def test_constant_with_warmup():
    s = Schedule("constant", lr=1.0, total=10, warmup=4)
    assert [s(i) for i in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert s(100) == 1.0


def transformers_lrs(name: str, lr: float, total: int, warmup: int, min_lr: float) -> list[float]:
    """The lr transformers' schedule of that name gives at steps 0 .. total + 4."""
    from transformers import optimization as hf

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    if name == "linear":
        assert min_lr == 0
        scheduler = hf.get_linear_schedule_with_warmup(optimizer, warmup, total)
    elif min_lr:
        scheduler = hf.get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_lr / lr)
    else:
        scheduler = hf.get_cosine_schedule_with_warmup(optimizer, warmup, total)
    lrs = []
    for _ in range(total + 5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name,total,warmup,min_lr", [
    ("linear", 11, 0, 0.0), ("linear", 30, 5, 0.0), ("cosine", 21, 0, 0.0), ("cosine", 30, 4, 0.0),
    ("cosine", 30, 4, 0.1), ("warmup-cosine", 100, 0, 0.1), ("linear", 1, 0, 0.0), ("cosine", 1, 0, 0.0)])
def test_schedules_are_transformers_after_warmup(name, total, warmup, min_lr):
    """After warmup, each decaying schedule is transformers' at every step; the decay reaches min_lr at step
    ``total``, so the last scheduled step still learns (and a one-step run trains at lr)."""
    s = Schedule(name, lr=2.0, total=total, warmup=warmup, min_lr=min_lr)
    reference = transformers_lrs("linear" if name == "linear" else "cosine", 2.0, total, s.warmup, min_lr)
    for step in range(s.warmup, total):
        assert s(step) == pytest.approx(reference[step], rel=1e-12, abs=1e-15), step
    assert s(total - 1) > min_lr
    assert s(total + 3) == pytest.approx(min_lr)  # past the end: stays (transformers' cosine rises again)


def test_warmup_starts_above_zero_where_transformers_starts_at_zero():
    s = Schedule("warmup-cosine", lr=1.0, total=100, min_lr=0.1)
    assert s.warmup == 10  # 10% default
    reference = transformers_lrs("cosine", 1.0, 100, 10, 0.1)
    assert reference[0] == 0.0 and s(0) == pytest.approx(0.1)  # ours: (step + 1) / warmup
    assert [s(i) for i in range(10)] == pytest.approx([reference[i + 1] for i in range(10)])  # one step ahead
    assert s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)  # the peak, then the decay's first step


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("step", lr=1.0, total=10)
