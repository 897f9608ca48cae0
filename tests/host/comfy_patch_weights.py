"""Run inside a ComfyUI environment: patch a model's weights with adapter files the way ComfyUI does.

Usage: python comfy_patch_weights.py COMFYUI_PATH BASE.safetensors OUT_FOLDER ADAPTER...

BASE holds a model's tensors by name (``conv.weight``, ``proj.bias``); each ADAPTER file names its layers as the
weights without ``.weight`` (``conv.lokr_w1``, ``conv.alpha``). The path is ComfyUI's own: ``comfy.lora.load_lora``
builds the patches (every weight adapter class it has), ``ModelPatcher.add_patches`` registers them at strength 1
and ``patch_model`` runs ``comfy.lora.calculate_weight`` in float32. OUT_FOLDER/<i>.safetensors gets the patched
tensors of the i-th file; stdout one JSON line, per file: the weights patched, the keys not loaded and the errors
ComfyUI's adapter code logged (it logs them and leaves the layer unpatched).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def container(tensors: dict):
    """A bare module tree whose state dict keys are exactly ``tensors``' keys."""
    import torch

    root = torch.nn.Module()
    for key, value in tensors.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(value.float().clone(), requires_grad=False))
    return root


def main() -> None:
    comfy_path, base_path, out_folder, *adapters = sys.argv[1:]
    sys.argv = ["main.py", "--cpu"]
    sys.path.insert(0, comfy_path)
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.model_patcher
    import torch
    from safetensors.torch import load_file, save_file

    capture = Capture()
    logging.getLogger().addHandler(capture)
    base = load_file(base_path)
    to_load = {key[:-len(".weight")]: key for key in base if key.endswith(".weight")}
    cpu = torch.device("cpu")
    Path(out_folder).mkdir(parents=True, exist_ok=True)
    reports = []
    for i, adapter in enumerate(adapters):
        capture.messages.clear()
        model = container(base)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        patched = patcher.add_patches(comfy.lora.load_lora(load_file(adapter), to_load), 1.0)
        patcher.patch_model(device_to=cpu)
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, f"{out_folder}/{i}.safetensors")
        reports.append({"patched": sorted(patched), "not_loaded": [m for m in capture.messages if "not loaded" in m],
                        "errors": [m for m in capture.messages if m.startswith("ERROR") or "MISMATCH" in m]})
    print(json.dumps(reports))


if __name__ == "__main__":
    main()
