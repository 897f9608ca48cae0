"""Host test: stock ComfyUI reads what the engine writes and reads for Lumina 2, and computes what the engine computes.

- The smallest real-width Lumina 2 (dim 2304, 2 + 2 refiners, 1 layer) in the native layout, with an all_linear
  adapter of each algorithm (variants.py) exported by the engine: ComfyUI detects Lumina2 (loaded once, each file
  applied alone), loads every key and patches every layer without error, and its velocity
  (x_t - apply_model) / sigma matches the engine's at t = 0.5. With the LoRA also at t = 0.05 ... 0.95, from an
  unpadded and from a padded caption with its mask, and a 3-step euler / simple / cfg 4 run of ComfyUI's sampler
  with the node pack's CONDITIONING lands where the engine's preview sampler lands. A flipped time or sign in the
  engine would be 1e-2 to 1 off at these t.
- ComfyUI's Lumina2 CLIP (the gemma file with its spiece_model, and an all-in-one checkpoint's) read through the
  family's ``comfy_text`` gives the engine's embeddings.

Runs when COMFYUI_PATH points at a ComfyUI checkout (COMFYUI_PYTHON: the interpreter of its environment,
default this one); skips otherwise. About 3 minutes on 2 CPU cores.
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
from loraloom.training.families import family, lumina2
from loraloom.training.families.base import DENOISER

sys.path.insert(0, str(Path(__file__).parent))
from variants import VARIANTS, randomize

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH not set: no ComfyUI checkout to test against")
LUMINA = family("lumina2")
REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("comfy_lumina2.py")
T = 0.5  # every algorithm's export is compared at this t
FULL = "lora"  # this one also at TS, from a padded caption too, and through ComfyUI's sampler
TS = [0.05, 0.3, 0.7, 0.95]


def run_in_comfyui(*args: str) -> dict:
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    result = subprocess.run([python, str(SCRIPT), args[0], COMFYUI_PATH, str(REPO), *args[1:]], capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.1e}" for v in values) + "]"


def test_comfyui_applies_every_key_of_each_algorithms_export_and_matches_the_engine(tmp_path):
    tiny = LUMINA.tiny(seed=1, real_width=True)
    files = LUMINA.write_tiny(tiny, tmp_path / "models", diffusers=False)
    text = LUMINA.encode_text(tiny.text, ["zwx, a red circle on a yellow background"])
    negative = LUMINA.encode_text(tiny.text, [""])
    del tiny
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 16, 16, 16, generator=g)
    steps, cfg, seed = 3, 4.0, 5
    ts = [T, *TS]

    def velocities(model: torch.nn.Module, times: list[float]) -> torch.Tensor:
        return torch.stack([lumina2.velocity(model, (1 - t) * x0 + t * noise, torch.tensor([t]), text)
                            for t in times])

    ours, paths, targets, base, sample = {}, [], [], None, None
    for name, (settings, std) in VARIANTS.items():
        model = lumina2.load_transformer(files["diffusion_model"], torch.float32)  # the file's bf16, as ComfyUI
        if base is None:
            with torch.no_grad():
                base = velocities(model, ts)
        adapter = adapters.attach({DENOISER: model}, {DENOISER: lumina2.TARGETS["all_linear"]}, settings, seed=0)
        randomize([model], std, seed=2)
        with torch.no_grad():
            ours[name] = velocities(model, ts if name == FULL else ts[:1])
            if name == FULL:
                sample = LUMINA.sample(model, text, (64, 64), (8, 8), seed, steps, cfg, negative)
        groups = adapter.export()
        paths.append(write_adapter(tmp_path / f"{name}.safetensors", groups, LUMINA, torch.float32, {}))
        targets.append(len(groups))
        del model, adapter
    sample_noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))  # the sampler's own draw
    inputs, out = tmp_path / "inputs.safetensors", tmp_path / "out.safetensors"
    save_file({"x0": x0, "noise": noise, "ts": torch.tensor(ts), "gemma": text["gemma"][0], "mask": text["mask"][0],
               "negative_gemma": negative["gemma"][0], "negative_mask": negative["mask"][0],
               "sample_noise": sample_noise, "steps": torch.tensor(steps), "cfg": torch.tensor(cfg),
               "full": torch.tensor(list(VARIANTS).index(FULL))}, inputs)
    report = run_in_comfyui("predict", str(files["diffusion_model"]), str(inputs), str(out), *map(str, paths))
    assert report["model"] == "Lumina2" and report["shift"] == lumina2.SHIFT
    theirs = load_file(out)
    for i, name in enumerate(VARIANTS):
        assert report["files"][i] == {"not_loaded": [], "errors": [], "patched": targets[i]}, name  # every layer
        errors = [relative(ours[name][j], theirs[f"v_{i}"][j]) for j in range(len(ours[name]))]
        effect = [relative(ours[name][j], base[j]) for j in range(len(ours[name]))]
        print(f"{name}: relative |engine - ComfyUI| at t {ts[:len(errors)]}: {fmt(errors)}; the adapter changes v by "
              f"{fmt(effect)}")
        assert max(errors) < 1e-3, name
        assert min(effect) > 1e-2, name  # the comparison sees the adapter
    padded = [relative(ours[FULL][j], theirs["v_padded"][j]) for j in range(len(ts))]
    sampled = relative(sample, theirs["sample"])
    print(f"{FULL}: padded caption {fmt(padded)}; sampled latents {sampled:.1e}")
    assert max(padded) < 1e-3 and sampled < 1e-3


def test_comfyuis_lumina2_clip_gives_the_engines_embeddings(tmp_path):
    from loraloom.training.families.lumina2_kit import TINY

    tiny = LUMINA.tiny(seed=4, words=("zwx",))
    files = LUMINA.write_tiny(tiny, tmp_path / "models", diffusers=False)
    captions = ["zwx, a red circle on a yellow background", "", "Ünïcode and (parentheses:1.3) read literally"]
    gemma = {"vocab_size": tiny.text.tokenizer.get_piece_size(), "hidden_size": TINY.gemma_width,
             "intermediate_size": TINY.gemma_ff, "num_hidden_layers": TINY.gemma_layers,
             "num_attention_heads": TINY.gemma_heads, "num_key_value_heads": TINY.gemma_kv_heads}
    spec = tmp_path / "encode.json"
    spec.write_text(json.dumps({"gemma": gemma, "captions": captions, "length": 48,
                                "system_prompt": lumina2.SYSTEM_PROMPTS["alignment"]}))
    out = tmp_path / "embeddings.safetensors"
    report = run_in_comfyui("encode", str(files["text_encoder"]), str(files["checkpoint"]), str(spec), str(out))
    assert report["warnings"] == [], report["warnings"]
    theirs = load_file(out)
    model = config_from_dict({"model": {"family": "lumina2", "text_encoder": str(files["text_encoder"]),
                                        "text_length": 48, "system_prompt": lumina2.SYSTEM_PROMPTS["alignment"]}})
    encoder = LUMINA.load_text_encoder(model.model, torch.float32)
    for i, caption in enumerate(captions):
        ours = LUMINA.encode_text(encoder, [caption])
        for source in ("file", "checkpoint"):
            assert torch.equal(theirs[f"{source}.{i}.mask"], ours["mask"][0]), (caption, source)
            error = relative(theirs[f"{source}.{i}.gemma"], ours["gemma"][0])
            print(f"{caption!r} from the {source}: relative difference {error:.1e}")
            assert error < 1e-5
