"""Run inside a ComfyUI environment: start ComfyUI's server (``main.py``) with the given arguments.

Usage: python run_comfyui.py COMFYUI_PATH [main.py arguments...]

The same server as ``python main.py``, except that a missing torchvision (imported by ``comfy.sd`` for models
Flux never uses) is stubbed the way the host tests do.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
from comfy_flux_predict import stub_torchvision_if_missing


def main() -> None:
    comfy_path = sys.argv[1]
    sys.argv = ["main.py", *sys.argv[2:]]
    sys.path.insert(0, comfy_path)
    os.chdir(comfy_path)
    stub_torchvision_if_missing()
    runpy.run_path(str(Path(comfy_path) / "main.py"), run_name="__main__")


if __name__ == "__main__":
    main()
