"""Adapter → a .safetensors file the stock ComfyUI LoraLoader and diffusers both read."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..loaders.files import atomic_save_safetensors
from .config import RunConfig
from .families.base import Family

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def adapter_file_state(groups: dict[str, dict[str, torch.Tensor]], family: Family, dtype: torch.dtype
                       ) -> dict[str, torch.Tensor]:
    """An adapter's export (tensors by target, see ``Adapter.export``) under the names ComfyUI's loader reads for
    ``family``: ``<family key>.<suffix>``, tensors in ``dtype`` except the float32 ``alpha`` scalars."""
    out: dict[str, torch.Tensor] = {}
    for target, tensors in groups.items():
        component, module = target.split(".", 1)
        key = family.export_key(component, module)
        for suffix, value in tensors.items():
            out[f"{key}.{family.export_suffixes.get(suffix, suffix)}"] = value.float() if suffix == "alpha" \
                else value.to(dtype)
    return out


def kohya_metadata(cfg: RunConfig, step: int, base_fingerprint: str, family: Family) -> dict[str, str]:
    """kohya ``ss_*`` and modelspec keys, so other tools recognise what the file is; the family adds its own."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.adapter.rank),
        "ss_network_alpha": str(cfg.adapter.alpha),
        "ss_network_dropout": str(cfg.adapter.dropout),
        "ss_base_model_version": family.name,
        "ss_sd_model_name": Path(cfg.model.diffusion_model).name,
        "ss_steps": str(step),
        "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})",
        "ss_learning_rate": str(cfg.optimizer.lr),
        "ss_optimizer": cfg.optimizer.name,
        "ss_lr_scheduler": cfg.optimizer.scheduler,
        "ss_seed": str(cfg.train.seed),
        "ss_training_finished_at": str(int(time.time())),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{family.architecture}/lora",
        "modelspec.title": cfg.output.name,
        "loraloom_base_fingerprint": base_fingerprint,
        "loraloom_family": family.name,
        "loraloom_config": json.dumps(cfg.to_dict()),
        **family.metadata(cfg),
    }


def write_adapter(path: Path, groups: dict[str, dict[str, torch.Tensor]], family: Family, dtype: torch.dtype,
                  metadata: dict[str, str]) -> Path:
    atomic_save_safetensors(adapter_file_state(groups, family, dtype), path, metadata=metadata)
    return path
