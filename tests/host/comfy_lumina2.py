"""Run inside a ComfyUI environment: Lumina 2 through ComfyUI's own loaders, model and sampler, for the host test.

Usage:
  python comfy_lumina2.py predict COMFYUI_PATH REPO BASE.safetensors LORA.safetensors INPUTS.safetensors OUT
  python comfy_lumina2.py encode COMFYUI_PATH REPO GEMMA.safetensors CHECKPOINT.safetensors INPUTS.json OUT

predict: the native file and the exported LoRA loaded as LoraLoaderModelOnly does; ComfyUI's velocity
(x_t - apply_model) / sigma at each t, unpadded and padded with a mask; a KSampler-equivalent run (euler, simple,
cfg) on the LoRA'd model with the CONDITIONING the node pack makes (``Family.comfy_conditioning``).
encode: ComfyUI's Lumina2 CLIP (CLIPLoader type lumina2, and a checkpoint's) at the tiny widths given through
``model_options["gemma2_2b_model_config"]``, read by the node pack's ``Family.comfy_text``.
Prints one JSON line: the LoRA keys ComfyUI did not load, the model class, warnings.
"""

from __future__ import annotations

import json
import logging
import sys


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def predict(base: str, lora_path: str, inputs: str, out: str, capture: Capture) -> dict:
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    from loraloom.training.families import family

    lumina = family("lumina2")
    x = load_file(inputs)
    patcher = comfy.sd.load_diffusion_model(base, model_options={"dtype": torch.float32})
    lora = comfy.utils.load_torch_file(lora_path, safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    mm.load_models_gpu([patched])
    model = patched.model

    def velocities(cap: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        extra = {"num_tokens": int(mask.sum())}
        if not mask.all():  # as Lumina2.extra_conds passes it: only with padding
            extra["attention_mask"] = mask
        found = []
        for t in x["ts"].tolist():
            x_t = (1 - t) * x["x0"] + t * x["noise"]
            with torch.no_grad():
                denoised = model.apply_model(x_t, torch.tensor([t]), c_crossattn=cap, **extra)
            found.append((x_t - denoised) / t)
        return torch.stack(found)

    n = int(x["mask"].sum())
    results = {"v": velocities(x["gemma"][None, :n], x["mask"][None, :n].long()),
               "v_padded": velocities(x["gemma"][None], x["mask"][None].long())}
    positive = lumina.comfy_conditioning({"gemma": x["gemma"], "mask": x["mask"]}, 1.0)
    negative = lumina.comfy_conditioning({"gemma": x["negative_gemma"], "mask": x["negative_mask"]}, 1.0)
    steps, cfg = int(x["steps"]), float(x["cfg"])
    results["sample"] = comfy.sample.sample(patched, x["sample_noise"], steps, cfg, "euler", "simple", positive,
                                            negative, torch.zeros_like(x["sample_noise"]), seed=0)
    save_file({k: v.contiguous() for k, v in results.items()}, out)
    not_loaded = [m for m in capture.messages if "lora key not loaded" in m or "NOT LOADED" in m]
    return {"not_loaded": not_loaded, "model": type(model).__name__, "shift": float(model.model_sampling.shift),
            "patched": len(patched.patches)}


def encode(gemma: str, checkpoint: str, inputs: str, out: str, capture: Capture) -> dict:
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file

    from loraloom.training.families import family

    lumina = family("lumina2")
    with open(inputs) as f:
        spec = json.load(f)
    options = {"gemma2_2b_model_config": spec["gemma"]}
    clip = comfy.sd.load_clip([gemma], clip_type=comfy.sd.CLIPType.LUMINA2, model_options=options)
    _, bundled, _, _ = comfy.sd.load_state_dict_guess_config(
        comfy.utils.load_torch_file(checkpoint, safe_load=True), output_vae=False, output_clip=True,
        output_model=False, te_model_options=options)
    results = {}
    for i, caption in enumerate(spec["captions"]):
        for name, source in (("file", clip), ("checkpoint", bundled)):
            text = lumina.comfy_text(source, caption, spec["length"], spec["system_prompt"])
            results.update({f"{name}.{i}.{k}": v for k, v in text.items()})
    save_file({k: v.contiguous() for k, v in results.items()}, out)
    return {"class": type(clip.cond_stage_model).__name__, "warnings": capture.messages}


def main() -> None:
    mode, comfy_path, repo, *paths = sys.argv[1:]
    sys.argv = ["main.py", "--cpu"]
    sys.path[:0] = [comfy_path, repo]
    import comfy.options

    comfy.options.enable_args_parsing()
    capture = Capture()
    logging.getLogger().addHandler(capture)
    report = {"predict": predict, "encode": encode}[mode](*paths, capture)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
