"""Host test: stock ComfyUI loads the exported Flux LoRA (every key) and predicts what the engine predicts.

Runs when COMFYUI_PATH points at a ComfyUI checkout (COMFYUI_PYTHON: the interpreter of its environment,
default this one); skips otherwise.
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

from loraloom.training.families import flux

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH not set: no ComfyUI checkout to test against")


def test_comfyui_loads_every_key_and_matches_the_engine(tmp_path: Path, real_width_with_lora):
    files, model, adapter, lora_path = real_width_with_lora(tmp_path, alpha=8.0, seed=2)
    g = torch.Generator().manual_seed(1)
    x = flux.scale_latents(torch.randn(1, 16, 8, 8, generator=g))
    text = {"t5": torch.randn(1, 8, 4096, generator=g), "pooled": torch.randn(1, 768, generator=g)}
    t, guidance = torch.tensor([0.6]), 3.5
    with torch.no_grad():
        ours = flux.velocity(model, x, t, text, guidance)
        with adapter.disabled():
            base = flux.velocity(model, x, t, text, guidance)
    del model
    inputs, out = tmp_path / "inputs.safetensors", tmp_path / "pred.safetensors"
    save_file({"x": x, "t": t, "context": text["t5"], "y": text["pooled"], "guidance": torch.tensor([guidance])},
              inputs)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    script = Path(__file__).with_name("comfy_flux_predict.py")
    result = subprocess.run([python, str(script), COMFYUI_PATH, str(files["diffusion_model"]), str(lora_path),
                             str(inputs), str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"] == "Flux"
    assert report["not_loaded"] == []
    theirs = load_file(out)["pred"]
    assert (ours - base).abs().max() > 1e-3
    assert ((theirs - ours).norm() / ours.norm()).item() < 1e-4
