"""Run inside a ComfyUI environment: load an SDXL checkpoint and adapter files with ComfyUI's own code, predict with
each, and with a UNet + text-encoder LoRA encode prompts and sample; report.

Usage: python comfy_sdxl_predict.py SPEC.json. SPEC keys: comfy (ComfyUI root), checkpoint, unet_file (the UNet
alone), clip_layers (CLIP-L and CLIP-G depth of the file, passed as te_model_options), adapters (files), full (the
index in adapters of the UNet + text-encoder LoRA), inputs (safetensors: x, t, context, pooled for the UNet),
engine_text (the engine's embeddings of the first prompt), prompts, size (ComfyUI's width/height/crop_w/crop_h/
target_width/target_height), windows (caption windows the engine keeps), out (folder). Prints one JSON line;
writes OUT/tensors.safetensors.

The checkpoint is loaded once and each adapter file applied alone, as a sampler loads it (``load_models_gpu`` on
the patched clones: a bare ``patch_model()`` on a clone skips modules an earlier load marked patched); it returns
the UNet's raw output with each (``unet_<i>``) and what ComfyUI logged. With the LoRA (``full``) also each
prompt's CONDITIONING from CLIPTextEncode's path, the same prompts through LoRA Loom's ``comfy_text`` on ComfyUI's
CLIP object, two sampler runs (one on CLIPTextEncode's conditioning, one on LoRA Loom's ``comfy_conditioning``),
and the UNet file loaded as UNETLoader loads it, with the LoRA's UNet part.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING

from comfy_flux_predict import stub_torchvision_if_missing  # beside this script
from comfy_report import Capture

if TYPE_CHECKING:
    import torch
    from comfy.model_patcher import ModelPatcher
    from comfy.sd import CLIP


def text_and_samples(spec: dict, model: ModelPatcher, clip: CLIP) -> dict[str, torch.Tensor]:
    """With the LoRA's clones of the model and CLIP loaded: each prompt through CLIPTextEncode's path and through
    ``comfy_text``, and one prompt sampled on CLIPTextEncode's conditioning and on ``comfy_conditioning`` of the
    engine's embeddings."""
    import comfy.sample
    import torch
    from safetensors.torch import load_file

    from loraloom.training.families import family

    sdxl = family("sdxl")
    out = {}
    for i, prompt in enumerate(spec["prompts"]):
        out[f"cond_{i}"], out[f"pooled_{i}"] = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        out.update({f"comfy_text_{i}_{k}": v for k, v in sdxl.comfy_text(clip, prompt, 77 * spec["windows"]).items()})
    text = {k: v[0] for k, v in load_file(spec["engine_text"]).items()}
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    theirs = [[out["cond_0"], {"pooled_output": out["pooled_0"]}]]
    for name, positive in (("sample_comfy", theirs), ("sample_ours", sdxl.comfy_conditioning(text, 1.0))):
        out[name] = comfy.sample.sample(model, noise, 3, 1.0, "euler", "normal", positive, positive, latent)
    return out


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, spec["comfy"])
    stub_torchvision_if_missing()
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    capture = Capture()
    logging.getLogger().addHandler(capture)
    layers = spec["clip_layers"]
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        spec["checkpoint"], output_vae=False, output_clip=True, model_options={"dtype": torch.float32},
        te_model_options={"clip_l_model_config": {"num_hidden_layers": layers},
                          "clip_g_model_config": {"num_hidden_layers": layers}, "dtype": torch.float32})
    detected = {"config": type(model.model.model_config).__name__, "base": type(model.model).__name__,
                "type": model.model.model_type.name}
    x = load_file(spec["inputs"])
    out: dict[str, torch.Tensor] = {}
    reports = []
    with torch.no_grad():
        adm = model.model.encode_adm(pooled_output=x["pooled"], **spec["size"])
        for i, path in enumerate(spec["adapters"]):
            full = i == spec["full"]
            capture.messages.clear()
            adapter = comfy.utils.load_torch_file(path, safe_load=True)
            model_l, clip_l = comfy.sd.load_lora_for_models(model, clip if full else None, adapter, 1.0, 1.0)
            mm.load_models_gpu([model_l], force_full_load=True)
            out[f"unet_{i}"] = model_l.model.diffusion_model(x["x"], timesteps=x["t"], context=x["context"], y=adm)
            patched = len(model_l.patches)
            if full:
                mm.load_models_gpu([clip_l.patcher], force_full_load=True)
                patched += len(clip_l.patcher.patches)
                out.update(text_and_samples(spec, model_l, clip_l))
            reports.append({**capture.adapter_report(), "patched": patched})
            mm.unload_all_models()  # restores the base weights for the next file
        # The UNet alone, as UNETLoader reads a models/diffusion_models file, with the LoRA's UNet part.
        unet = comfy.sd.load_diffusion_model(spec["unet_file"], model_options={"dtype": torch.float32})
        lora = comfy.utils.load_torch_file(spec["adapters"][spec["full"]], safe_load=True)
        capture.messages.clear()
        unet_l, _ = comfy.sd.load_lora_for_models(unet, None, lora, 1.0, 0.0)
        unet_not_loaded = [m for m in capture.adapter_report()["not_loaded"] if "lora_unet_" in m]
        mm.load_models_gpu([unet_l], force_full_load=True)
        out["unet_file"] = unet_l.model.diffusion_model(x["x"], timesteps=x["t"], context=x["context"], y=adm)
    save_file({k: v.float().contiguous() for k, v in out.items()}, f"{spec['out']}/tensors.safetensors")
    print(json.dumps({"files": reports, "unet_file_not_loaded": unet_not_loaded, "lora_keys": len(lora),
                      "unet_file_config": type(unet.model.model_config).__name__, **detected}))


if __name__ == "__main__":
    main()
