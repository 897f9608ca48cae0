"""Host test: stock ComfyUI loads a full fine-tune of a real-width Flux both ways and predicts what the engine does.

The model file through UNETLoader's loader (``comfy.sd.load_diffusion_model``), the diff patch on the base through
the LoraLoader's (every key loads, the fused qkv biases included). Runs when COMFYUI_PATH points at a ComfyUI
checkout (COMFYUI_PYTHON: the interpreter of its environment, default this one); skips otherwise.
"""

from __future__ import annotations

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
from loraloom.training.export import COMFY_MODEL_PREFIX, write_exports
from loraloom.training.families import family, flux, flux_vae
from loraloom.training.families.base import DENOISER

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH not set: no ComfyUI checkout to test against")
FLUX = family("flux")


def _comfy_predict(base: Path, patch: str, inputs: Path, out: Path) -> tuple[dict, torch.Tensor]:
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    script = Path(__file__).with_name("comfy_flux_predict.py")
    result = subprocess.run([python, str(script), COMFYUI_PATH, str(base), str(inputs), str(out), patch],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {**report["files"][0], "model": report["model"]}, load_file(out)["pred_0"]


def test_comfyui_loads_the_fine_tuned_model_file_and_its_patch_and_matches_the_engine(tmp_path: Path):
    files = FLUX.write_tiny(FLUX.tiny(seed=4, real_width=True), tmp_path / "models", diffusers=False)
    model = flux.load_transformer(files["diffusion_model"], torch.float32)
    adapter = adapters.attach({DENOISER: model}, {DENOISER: flux.TARGETS["all_linear"]},
                              AdapterConfig(algorithm="full"), seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as after training: every trained weight and bias moved
        for p in adapter.parameters()[DENOISER]:
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    patch, model_file = write_exports(tmp_path / "ft.safetensors", adapter, model, FLUX, torch.float32, {})
    x = flux_vae.scale_latents(torch.randn(1, 16, 8, 8, generator=g))
    text = {"t5": torch.randn(1, 8, 4096, generator=g), "pooled": torch.randn(1, 768, generator=g)}
    t, guidance = torch.tensor([0.6]), 3.5
    with torch.no_grad():
        ours = flux.velocity(model, x, t, text, guidance)
        with adapter.disabled():
            base = flux.velocity(model, x, t, text, guidance)
    del model, adapter
    inputs = tmp_path / "inputs.safetensors"
    save_file({"x": x, "t": t, "context": text["t5"], "y": text["pooled"], "guidance": torch.tensor([guidance])},
              inputs)
    assert ((ours - base).norm() / ours.norm()).item() > 1e-2

    report, theirs = _comfy_predict(model_file, "-", inputs, tmp_path / "model-pred.safetensors")
    assert report["model"] == "Flux"
    assert ((theirs - ours).norm() / ours.norm()).item() < 1e-3

    keys = load_file(patch).keys()
    assert f"{COMFY_MODEL_PREFIX}double_blocks.0.img_attn.qkv.diff_b" in keys  # a fused bias: native names load it
    report, theirs = _comfy_predict(files["diffusion_model"], str(patch), inputs, tmp_path / "patch-pred.safetensors")
    assert report["not_loaded"] == []
    assert ((theirs - ours).norm() / ours.norm()).item() < 1e-3
