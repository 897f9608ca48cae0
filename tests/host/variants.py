"""What the ComfyUI host tests export once per adapter algorithm, shared by the Flux, Lumina 2 and SDXL tests:
the settings (LoKr in its three layouts) and how an attached adapter's tensors are made random, as after training.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from loraloom.training.config import AdapterConfig

# Every algorithm but the whole-model ones (test_comfyui_loads_export.py checks that), with the std of its random
# factors that makes its change visible at real width (LoHa multiplies four factors, LoKr's full w1 is small).
VARIANTS: dict[str, tuple[AdapterConfig, float]] = {
    "lora": (AdapterConfig(rank=4, alpha=8.0), 0.02),
    "locon": (AdapterConfig(algorithm="locon", rank=4, alpha=8.0), 0.02),
    "loha": (AdapterConfig(algorithm="loha", rank=4, alpha=8.0), 0.1),
    "lokr": (AdapterConfig(algorithm="lokr", rank=4, alpha=8.0, factor=16), 0.05),
    "lokr_full_matrix": (AdapterConfig(algorithm="lokr", factor=8, full_matrix=True), 0.05),
    "lokr_decompose_both": (AdapterConfig(algorithm="lokr", rank=2, alpha=1.0, decompose_both=True), 0.2),
    "dora": (AdapterConfig(algorithm="dora", rank=4, alpha=8.0), 0.02),
}


def randomize(modules: Iterable[torch.nn.Module], std: float, seed: int) -> None:
    """Every trainable tensor of ``modules`` (the adapter's: the bases are frozen) random: factors N(0, std), a DoRA
    magnitude ±10% around its start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if p.requires_grad:
                    noise = torch.randn(p.shape, generator=g)
                    p.copy_(p * (1 + 0.1 * noise) if name.endswith("dora_scale") else noise * std)
