"""Run inside a ComfyUI environment: Lumina 2 through ComfyUI's own loaders, model and sampler, for the host test.

Usage:
  python comfy_lumina2.py predict COMFYUI_PATH REPO BASE.safetensors INPUTS.safetensors OUT ADAPTER.safetensors...
  python comfy_lumina2.py encode COMFYUI_PATH REPO GEMMA.safetensors CHECKPOINT.safetensors INPUTS.json OUT

predict: the native file loaded once, each adapter file applied alone to it as LoraLoaderModelOnly does; ComfyUI's
velocity (x_t - apply_model) / sigma with each file (``v_<i>``) at INPUTS' first t, with the file INPUTS' ``full``
indexes at every t of INPUTS, unpadded and padded with a mask (``v_padded``), and a KSampler-equivalent run
(euler, simple, cfg) with the CONDITIONING the node pack makes (``Family.comfy_conditioning``). Prints one JSON
line: per file, the keys ComfyUI did not load, the errors it logged applying the rest and the number of weights
it patched; the model class and its shift.
encode: ComfyUI's Lumina2 CLIP (CLIPLoader type lumina2, and a checkpoint's) at the tiny widths given through
``model_options["gemma2_2b_model_config"]``, read by the node pack's ``Family.comfy_text``. Prints one JSON line:
the CLIP class and the warnings logged.
"""

from __future__ import annotations

import json
import logging
import sys

from comfy_report import Capture  # beside this script


def predict(capture: Capture, base: str, inputs: str, out: str, *adapters: str) -> dict:
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

    def velocities(model: torch.nn.Module, cap: torch.Tensor, mask: torch.Tensor, ts: list[float]) -> torch.Tensor:
        extra = {"num_tokens": int(mask.sum())}
        if not mask.all():  # as Lumina2.extra_conds passes it: only with padding
            extra["attention_mask"] = mask
        found = []
        for t in ts:
            x_t = (1 - t) * x["x0"] + t * x["noise"]
            with torch.no_grad():
                denoised = model.apply_model(x_t, torch.tensor([t]), c_crossattn=cap, **extra)
            found.append((x_t - denoised) / t)
        return torch.stack(found)

    n = int(x["mask"].sum())
    results, reports = {}, []
    for i, path in enumerate(adapters):
        capture.messages.clear()
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, comfy.utils.load_torch_file(path, safe_load=True),
                                                   1.0, 0)
        mm.load_models_gpu([patched])
        full = i == int(x["full"])
        ts = x["ts"].tolist() if full else x["ts"][:1].tolist()
        results[f"v_{i}"] = velocities(patched.model, x["gemma"][None, :n], x["mask"][None, :n].long(), ts)
        if full:
            results["v_padded"] = velocities(patched.model, x["gemma"][None], x["mask"][None].long(), ts)
            positive = lumina.comfy_conditioning({"gemma": x["gemma"], "mask": x["mask"]}, 1.0)
            negative = lumina.comfy_conditioning({"gemma": x["negative_gemma"], "mask": x["negative_mask"]}, 1.0)
            results["sample"] = comfy.sample.sample(patched, x["sample_noise"], int(x["steps"]), float(x["cfg"]),
                                                    "euler", "simple", positive, negative,
                                                    torch.zeros_like(x["sample_noise"]), seed=0)
        reports.append({**capture.adapter_report(), "patched": len(patched.patches)})
        mm.unload_all_models()  # restores the base weights for the next file
    save_file({k: v.contiguous() for k, v in results.items()}, out)
    return {"files": reports, "model": type(patcher.model).__name__,
            "shift": float(patcher.model.model_sampling.shift)}


def encode(capture: Capture, gemma: str, checkpoint: str, inputs: str, out: str) -> dict:
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
    report = {"predict": predict, "encode": encode}[mode](capture, *paths)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
