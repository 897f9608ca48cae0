"""Model-file tools: merge an adapter into its base, extract a LoRA from a fine-tune by SVD.

Both go through the family and adapter contracts only: the family loads its model files and writes its native
layout, the adapter algorithm folds its own update into the weights (``Adapter.trained_weights``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..loaders.files import ModelFileError, atomic_save_safetensors, read_safetensors
from . import adapters
from .adapters.base import LAYERS, select_targets
from .config import AdapterConfig, ConfigError, ModelConfig, RunConfig, config_from_dict
from .export import EXPORT_DTYPES, adapter_file_state, adapter_groups, patch_file_state, write_model
from .families import family as family_named
from .families.base import DENOISER, Family


def merge(base: Path, adapter_file: Path, out: Path, dtype: str = "bf16", cfg: RunConfig | None = None) -> Path:
    """Write ``base`` with the adapter of ``adapter_file`` folded in, as one file in the family's native layout.

    The adapter's algorithm, targets and family come from the file's ``loraloom_config`` metadata (every file LoRA
    Loom exports has it), or from ``cfg`` (a run config describing it) for other files.
    """
    base, adapter_file = Path(base), Path(adapter_file)
    tensors = read_safetensors([adapter_file], what="the adapter")
    cfg = cfg or _saved_config(adapter_file)
    family = family_named(cfg.model.family)
    settings = cfg.adapter
    if adapters.algorithm(settings.algorithm).whole_model:
        raise ConfigError(f"{adapter_file} is a full fine-tune's patch: the run already wrote the merged model beside "
                          f"it ({adapter_file.stem}-model.safetensors)")
    model = _load(family, cfg.model, base)
    state = dict(model.state_dict())  # the base's tensors under their own names, before the adapter wraps them
    adapter = adapters.attach({DENOISER: model}, {DENOISER: family.targets[settings.targets]}, settings,
                              settings.init_seed)
    try:
        adapter.load_export(adapter_groups(tensors, family, sorted(adapter.targets)))
    except ValueError as e:
        raise ModelFileError(f"{adapter_file}: {e}") from None
    state.update({name.split(".", 1)[1]: value for name, value in adapter.trained_weights().items()})
    meta = {"modelspec.architecture": family.architecture, "loraloom_family": family.name,
            "loraloom_merged": json.dumps({"base": base.name, "adapter": adapter_file.name})}
    return write_model(Path(out), state, family, EXPORT_DTYPES[dtype], meta)


@dataclasses.dataclass(frozen=True)
class Extracted:
    """What :func:`extract` wrote."""
    path: Path
    targets: int  # layers with a LoRA (those whose weight changed)
    relative_error: float  # ||ΔW − up·down||_F / ||ΔW||_F over all targets together
    biases: int  # bias differences written as diff_b patches (0 without ``biases``)
    untargeted: list[str]  # changed tensors the LoRA does not carry (outside the preset, norm scales, ...)


def extract(base: Path, tuned: Path, out: Path, rank: int, family_name: str, targets: str = "all_linear",
            dtype: str = "bf16", biases: bool = True) -> Extracted:
    """A LoRA of at most ``rank`` per layer that turns ``base`` into ``tuned`` (two model files of one family, e.g.
    a full fine-tune's ``<name>-model.safetensors`` and its base) on the layers of preset ``targets``.

    Each weight difference ΔW (out, in) (a convolution's flattened to (out, in·k·k)) is cut by SVD to its best
    rank-r approximation, ``lora_up`` = U·√S and ``lora_down`` = √S·Vᵀ with ``alpha`` = r (scale 1). A layer of
    rank below ``rank`` gets its full rank, so the LoRA reproduces ΔW exactly. With ``biases``, bias differences
    go in the same file as diff patches in the native layout, which ComfyUI's loader also applies (LoRAs carry no
    bias); without, they are listed in ``untargeted``.
    """
    if rank < 1:
        raise ConfigError(f"--rank {rank} must be at least 1")
    family = family_named(family_name)
    if targets not in family.targets:
        raise ConfigError(f"--targets {targets!r} is not one of {sorted(family.targets)} for {family.title}")
    model_cfg = ModelConfig(family=family.name)
    base_model, tuned_model = _load(family, model_cfg, Path(base)), _load(family, model_cfg, Path(tuned))
    chosen = select_targets({DENOISER: tuned_model}, {DENOISER: family.targets[targets]},
                            AdapterConfig(rank=rank, targets=targets), LAYERS)
    base_state, tuned_state = base_model.state_dict(), tuned_model.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bias_diffs: dict[str, torch.Tensor] = {}
    error = total = 0.0
    for target in chosen:
        key = target.module_name
        delta = tuned_state[f"{key}.weight"].float() - base_state[f"{key}.weight"].float()
        if f"{key}.bias" in tuned_state:
            bias = tuned_state[f"{key}.bias"].float() - base_state[f"{key}.bias"].float()
            if biases and torch.count_nonzero(bias):
                bias_diffs[f"{key}.bias"] = bias
        if not torch.count_nonzero(delta):
            continue
        up, down = low_rank(delta.flatten(1), rank)
        error += (delta.flatten(1) - up @ down).square().sum().item()
        total += delta.square().sum().item()
        r, kernel = down.shape[0], delta.ndim - 2  # a convolution's up is (out, r, 1, 1), its down (r, in, k, k)
        groups[target.name] = {"lora_down.weight": down.reshape(r, *delta.shape[1:]),
                               "lora_up.weight": up.reshape(*up.shape, *(1,) * kernel),
                               "alpha": torch.tensor(float(r))}
    carried = {f"{t.module_name}.weight" for t in chosen} | (set(bias_diffs) if biases else set())
    untargeted = sorted(k for k in tuned_state if k not in carried
                        and not torch.equal(tuned_state[k].float(), base_state[k].float()))
    out_dtype = EXPORT_DTYPES[dtype]
    tensors = adapter_file_state(groups, family, out_dtype)
    tensors.update(patch_file_state(bias_diffs, tuned_state, family, out_dtype))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank),
            "modelspec.architecture": f"{family.architecture}/lora", "loraloom_family": family.name,
            "loraloom_extracted": json.dumps({"base": Path(base).name, "tuned": Path(tuned).name, "rank": rank,
                                              "targets": targets})}
    atomic_save_safetensors(tensors, out, metadata=meta)
    return Extracted(Path(out), len(groups), math.sqrt(error / total) if total else 0.0, len(bias_diffs), untargeted)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best approximation of ``delta`` (out, in) of rank ≤ ``rank`` (Eckart-Young), as up (out, r) and
    down (r, in) with the singular values split evenly between them; r = min(rank, out, in)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()


def _load(family: Family, model: ModelConfig, path: Path) -> torch.nn.Module:
    """A model file through the family's own loader, in a dtype that holds each of its tensors exactly (half of
    float32's memory for a bf16 / fp16 / fp8 file); differences and merges are computed in float32 from there."""
    return family.load_denoiser(dataclasses.replace(model, diffusion_model=str(path)), _exact_dtype(path),
                                keep_float8=False)


def _exact_dtype(path: Path) -> torch.dtype:
    """bf16 for a file of bf16 / float8 tensors, fp16 for fp16 / float8 ones (float8 fits either exactly), float32
    for anything else (float32 tensors, a mix of bf16 and fp16, a folder)."""
    if not (path.is_file() and path.suffix == ".safetensors"):
        return torch.float32
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        stored = {f.get_slice(k).get_dtype() for k in names} - {"F8_E4M3", "F8_E5M2"}
    return {frozenset({"BF16"}): torch.bfloat16, frozenset({"F16"}): torch.float16}.get(frozenset(stored),
                                                                                      torch.float32)


def _saved_config(path: Path) -> RunConfig:
    """The run config in a readable file's metadata."""
    with safe_open(str(path), "pt") as f:
        saved = (f.metadata() or {}).get("loraloom_config")
    if not saved:
        raise ConfigError(f"{path} has no loraloom_config metadata (it was not exported by LoRA Loom): pass --config "
                          "with a run config whose [model] family and [adapter] section describe it")
    return config_from_dict(json.loads(saved))
