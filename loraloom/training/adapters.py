"""Adapters on a frozen base. The only module that talks to peft: every call sets its state explicitly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

ADAPTER_NAME = "default"


def add_lora(model: torch.nn.Module, target_regex: str, rank: int, alpha: float, dropout: float,
             seed: int) -> list[str]:
    """Inject a LoRA into the modules whose names fully match ``target_regex``; B starts at zero.

    The initial A weights come from ``seed`` without touching the global RNG. Returns the adapted
    module names (sorted).
    """
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_regex,
                        init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    names = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and ADAPTER_NAME in m.lora_A)
    if not names:
        raise ValueError(f"no layer matched the adapter targets {target_regex!r}")
    for p in trainable_parameters(model):
        p.data = p.data.float()
    return names


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n and ADAPTER_NAME in n]


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights by module name: ``<module>.lora_A.weight`` (r, in), ``lora_B`` (out, r)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put weights from :func:`adapter_state` back into the model (same targets and rank)."""
    params = dict(model.named_parameters())
    for key, value in state.items():
        module, kind = key.rsplit(".lora_", 1)
        name = f"{module}.lora_{kind.replace('.weight', '')}.{ADAPTER_NAME}.weight"
        if name not in params or params[name].shape != value.shape:
            raise ValueError(f"adapter weight {key} does not fit this model (targets or rank changed?)")
        with torch.no_grad():
            params[name].copy_(value)


@contextmanager
def adapter_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run the base model alone: every LoRA layer bypassed, restored afterwards."""
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
    previous = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_disabled in zip(layers, previous):
            m.enable_adapters(not was_disabled)
