"""Host test: stock ComfyUI loads an SDXL UNet + text-encoder LoRA exported by the engine (every key), and its
UNet, text encoders and samplers then compute what the engine computes.

The model is the family's real-width kit (the smallest UNet ComfyUI detects as SDXL-family, real-width 3-layer
CLIPs, the SDXL VAE) written as an all-in-one checkpoint; ComfyUI loads it in-process with the CLIPs' depth passed
through ``te_model_options``. Runs when COMFYUI_PATH points at a ComfyUI checkout (COMFYUI_PYTHON: the interpreter
of its environment); skips otherwise.
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
from loraloom.training.config import AdapterConfig, config_from_dict
from loraloom.training.export import write_adapter
from loraloom.training.families import family, sdxl
from loraloom.training.families.base import DENOISER, Geometry

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH not set: no ComfyUI checkout to test against")
REPO = Path(__file__).resolve().parents[2]
SDXL = family("sdxl")
PROMPTS = ["1girl, hatsune miku, vocaloid, smile, masterpiece, newest, safe",
           ", ".join(f"tag{i} scenery" for i in range(30))]  # two windows
SIZE = Geometry(original=(832, 1216), crop=(32, 64), target=(768, 1024))  # (w, h), (left, top), (w, h)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_comfyui_loads_every_key_of_a_unet_and_text_encoder_lora_and_matches_the_engine(tmp_path: Path):
    files = SDXL.write_tiny(SDXL.tiny(seed=1, real_width=True), tmp_path / "models", diffusers=False)
    checkpoint = files["checkpoint"]
    model = config_from_dict({"model": {
        "family": "sdxl", "diffusion_model": str(checkpoint), "text_encoder": str(checkpoint),
        "text_encoder_2": str(checkpoint), "vae": str(checkpoint), "text_length": 154,
        "tokenizer": str(Path(COMFYUI_PATH) / "comfy" / "sd1_tokenizer")}}).model
    unet = SDXL.load_denoiser(model, torch.float32, keep_float8=False)
    text = SDXL.load_text_encoder(model, torch.float32)
    encoders = SDXL.text_encoder_modules(text)
    adapter = adapters.attach({DENOISER: unet, **encoders},
                              {DENOISER: sdxl.TARGETS["all_linear"], **SDXL.text_targets},
                              AdapterConfig(rank=4, alpha=2.0), seed=0)
    with torch.no_grad():  # A and B both random, as after training
        g = torch.Generator().manual_seed(2)
        for params in adapter.parameters().values():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora = write_adapter(tmp_path / "lora.safetensors", adapter.export(), SDXL, torch.float32, {})
    assert any(k.startswith("lora_te2_") for k in load_file(lora))

    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([599 / 999])
    with torch.no_grad():
        engine_text = SDXL.encode_text(text, PROMPTS)
        condition = {"context": engine_text["context"][:1], "windows": engine_text["windows"][:1],
                     "pooled": engine_text["pooled"][:1]}
        ours = SDXL.predict(unet, x, t, condition, [SIZE], 1.0)
        with adapter.disabled():
            base = SDXL.predict(unet, x, t, condition, [SIZE], 1.0)
            base_text = SDXL.encode_text(text, PROMPTS[:1])
    assert relative(ours, base) > 1e-2 and relative(engine_text["context"][:1], base_text["context"]) > 1e-3
    del unet, text, encoders, adapter
    inputs, engine_file = tmp_path / "inputs.safetensors", tmp_path / "engine_text.safetensors"
    save_file({"x": x, "t": torch.tensor([599.0]), "context": condition["context"][:, :77].contiguous(),
               "pooled": condition["pooled"]}, inputs)
    save_file({k: v[:1].contiguous() for k, v in engine_text.items()}, engine_file)
    spec = {"comfy": COMFYUI_PATH, "checkpoint": str(checkpoint), "unet_file": str(files["diffusion_model"]),
            "clip_layers": 3, "lora": str(lora),
            "inputs": str(inputs), "engine_text": str(engine_file), "prompts": PROMPTS, "windows": 2,
            "out": str(tmp_path),
            "size": {"width": 832, "height": 1216, "crop_w": 32, "crop_h": 64, "target_width": 768,
                     "target_height": 1024}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    result = subprocess.run([python, str(Path(__file__).with_name("comfy_sdxl_predict.py")),
                             str(tmp_path / "spec.json")], capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["config"], report["base"], report["type"]) == ("Segmind_Vega", "SDXL", "EPS")
    assert report["not_loaded"] == [] and report["unet_file_not_loaded"] == []
    assert report["unet_file_config"] == "Segmind_Vega"
    theirs = load_file(tmp_path / "tensors.safetensors")
    print(f"{report['lora_keys']} LoRA tensors; relative error: unet {relative(theirs['unet'], ours):.2e}, context "
          f"{relative(theirs['cond_0'][0], engine_text['context'][0, :77]):.2e}, pooled "
          f"{relative(theirs['pooled_0'][0], engine_text['pooled'][0]):.2e}, samples "
          f"{relative(theirs['sample_ours'], theirs['sample_comfy']):.2e}")
    assert relative(theirs["unet"], ours) < 1e-3 and relative(theirs["unet_file"], ours) < 1e-3
    for i in range(len(PROMPTS)):
        n = int(engine_text["windows"][i])
        assert theirs[f"cond_{i}"].shape == (1, 77 * n, 2048)
        assert relative(theirs[f"cond_{i}"][0], engine_text["context"][i, :77 * n]) < 1e-3
        assert relative(theirs[f"pooled_{i}"][0], engine_text["pooled"][i]) < 1e-3
        for key in ("context", "windows", "pooled"):  # comfy_text: ComfyUI's CLIP as the engine's encoder
            assert relative(theirs[f"comfy_text_{i}_{key}"], engine_text[key][i]) < 1e-3, key
    # comfy_conditioning of the engine's embeddings samples as CLIPTextEncode's conditioning does.
    assert relative(theirs["sample_ours"], theirs["sample_comfy"]) < 1e-3
