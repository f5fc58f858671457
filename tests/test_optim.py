"""AdamW against torch.optim.AdamW, and the learning-rate schedules at their edges."""

from __future__ import annotations

import math

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


def test_linear_edges():
    s = Schedule("linear", lr=1.0, total=11, min_lr=0.1)
    assert s(0) == 1.0
    assert s(10) == pytest.approx(0.1)  # the last step reaches min_lr
    assert s(5) == pytest.approx(0.55)
    assert s(50) == pytest.approx(0.1)  # past the end: stays


def test_cosine_edges():
    s = Schedule("cosine", lr=2.0, total=21, warmup=0)
    assert s(0) == 2.0
    assert s(10) == pytest.approx(1.0)  # half way
    assert s(20) == pytest.approx(0.0)
    assert s(99) == pytest.approx(0.0)


def test_warmup_cosine_edges():
    s = Schedule("warmup-cosine", lr=1.0, total=100, min_lr=0.1)
    assert s.warmup == 10  # 10% default
    assert s(0) == pytest.approx(0.1)
    assert s(9) == pytest.approx(1.0)  # end of warmup: peak
    assert s(10) == pytest.approx(1.0)  # first decay step
    assert s(99) == pytest.approx(0.1)  # last step: min_lr
    assert s(150) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert s(int(mid)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 10) / 89)))


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("step", lr=1.0, total=10)
