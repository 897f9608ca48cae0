"""Optimizers by name (the only list) and learning-rate schedules from diffusers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.optimization import get_scheduler

from .config import OptimizerConfig
from .errors import optional_module


def _adamw(params: list, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # On CUDA the fused kernel updates every tensor in a few launches and keeps its step counts on the device
    # (no host reads); elsewhere torch's default implementation.
    fused = all(p.is_cuda and p.is_floating_point() for p in _tensors(params)) or None
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, eps=cfg.eps,
                             fused=fused)


def _tensors(params: list) -> list[torch.Tensor]:
    """The tensors of a list of tensors or of parameter groups."""
    return [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]


def _bitsandbytes(class_name: str, uses_eps: bool) -> Callable[[list, OptimizerConfig], torch.optim.Optimizer]:
    def make(params: list, cfg: OptimizerConfig) -> torch.optim.Optimizer:
        bnb = optional_module("bitsandbytes", f"optimizer.name = '{cfg.name}'", "optimizer.name = 'adamw'")
        extra = {"eps": cfg.eps} if uses_eps else {}
        return getattr(bnb.optim, class_name)(params, lr=cfg.lr, betas=cfg.betas,
                                              weight_decay=cfg.weight_decay, **extra)
    return make


OPTIMIZERS: dict[str, Callable[[list, OptimizerConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _bitsandbytes("AdamW8bit", uses_eps=True),
    "lion8bit": _bitsandbytes("Lion8bit", uses_eps=False),
}


def make_optimizer(params: list, cfg: OptimizerConfig, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = OPTIMIZERS[cfg.name](params, cfg)
    scheduler = get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    return optimizer, scheduler
