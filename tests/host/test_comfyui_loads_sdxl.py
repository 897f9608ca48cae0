"""Host test: stock ComfyUI loads every key of each algorithm's SDXL export (variants.py; every linear layer and the
resnets' and samplers' convolutions where the algorithm adapts them) and its UNet computes what the engine computes;
with a UNet + text-encoder LoRA its text encoders and samplers do too.

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
from loraloom.training.config import config_from_dict
from loraloom.training.export import write_adapter
from loraloom.training.families import family, sdxl
from loraloom.training.families.base import DENOISER, Geometry

sys.path.insert(0, str(Path(__file__).parent))
from variants import VARIANTS, randomize

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH not set: no ComfyUI checkout to test against")
REPO = Path(__file__).resolve().parents[2]
SDXL = family("sdxl")
PROMPTS = ["1girl, hatsune miku, vocaloid, smile, masterpiece, newest, safe",
           ", ".join(f"tag{i} scenery" for i in range(30))]  # two windows
SIZE = Geometry(original=(832, 1216), crop=(32, 64), target=(768, 1024))  # (w, h), (left, top), (w, h)
FULL = "lora"  # the variant exported with a text-encoder LoRA, and checked through ComfyUI's CLIP and samplers


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_comfyui_loads_every_key_of_each_algorithms_export_and_matches_the_engine(tmp_path: Path):
    files = SDXL.write_tiny(SDXL.tiny(seed=1, real_width=True), tmp_path / "models", diffusers=False)
    checkpoint = files["checkpoint"]
    model = config_from_dict({"model": {
        "family": "sdxl", "diffusion_model": str(checkpoint), "text_encoder": str(checkpoint),
        "text_encoder_2": str(checkpoint), "vae": str(checkpoint), "text_length": 154,
        "tokenizer": str(Path(COMFYUI_PATH) / "comfy" / "sd1_tokenizer")}}).model
    text = SDXL.load_text_encoder(model, torch.float32)
    encoders = SDXL.text_encoder_modules(text)
    settings, std = VARIANTS[FULL]
    text_adapter = adapters.attach(encoders, SDXL.text_targets, settings, seed=0)
    randomize(encoders.values(), std, seed=1)
    with torch.no_grad():
        engine_text = SDXL.encode_text(text, PROMPTS)
        with text_adapter.disabled():
            base_text = SDXL.encode_text(text, PROMPTS[:1])
    assert relative(engine_text["context"][:1], base_text["context"]) > 1e-3
    condition = {"context": engine_text["context"][:1], "windows": engine_text["windows"][:1],
                 "pooled": engine_text["pooled"][:1]}
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([599 / 999])
    ours, paths, targets, base = {}, [], [], None
    for name, (settings, std) in VARIANTS.items():
        unet = SDXL.load_denoiser(model, torch.float32, keep_float8=False)
        if base is None:
            with torch.no_grad():
                base = SDXL.predict(unet, x, t, condition, [SIZE], 1.0)
        adapter = adapters.attach({DENOISER: unet}, {DENOISER: sdxl.TARGETS["all_linear_conv"]}, settings, seed=0)
        randomize([unet], std, seed=2)
        with torch.no_grad():
            ours[name] = SDXL.predict(unet, x, t, condition, [SIZE], 1.0)
        groups = adapter.export()
        if name == FULL:  # with the text encoders' LoRA, which ComfyUI's CLIP reads
            groups |= text_adapter.export()
        paths.append(write_adapter(tmp_path / f"{name}.safetensors", groups, SDXL, torch.float32, {}))
        targets.append(len(groups))
        del unet, adapter
    del text, encoders, text_adapter
    assert any(k.startswith("lora_te2_") for k in load_file(paths[list(VARIANTS).index(FULL)]))
    inputs, engine_file = tmp_path / "inputs.safetensors", tmp_path / "engine_text.safetensors"
    save_file({"x": x, "t": torch.tensor([599.0]), "context": condition["context"][:, :77].contiguous(),
               "pooled": condition["pooled"]}, inputs)
    save_file({k: v[:1].contiguous() for k, v in engine_text.items()}, engine_file)
    spec = {"comfy": COMFYUI_PATH, "checkpoint": str(checkpoint), "unet_file": str(files["diffusion_model"]),
            "clip_layers": 3, "adapters": list(map(str, paths)), "full": list(VARIANTS).index(FULL),
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
    theirs = load_file(tmp_path / "tensors.safetensors")
    for i, name in enumerate(VARIANTS):
        assert report["files"][i] == {"not_loaded": [], "errors": [], "patched": targets[i]}, name  # every layer
        error, effect = relative(theirs[f"unet_{i}"], ours[name]), relative(ours[name], base)
        print(f"{name}: relative |engine - ComfyUI| {error:.1e}; the adapter changes the UNet's output by {effect:.1e}")
        assert error < 1e-3, name
        assert effect > 1e-2, name  # the comparison sees the adapter
    assert report["unet_file_not_loaded"] == [] and report["unet_file_config"] == "Segmind_Vega"
    print(f"{FULL}: {report['lora_keys']} tensors; relative error: UNet file "
          f"{relative(theirs['unet_file'], ours[FULL]):.1e}, context "
          f"{relative(theirs['cond_0'][0], engine_text['context'][0, :77]):.1e}, pooled "
          f"{relative(theirs['pooled_0'][0], engine_text['pooled'][0]):.1e}, samples "
          f"{relative(theirs['sample_ours'], theirs['sample_comfy']):.1e}")
    assert relative(theirs["unet_file"], ours[FULL]) < 1e-3
    for i in range(len(PROMPTS)):
        n = int(engine_text["windows"][i])
        assert theirs[f"cond_{i}"].shape == (1, 77 * n, 2048)
        assert relative(theirs[f"cond_{i}"][0], engine_text["context"][i, :77 * n]) < 1e-3
        assert relative(theirs[f"pooled_{i}"][0], engine_text["pooled"][i]) < 1e-3
        for key in ("context", "windows", "pooled"):  # comfy_text: ComfyUI's CLIP as the engine's encoder
            assert relative(theirs[f"comfy_text_{i}_{key}"], engine_text[key][i]) < 1e-3, key
    # comfy_conditioning of the engine's embeddings samples as CLIPTextEncode's conditioning does.
    assert relative(theirs["sample_ours"], theirs["sample_comfy"]) < 1e-3
