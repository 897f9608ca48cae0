"""Adapters on a frozen base. The only module that talks to peft: every call sets its state explicitly."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from .config import optional_module

ADAPTER_NAME = "default"
# diffusers' layerwise-casting defaults plus the adapter's own weights, which must stay trainable fp32.
CASTING_SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", "lora_")


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


def enable_fp8_storage(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Store linear weights in float8_e4m3fn, cast per layer to ``compute_dtype`` at use.

    Call after the adapter exists: peft would otherwise create its weights in fp8.
    """
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype,
                                   skip_modules_pattern=CASTING_SKIP)


def quantize_nf4(model: torch.nn.Module, target_regex: str, compute_dtype: torch.dtype, device: torch.device
                 ) -> None:
    """Store the linear layers whose names fully match ``target_regex`` in 4-bit NormalFloat (QLoRA).

    Each layer is quantised on ``device`` as it is replaced, so the full-precision base never sits there
    whole. Call before :func:`add_lora`, so peft wraps the 4-bit layers with its bitsandbytes LoRA layer.
    """
    bnb = optional_module("bitsandbytes", "model.base_precision = 'nf4'", "model.base_precision = 'fp8'")
    pattern = re.compile(target_regex)
    for name, linear in list(model.named_modules()):
        if not (isinstance(linear, torch.nn.Linear) and pattern.fullmatch(name)):
            continue
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        model.set_submodule(name, layer.to(device))  # .to quantises
    model.is_loaded_in_4bit = True  # what peft reads to pick its 4-bit LoRA layer
