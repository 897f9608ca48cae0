"""Run inside a ComfyUI environment: load a Flux file and a LoRA with ComfyUI's own code, predict, report.

Usage: python comfy_flux_predict.py COMFYUI_PATH BASE.safetensors LORA.safetensors INPUTS.safetensors OUT.safetensors
BASE is loaded as UNETLoader loads a diffusion_models file; LORA "-" predicts with BASE alone.
Prints one JSON line: the LoRA keys ComfyUI did not load and the detected model class.
"""

from __future__ import annotations

import importlib.machinery
import json
import logging
import sys
import types


def stub_torchvision_if_missing() -> None:
    """comfy.sd imports torchvision for models Flux never uses; PyPI's build may not match the local torch."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        pass
    import transformers.utils.import_utils as tiu

    tiu.is_torchvision_available()  # cache False before the stub exists
    tv = types.ModuleType("torchvision")
    tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    tv.models = types.ModuleType("torchvision.models")
    tv.transforms = types.ModuleType("torchvision.transforms")
    sys.modules.update({"torchvision": tv, "torchvision.models": tv.models, "torchvision.transforms": tv.transforms})


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    comfy_path, base, lora, inputs, out = sys.argv[1:6]
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, comfy_path)
    stub_torchvision_if_missing()
    import comfy.options
    import torch
    from safetensors.torch import load_file, save_file

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    capture = Capture()
    logging.getLogger().addHandler(capture)
    patcher = comfy.sd.load_diffusion_model(base, model_options={"dtype": torch.float32})
    x = load_file(inputs)
    lora_patcher = patcher if lora == "-" else comfy.sd.load_lora_for_models(
        patcher, None, comfy.utils.load_torch_file(lora), 1.0, 0)[0]
    mm.load_models_gpu([lora_patcher])
    with torch.no_grad():
        pred = lora_patcher.model.diffusion_model(x["x"], x["t"], x["context"], x["y"], x["guidance"])
    save_file({"pred": pred.contiguous()}, out)
    not_loaded = [m for m in capture.messages if "lora key not loaded" in m or "NOT LOADED" in m]
    print(json.dumps({"not_loaded": not_loaded, "model": type(patcher.model).__name__}))


if __name__ == "__main__":
    main()
