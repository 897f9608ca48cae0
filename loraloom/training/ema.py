"""Exponential moving average of the trained parameters, for every adapter algorithm.

It averages what ``Adapter.parameters()`` returns (LoRA factors, LyCORIS tensors, a full fine-tune's weights),
so the EMA weights export, preview and checkpoint through the same code as the live ones: swap them in with
:meth:`Ema.applied`. diffusers' ``EMAModel`` is not used because it averages only parameters on its own device
(and copies instead of averaging detached host copies), so it cannot keep the average in host memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .config import EmaConfig


class Ema:
    """The average of a fixed list of parameters (the order of ``Adapter.parameters()``), float32.

    The n-th update (n = 0, 1, ...; at step (n + 1) · ``every``) moves each average ``s`` towards its parameter
    ``p``: ``s ← s + (1 − d) (p − s)`` with ``d = min(decay, (1 + n) / (10 + n))`` under warm-up, else ``decay``.
    The average starts at the parameters' values when it is created.
    """

    def __init__(self, params: list[torch.nn.Parameter], cfg: EmaConfig):
        self.cfg = cfg
        self.shadow = [p.detach().to("cpu" if cfg.on_cpu else p.device, torch.float32, copy=True) for p in params]

    def decay(self, step: int) -> float:
        """The decay of the update at optimizer step ``step``."""
        n = step // self.cfg.every - 1
        return min(self.cfg.decay, (1 + n) / (10 + n)) if self.cfg.warmup else self.cfg.decay

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0

    @torch.no_grad()
    def update(self, params: list[torch.nn.Parameter], step: int) -> None:
        """The update of optimizer step ``step`` (call it after the step, when :meth:`due`)."""
        weight = 1 - self.decay(step)
        for average, param in zip(self.shadow, params, strict=True):
            average.lerp_(param.detach().to(average.device, torch.float32), weight)

    def state(self) -> dict[str, torch.Tensor]:
        """``"<i>"`` → the average of parameter i, for checkpoints."""
        return {str(i): average for i, average in enumerate(self.shadow)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.shadow) or any(
                state.get(str(i), torch.empty(0)).shape != s.shape for i, s in enumerate(self.shadow)):
            raise ValueError("the checkpoint's moving average does not fit the trained parameters")
        for i, average in enumerate(self.shadow):
            average.copy_(state[str(i)])

    @contextmanager
    def applied(self, params: list[torch.nn.Parameter]) -> Iterator[None]:
        """The parameters hold the averages while the context lasts (previews, export); restored afterwards."""
        live = [p.detach().to(s.device, copy=True) for p, s in zip(params, self.shadow, strict=True)]
        try:
            _copy(params, self.shadow)
            yield
        finally:
            _copy(params, live)


@torch.no_grad()
def _copy(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    for param, value in zip(params, values):
        param.copy_(value)
