"""Adapter → a .safetensors file the stock ComfyUI LoraLoader and diffusers both read."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..loaders.files import atomic_save_safetensors
from .config import RunConfig

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lora_file_state(adapter: dict[str, torch.Tensor], prefix: str, alpha: float, dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    """peft weights (``<module>.lora_A.weight``) → file keys ``<prefix><module>.lora_A.weight`` plus an
    explicit ``<prefix><module>.alpha`` for every module (without it ComfyUI scales by 1, not alpha/rank).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in adapter.items():
        out[prefix + key] = value.to(dtype)
        module = key.rsplit(".lora_", 1)[0]
        out[f"{prefix}{module}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_metadata(cfg: RunConfig, step: int, base_fingerprint: str, base_architecture: str,
                   family: str) -> dict[str, str]:
    """kohya ``ss_*`` and modelspec keys, so other tools recognise what the file is."""
    return {
        "ss_network_module": "networks.lora_flux" if family == "flux" else "networks.lora",
        "ss_network_dim": str(cfg.adapter.rank),
        "ss_network_alpha": str(cfg.adapter.alpha),
        "ss_network_dropout": str(cfg.adapter.dropout),
        "ss_base_model_version": {"flux": "flux1"}.get(family, family),
        "ss_sd_model_name": Path(cfg.model.transformer).name,
        "ss_steps": str(step),
        "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})",
        "ss_learning_rate": str(cfg.optimizer.lr),
        "ss_optimizer": cfg.optimizer.name,
        "ss_lr_scheduler": cfg.optimizer.scheduler,
        "ss_seed": str(cfg.train.seed),
        "ss_training_finished_at": str(int(time.time())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{base_architecture}/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux" if family == "flux" else "",
        "modelspec.title": cfg.output.name,
        "loraloom_base_fingerprint": base_fingerprint,
        "loraloom_family": family,
        "loraloom_config": json.dumps(cfg.to_dict()),
    }


def write_lora(path: Path, adapter: dict[str, torch.Tensor], prefix: str, alpha: float, dtype: torch.dtype,
               metadata: dict[str, str]) -> Path:
    atomic_save_safetensors(lora_file_state(adapter, prefix, alpha, dtype), path, metadata=metadata)
    return path
