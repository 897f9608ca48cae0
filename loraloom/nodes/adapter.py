"""Use what was trained: export it for the stock LoraLoader, or patch a MODEL with it directly."""

from __future__ import annotations

from pathlib import Path

from ..loaders.files import atomic_write_bytes
from ..training.config import ConfigError
from ..training.export import companion
from . import host
from .runs import TrainedRun
from .widgets import CATEGORY

SUFFIX = ".safetensors"
# Which of the run's exports a node uses: the trained weights, or their moving average (Train steps' ema_decay).
WEIGHTS = {"trained": None, "moving average": "ema"}
WEIGHTS_INPUT = (list(WEIGHTS), {"default": "trained", "tooltip": "The trained weights, or their moving average "
                                 "(needs ema_decay > 0 on Train steps)."})


def adapter_file(run: TrainedRun, weights: str = "trained") -> Path:
    """The run's adapter file for ``weights`` (a key of :data:`WEIGHTS`)."""
    tag = WEIGHTS[weights]
    path = companion(run.adapter_file, tag) if tag else run.adapter_file
    if not path.is_file():
        raise ConfigError(f"run {run.name!r} has no {weights} export ({path.name}): set ema_decay above 0 on Train "
                          "steps for a new run to keep a moving average")
    return path


def export_path(folder: Path, name: str, overwrite: bool) -> Path:
    """Where to write file ``name`` in ``folder``: the name itself, or with the first free ``_NNN`` suffix when
    the file exists and ``overwrite`` is off. Subfolders are allowed; leaving ``folder`` is not."""
    stem = name.removesuffix(SUFFIX).strip()
    parts = Path(stem).parts
    if not stem or Path(stem).is_absolute() or ".." in parts or any(p.startswith(".") for p in parts):
        raise ValueError(f"adapter name {name!r} must be a relative file name inside the {folder.name} folder "
                         "(no '..', no leading dot)")
    path = folder / f"{stem}{SUFFIX}"
    counter = 1
    while path.exists() and not overwrite:
        path = folder / f"{stem}_{counter:03d}{SUFFIX}"
        counter += 1
    return path


def export_run(run: TrainedRun, name: str, overwrite: bool, weights: str = "trained") -> dict[str, str]:
    """Copy the run's adapter into the first loras folder as ``name`` and, for a whole-model run (a full
    fine-tune), its model into the first diffusion_models folder as well, for the stock UNETLoader. Returns
    the names the loaders list, by folder."""
    source = adapter_file(run, weights)
    files = {"loras": source}
    if (model := companion(source, "model")).is_file():
        files["diffusion_models"] = model
    names = {}
    for kind, file in files.items():
        folder = host.first_folder(kind)
        path = export_path(folder, name, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, file.read_bytes())
        names[kind] = path.relative_to(folder).as_posix()
    return names


class ExportAdapter:
    DESCRIPTION = ("Write the run's adapter into the first 'loras' folder, with its training metadata, so the "
                   "stock LoraLoader lists it at once; a full fine-tune also writes its whole model, under the same "
                   "name, into the first 'diffusion_models' folder for the Load Diffusion Model node. An existing "
                   "file is kept unless overwrite is on.")
    CATEGORY = f"{CATEGORY}/adapter"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The file's name as the loras list shows it.",)
    FUNCTION = "export"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "run": ("LORALOOM_RUN",),
            "name": ("STRING", {"default": "loraloom/my-lora", "tooltip": "File name in the loras folder "
                                "(subfolders allowed, .safetensors added)."}),
            "overwrite": ("BOOLEAN", {"default": False}),
        }, "optional": {"weights": WEIGHTS_INPUT}}

    def export(self, run: TrainedRun, name: str, overwrite: bool, weights: str = "trained"):
        names = export_run(run, name, overwrite, weights)
        text = [names["loras"]] + ([f"whole model in diffusion_models: {names['diffusion_models']}"]
                                   if "diffusion_models" in names else [])
        return {"ui": {"text": text}, "result": (names["loras"],)}


class ApplyTrainedAdapter:
    DESCRIPTION = ("Patch a MODEL from the stock loaders with the run's adapter through ComfyUI's own LoRA "
                   "patching: train on a de-distilled base, apply to the model you sample with.")
    CATEGORY = f"{CATEGORY}/adapter"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "run": ("LORALOOM_RUN",),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}),
        }, "optional": {"weights": WEIGHTS_INPUT}}

    def apply(self, model, run: TrainedRun, strength: float, weights: str = "trained"):
        return (host.apply_lora(model, adapter_file(run, weights), strength),)


