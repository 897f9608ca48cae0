"""Host test: stock ComfyUI loads every key of each algorithm's export and computes what the engine computes.

Flux at real width (ComfyUI detects the model from its widths), every linear layer adapted, with the file read by
ComfyUI's own Flux loader (``load_lora_for_models``); convolutions and Tucker forms on a small model whose weights
ComfyUI's ``load_lora`` and ``ModelPatcher`` patch. Runs when COMFYUI_PATH points at a ComfyUI checkout
(COMFYUI_PYTHON: the interpreter of its environment, default this one); skips otherwise.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraloom.training import adapters
from loraloom.training.config import AdapterConfig
from loraloom.training.families import flux, flux_vae
from loraloom.training.families.base import DENOISER

sys.path.insert(0, str(Path(__file__).parent))
from variants import VARIANTS

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH not set: no ComfyUI checkout to test against")

def test_every_algorithm_is_checked_here():
    """variants.py, which the Flux, Lumina 2 and SDXL tests export; whole-model algorithms are checked in
    test_comfyui_full_finetune.py."""
    assert {s.algorithm for s, _ in VARIANTS.values()} == set(adapters.ALGORITHMS) - adapters.WHOLE_MODEL


def test_comfyui_loads_every_key_of_each_algorithm_and_matches_the_engine(tmp_path: Path, real_width_with_lora):
    g = torch.Generator().manual_seed(1)
    x = flux_vae.scale_latents(torch.randn(1, 16, 8, 8, generator=g))
    text = {"t5": torch.randn(1, 8, 4096, generator=g), "pooled": torch.randn(1, 768, generator=g)}
    t, guidance = torch.tensor([0.6]), 3.5
    ours, base, files, paths = {}, None, None, []
    for name, (settings, std) in VARIANTS.items():
        folder = tmp_path / name
        files, model, adapter, path = real_width_with_lora(folder, alpha=settings.alpha, seed=2, settings=settings,
                                                           std=std)
        with torch.no_grad():
            ours[name] = flux.velocity(model, x, t, text, guidance)
            if base is None:
                with adapter.disabled():
                    base = flux.velocity(model, x, t, text, guidance)
        paths.append(path)
        del model, adapter
        gc.collect()
    inputs, out = tmp_path / "inputs.safetensors", tmp_path / "pred.safetensors"
    save_file({"x": x, "t": t, "context": text["t5"], "y": text["pooled"], "guidance": torch.tensor([guidance])},
              inputs)
    result = subprocess.run([PYTHON, str(HERE / "comfy_flux_predict.py"), COMFYUI_PATH, str(files["diffusion_model"]),
                             str(inputs), str(out), *map(str, paths)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"] == "Flux"
    theirs = load_file(out)
    for i, name in enumerate(VARIANTS):
        assert report["files"][i] == {"not_loaded": [], "errors": []}, name
        assert (ours[name] - base).abs().max() > 1e-3, name  # the adapter matters, so agreement means something
        error = ((theirs[f"pred_{i}"] - ours[name]).norm() / ours[name].norm()).item()
        print(f"{name}: relative difference {error:.1e}")
        assert error < 1e-3, name


class ConvNet(torch.nn.Module):
    """A 3x3 and a 1x1 convolution and a linear layer: every layer kind the LyCORIS algorithms adapt."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.point = torch.nn.Conv2d(12, 12, 1)
        self.proj = torch.nn.Linear(12, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.point(self.conv(x)).permute(0, 2, 3, 1))


CONV_VARIANTS = {
    "locon": AdapterConfig(algorithm="locon", rank=4, alpha=2.0),
    "locon_tucker": AdapterConfig(algorithm="locon", rank=4, alpha=2.0, tucker=True),
    "loha": AdapterConfig(algorithm="loha", rank=4, alpha=2.0),
    "loha_tucker": AdapterConfig(algorithm="loha", rank=4, alpha=2.0, tucker=True),
    "lokr": AdapterConfig(algorithm="lokr", rank=2, alpha=1.0, factor=2),
    "lokr_tucker": AdapterConfig(algorithm="lokr", rank=2, alpha=1.0, factor=2, tucker=True),
    "lokr_full_matrix": AdapterConfig(algorithm="lokr", factor=2, full_matrix=True),
    "dora": AdapterConfig(algorithm="dora", rank=4, alpha=2.0),
}


def test_comfyui_patches_convolutions_and_tucker_forms_as_the_engine_computes(tmp_path: Path):
    torch.manual_seed(0)
    plain = ConvNet().requires_grad_(False)
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, tmp_path / "base.safetensors")
    x = torch.randn(2, 8, 6, 6)
    ours, files = {}, []
    for name, settings in CONV_VARIANTS.items():
        net = copy.deepcopy(plain)
        adapter = adapters.attach({DENOISER: net}, {DENOISER: "conv|point|proj"}, settings, 0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key, p in net.named_parameters():
                if p.requires_grad:
                    noise = torch.randn(p.shape, generator=g)
                    p.copy_(p * (1 + 0.1 * noise) if key.endswith("dora_scale") else noise * 0.3)
            ours[name] = net(x)
        state = {f"{target.split('.', 1)[1]}.{suffix}": value for target, tensors in adapter.export().items()
                 for suffix, value in tensors.items()}
        files.append(tmp_path / f"{name}.safetensors")
        save_file(state, files[-1])
    out = tmp_path / "patched"
    result = subprocess.run([PYTHON, str(HERE / "comfy_patch_weights.py"), COMFYUI_PATH,
                             str(tmp_path / "base.safetensors"), str(out), *map(str, files)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    for i, name in enumerate(CONV_VARIANTS):
        assert reports[i]["not_loaded"] == [] and reports[i]["errors"] == [], (name, reports[i])
        assert sorted(reports[i]["patched"]) == ["conv.weight", "point.weight", "proj.weight"], name
        patched = copy.deepcopy(plain)
        patched.load_state_dict(load_file(out / f"{i}.safetensors"))
        with torch.no_grad():
            theirs = patched(x)
        error = ((theirs - ours[name]).norm() / ours[name].norm()).item()
        print(f"{name}: relative difference {error:.1e}")
        assert error < 1e-5, name
