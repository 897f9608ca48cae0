"""Run inside a ComfyUI environment: load an SDXL checkpoint and a UNet + text-encoder LoRA with ComfyUI's own code,
encode prompts, predict, sample; report.

Usage: python comfy_sdxl_predict.py SPEC.json. SPEC keys: comfy (ComfyUI root), checkpoint, unet_file (the UNet
alone), clip_layers (CLIP-L and CLIP-G depth of the file, passed as te_model_options), lora, inputs (safetensors: x,
t, context, pooled for the UNet), engine_text (the engine's embeddings of the first prompt), prompts, size
(ComfyUI's width/height/crop_w/crop_h/target_width/target_height), windows (caption windows the engine keeps), out
(folder). Prints one JSON line; writes OUT/tensors.safetensors.

With the LoRA loaded as a sampler loads it (``load_models_gpu`` on the patched clones: a bare ``patch_model()`` on a
clone skips modules an earlier load marked patched), it returns the UNet's raw output, each prompt's
CONDITIONING from CLIPTextEncode's path, the same prompts through LoRA Loom's ``comfy_text`` on ComfyUI's CLIP
object, two sampler runs (one on CLIPTextEncode's conditioning, one on LoRA Loom's ``comfy_conditioning``), and
the UNet file loaded as UNETLoader loads it, with the LoRA's UNet part.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, spec["comfy"])
    sys.path.insert(0, str(Path(__file__).parent))
    from comfy_flux_predict import stub_torchvision_if_missing

    stub_torchvision_if_missing()
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    from loraloom.training.families import family

    sdxl = family("sdxl")
    capture = Capture()
    logging.getLogger().addHandler(capture)
    logging.getLogger().setLevel(logging.DEBUG)
    layers = spec["clip_layers"]
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        spec["checkpoint"], output_vae=False, output_clip=True, model_options={"dtype": torch.float32},
        te_model_options={"clip_l_model_config": {"num_hidden_layers": layers},
                          "clip_g_model_config": {"num_hidden_layers": layers}, "dtype": torch.float32})
    detected = {"config": type(model.model.model_config).__name__, "base": type(model.model).__name__,
                "type": model.model.model_type.name}
    capture.messages.clear()
    lora = comfy.utils.load_torch_file(spec["lora"], safe_load=True)
    model_l, clip_l = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    not_loaded = [m for m in capture.messages if "lora key not loaded" in m or "NOT LOADED" in m]
    mm.load_models_gpu([model_l], force_full_load=True)
    mm.load_models_gpu([clip_l.patcher], force_full_load=True)

    x = load_file(spec["inputs"])
    base = model_l.model
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        adm = base.encode_adm(pooled_output=x["pooled"], **spec["size"])
        out["unet"] = base.diffusion_model(x["x"], timesteps=x["t"], context=x["context"], y=adm)
        for i, prompt in enumerate(spec["prompts"]):
            cond, pooled = clip_l.encode_from_tokens(clip_l.tokenize(prompt), return_pooled=True)
            out[f"cond_{i}"], out[f"pooled_{i}"] = cond, pooled
            ours = sdxl.comfy_text(clip_l, prompt, 77 * spec["windows"])
            out.update({f"comfy_text_{i}_{k}": v for k, v in ours.items()})
        # One prompt sampled on CLIPTextEncode's conditioning and on comfy_conditioning of the engine's embeddings.
        text = {k: v[0] for k, v in load_file(spec["engine_text"]).items()}
        latent = torch.zeros(1, 4, 8, 8)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
        theirs = [[out["cond_0"], {"pooled_output": out["pooled_0"]}]]
        for name, positive in (("sample_comfy", theirs), ("sample_ours", sdxl.comfy_conditioning(text, 1.0))):
            out[name] = comfy.sample.sample(model_l, noise, 3, 1.0, "euler", "normal", positive, positive, latent)
        # The UNet alone, as UNETLoader reads a models/diffusion_models file, with the LoRA's UNet part.
        unet = comfy.sd.load_diffusion_model(spec["unet_file"], model_options={"dtype": torch.float32})
        capture.messages.clear()
        unet_l, _ = comfy.sd.load_lora_for_models(unet, None, lora, 1.0, 0.0)
        unet_not_loaded = [m for m in capture.messages if "lora key not loaded" in m and "lora_unet_" in m]
        mm.load_models_gpu([unet_l], force_full_load=True)
        out["unet_file"] = unet_l.model.diffusion_model(x["x"], timesteps=x["t"], context=x["context"], y=adm)
    save_file({k: v.float().contiguous() for k, v in out.items()}, f"{spec['out']}/tensors.safetensors")
    print(json.dumps({"not_loaded": not_loaded, "unet_file_not_loaded": unet_not_loaded, "lora_keys": len(lora),
                      "unet_file_config": type(unet.model.model_config).__name__, **detected}))


if __name__ == "__main__":
    main()
