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

from loraloom.loaders.files import atomic_save_safetensors
from loraloom.training import adapters
from loraloom.training.export import lora_file_state
from loraloom.training.families import flux
from loraloom.training.tiny_models import REAL_WIDTH, build_flux, write_flux_files

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH not set: no ComfyUI checkout to test against")


@pytest.mark.parametrize("targets", ["all_linear"])
def test_comfyui_loads_every_key_and_matches_the_engine(tmp_path: Path, targets: str):
    parts = build_flux(REAL_WIDTH, seed=2)
    files = write_flux_files(parts, tmp_path / "models", diffusers=False)
    del parts
    model = flux.load_transformer(files["transformer"], torch.float32, fp8_storage=False)
    adapters.add_lora(model, flux.LORA_TARGETS[targets], rank=4, alpha=8.0, dropout=0.0, seed=0)
    with torch.no_grad():  # a trained adapter: non-zero B as well as A
        g = torch.Generator().manual_seed(0)
        for p in adapters.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    lora_path = tmp_path / "lora.safetensors"
    atomic_save_safetensors(lora_file_state(adapters.adapter_state(model), flux.EXPORT_PREFIX, 8.0, torch.float32),
                            lora_path)
    g = torch.Generator().manual_seed(1)
    x = flux.scale_latents(torch.randn(1, 16, 8, 8, generator=g))
    text = {"t5": torch.randn(1, 8, 4096, generator=g), "pooled": torch.randn(1, 768, generator=g)}
    t, guidance = torch.tensor([0.6]), 3.5
    with torch.no_grad():
        ours = flux.predict(model, x, t, text, guidance)
        with adapters.adapter_disabled(model):
            base = flux.predict(model, x, t, text, guidance)
    del model
    inputs, out = tmp_path / "inputs.safetensors", tmp_path / "pred.safetensors"
    save_file({"x": x, "t": t, "context": text["t5"], "y": text["pooled"], "guidance": torch.tensor([guidance])},
              inputs)
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    script = Path(__file__).with_name("comfy_flux_predict.py")
    result = subprocess.run([python, str(script), COMFYUI_PATH, str(files["transformer"]), str(lora_path),
                             str(inputs), str(out)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"] == "Flux"
    assert report["not_loaded"] == []
    theirs = load_file(out)["pred"]
    assert (ours - base).abs().max() > 1e-3
    assert ((theirs - ours).norm() / ours.norm()).item() < 1e-4
