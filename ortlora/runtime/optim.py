"""AdamW in numpy, updating parameters in place (Loshchilov & Hutter, as torch.optim.AdamW)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ortlora.weights import tensor_problems


@dataclass
class AdamWConfig:
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float | None = None  # clip by global norm when set


class AdamW:
    """One call of ``step`` per optimizer step, in this order (torch.optim.AdamW's):

        theta *= 1 - lr * weight_decay                    # decoupled weight decay
        m = beta1 * m + (1 - beta1) * g                   # first moment
        v = beta2 * v + (1 - beta2) * g * g               # second moment
        theta -= lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)

    which is theta -= lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * theta_old).
    State is one (m, v) pair per parameter, float32, shaped like it.
    """

    def __init__(self, config: AdamWConfig):
        self.config = config
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> float:
        """Update ``params`` in place from ``grads``; returns the global gradient norm before clipping."""
        c = self.config
        norm = global_norm(grads.values())
        clip = 1.0
        if c.max_grad_norm and norm > c.max_grad_norm:
            clip = c.max_grad_norm / (norm + 1e-6)
        self.t += 1
        bias1 = 1.0 - c.beta1**self.t
        bias2_sqrt = math.sqrt(1.0 - c.beta2**self.t)
        step_size = lr / bias1
        for name, theta in params.items():
            g = grads[name] * clip if clip != 1.0 else grads[name]
            m = self.m.setdefault(name, np.zeros_like(theta))
            v = self.v.setdefault(name, np.zeros_like(theta))
            if c.weight_decay:
                theta *= 1.0 - lr * c.weight_decay
            m *= c.beta1
            m += (1.0 - c.beta1) * g
            v *= c.beta2
            v += (1.0 - c.beta2) * np.square(g)
            denom = np.sqrt(v)
            denom /= bias2_sqrt
            denom += c.eps
            theta -= step_size * (m / denom)
        return norm

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"step": np.array([self.t], dtype=np.int64)}
        state.update({f"exp_avg.{k}": v for k, v in self.m.items()})
        state.update({f"exp_avg_sq.{k}": v for k, v in self.v.items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["step"].reshape(-1)[0])
        self.m = {k[len("exp_avg."):]: v.copy() for k, v in state.items() if k.startswith("exp_avg.")}
        self.v = {k[len("exp_avg_sq."):]: v.copy() for k, v in state.items() if k.startswith("exp_avg_sq.")}


def state_problems(state: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """What keeps ``state`` from being the AdamW state of parameters of ``shapes``: a missing, extra or
    mis-shaped moment would otherwise restart that parameter's moments from zero without a word."""
    expected = {"step": (1,)} | {f"{kind}.{name}": shape for kind in ("exp_avg", "exp_avg_sq") for name, shape in shapes.items()}
    problems = tensor_problems(state, expected)
    step = state.get("step")
    if step is not None and step.shape == (1,) and not (np.issubdtype(step.dtype, np.integer) and step[0] >= 0):
        problems.append(f"step is {step[0]}, expected a count of steps")
    problems += [f"{key} has negative values" for key in expected
                 if key.startswith("exp_avg_sq.") and key in state and (state[key] < 0).any()]
    return problems


def global_norm(arrays) -> float:
    return math.sqrt(sum(float(np.vdot(a, a)) for a in arrays))
