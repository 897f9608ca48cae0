"""Run inside a ComfyUI environment: start ComfyUI's server (``main.py``) with the given arguments.

Usage: python run_comfyui.py COMFYUI_PATH [main.py arguments...]

The same server as ``python main.py``, except that two libraries ComfyUI imports for models these tests never
use are stubbed when they are not installed: torchvision (as the host tests do) and spandrel, the upscale
models' loader. Without spandrel's nodes the front end (1.27) fails to build any model-file widget (VAELoader's
``vae_name`` among them), since its map from model folders to loader nodes names ``UpscaleModelLoader``.
"""

from __future__ import annotations

import importlib.machinery
import os
import runpy
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
from comfy_flux_predict import stub_torchvision_if_missing


class Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("spandrel is not installed in this ComfyUI environment")


def stub_spandrel_if_missing() -> None:
    try:
        import spandrel
        return
    except Exception:
        pass
    spandrel = types.ModuleType("spandrel")
    spandrel.__spec__ = importlib.machinery.ModuleSpec("spandrel", None)
    spandrel.ModelLoader = spandrel.ImageModelDescriptor = Unavailable
    sys.modules["spandrel"] = spandrel


def main() -> None:
    comfy_path = sys.argv[1]
    sys.argv = ["main.py", *sys.argv[2:]]
    sys.path.insert(0, comfy_path)
    os.chdir(comfy_path)
    stub_torchvision_if_missing()
    stub_spandrel_if_missing()
    runpy.run_path(str(Path(comfy_path) / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
