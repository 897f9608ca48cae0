"""Adapter → a .safetensors file the stock ComfyUI LoraLoader and diffusers both read; a whole-model adapter →
the model as one file in the family's native layout, plus a diff patch for the LoraLoader."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..loaders.files import atomic_save_safetensors
from .adapters.base import Adapter
from .config import RunConfig
from .families.base import DENOISER, Family

EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ComfyUI's patch loader reads "diffusion_model.<key of the native file>" for every model (its generic format:
# comfy/lora.py model_lora_keys_unet), fused tensors included; a key ending in .weight takes <stem>.diff and its
# bias <stem>.diff_b, any other key <key>.diff.
COMFY_MODEL_PREFIX = "diffusion_model."


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


def adapter_groups(file_state: dict[str, torch.Tensor], family: Family, targets: list[str]
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of :func:`adapter_file_state`: a file's tensors by target (``targets``: the
    ``<component>.<module>`` names it may adapt) with the algorithm's suffixes. ValueError naming a key that
    belongs to none of them."""
    names = {family.export_key(*target.split(".", 1)): target for target in targets}
    suffixes = {spelled: suffix for suffix, spelled in family.export_suffixes.items()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in file_state.items():
        parts = key.split(".")
        # The longest prefix that names a target: module names nest ("attn" holds "attn.to_q").
        found = next(((names[stem], ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)
                      if (stem := ".".join(parts[:i])) in names), None)
        if found is None:
            raise ValueError(f"{key}: names no layer of the adapter's targets (a file for another model, or for "
                             "other adapter.targets / adapter.blocks)")
        target, suffix = found
        groups.setdefault(target, {})[suffixes.get(suffix, suffix)] = value
    return groups


def companion(path: Path, tag: str) -> Path:
    """The file written beside ``path`` for ``tag``: ``<stem>-<tag>.safetensors``."""
    return path.with_name(f"{path.stem}-{tag}{path.suffix}")


def model_state(denoiser: torch.nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    """The whole denoiser as a whole-model adapter trained it: its state dict (module names as loaded) with the
    trained tensors."""
    state = dict(denoiser.state_dict())
    state.update({name.split(".", 1)[1]: value for name, value in adapter.trained_weights().items()
                  if name.startswith(f"{DENOISER}.")})
    return state


def write_model(path: Path, state: dict[str, torch.Tensor], family: Family, dtype: torch.dtype,
                metadata: dict[str, str]) -> Path:
    """A denoiser state dict (module names as loaded) as one file in the family's native layout, the one ComfyUI's
    ``diffusion_models`` loader reads; floating tensors in ``dtype``."""
    native = family.native_state_dict(state)
    atomic_save_safetensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in native.items()}, path,
                            metadata=metadata)
    return path


def patch_file_state(diffs: dict[str, torch.Tensor], shapes: dict[str, torch.Tensor], family: Family,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Differences of denoiser tensors (``<module>.weight`` / ``.bias`` → trained − base) as ComfyUI diff patch
    keys over the native layout (see :data:`COMFY_MODEL_PREFIX`); tensors without a difference are left out.

    ``shapes``: the denoiser's state dict (only the shapes are read): the native conversion needs every tensor,
    and fused native tensors (a qkv projection) get the differences of all their parts. This is why whole-model patches
    use native names: ComfyUI applies a diffusers name that is a slice of a fused tensor to the weight, but drops
    its ``diff_b``.
    """
    zero = torch.zeros((), dtype=torch.float32)
    full = {key: diffs[key].float() if key in diffs else zero.expand(value.shape) for key, value in shapes.items()}
    native = family.native_state_dict(full)
    out = {}
    for key, value in native.items():
        if not torch.count_nonzero(value):
            continue
        stem, kind = key.rsplit(".", 1)
        name = {"weight": f"{stem}.diff", "bias": f"{stem}.diff_b"}.get(kind, f"{key}.diff")
        if kind == "bias" and f"{stem}.weight" not in native:
            name = f"{key}.diff"
        out[COMFY_MODEL_PREFIX + name] = value.to(dtype)
    return out


def write_exports(path: Path, adapter: Adapter, denoiser: torch.nn.Module, family: Family, dtype: torch.dtype,
                  metadata: dict[str, str]) -> list[Path]:
    """What a run exports at ``path``: the adapter file, or for a whole-model adapter the diff patch there (the
    LoraLoader and Apply use it as any adapter) and the whole model as ``<stem>-model.safetensors``."""
    groups = adapter.export()
    if not adapter.whole_model:
        return [write_adapter(path, groups, family, dtype, metadata)]
    diffs = {f"{target.split('.', 1)[1]}.{'weight' if suffix == 'diff' else 'bias'}": value
             for target, tensors in groups.items() if target.startswith(f"{DENOISER}.")
             for suffix, value in tensors.items()}
    others = {target: tensors for target, tensors in groups.items() if not target.startswith(f"{DENOISER}.")}
    patch = {**patch_file_state(diffs, denoiser.state_dict(), family, dtype),
             **adapter_file_state(others, family, dtype)}
    atomic_save_safetensors(patch, path, metadata=metadata)
    model_meta = {**metadata, "modelspec.architecture": family.architecture}
    return [path, write_model(companion(path, "model"), model_state(denoiser, adapter), family, dtype, model_meta)]
