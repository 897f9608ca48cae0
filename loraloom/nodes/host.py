"""Every call the nodes make into ComfyUI (routes.py holds the HTTP routes), including the methods of its CLIP and
VAE objects. Every ComfyUI import is lazy, so the nodes' logic can be imported and tested without ComfyUI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..training.encoders import PROBE_TEXT, probe_id, probe_pixels
from ..training.families.base import Family


def output_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory())


def input_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


# All-in-one files in ComfyUI's checkpoints folder bundle every part of a model, so every model choice
# offers them too, named with this prefix.
CHECKPOINTS = "checkpoints/"


def model_choices(folder: str) -> list[str]:
    """The files of a ComfyUI model folder, then those of ``checkpoints`` (prefixed)."""
    import folder_paths

    bundles = [CHECKPOINTS + name for name in folder_paths.get_filename_list("checkpoints")]
    return folder_paths.get_filename_list(folder) + bundles


def folder_files(folder: str) -> list[str]:
    """The files of a ComfyUI model folder (``loras``, ...), as its lists name them."""
    import folder_paths

    return folder_paths.get_filename_list(folder)


def model_path(folder: str, name: str) -> Path:
    """The file behind a :func:`model_choices` entry."""
    import folder_paths

    if name.startswith(CHECKPOINTS) and name not in folder_paths.get_filename_list(folder):
        folder, name = "checkpoints", name.removeprefix(CHECKPOINTS)
    return Path(folder_paths.get_full_path_or_raise(folder, name))


def first_folder(folder: str) -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths(folder)[0])


def bundled_tokenizer(folder: str) -> Path:
    """A tokenizer folder that ships with ComfyUI, by its path inside the ``comfy`` package."""
    import comfy

    return Path(next(iter(comfy.__path__))) / folder  # a namespace package in ComfyUI: no comfy.__file__


def send_progress(event: str, payload: dict[str, Any]) -> None:
    from server import PromptServer

    PromptServer.instance.send_sync(event, payload)


def progress_bar(total: int, node_id: str) -> Any:
    import comfy.utils

    return comfy.utils.ProgressBar(total, node_id)


def interrupted() -> bool:
    """Whether the user pressed Cancel (the flag stays set; :func:`raise_if_interrupted` consumes it)."""
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def raise_if_interrupted() -> None:
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def free_models() -> None:
    """Unload every model ComfyUI holds, so training gets the memory."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def apply_lora(model: Any, lora_file: Path, strength: float) -> Any:
    """A patched clone of a ComfyUI MODEL, through ComfyUI's own LoRA loader (as LoraLoaderModelOnly)."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(lora_file), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    return patched


class ComfyTextEncoder:
    """ComfyUI's CLIP object (from the loader of the family's text encoders) as the engine's text encoder.

    Captions are read literally: no ``(word:1.2)`` weighting, which would change tags such as ``name (series)``.
    The family turns ComfyUI's output into its embeddings, of ``length`` tokens, with ``system_prompt`` in front
    where it reads one (see ``Family.comfy_text``); both show in the probe, hence in the id.
    """

    def __init__(self, clip: Any, family: Family, length: int, system_prompt: str = ""):
        self.clip, self.family, self.length, self.system_prompt = clip, family, length, system_prompt
        self.id = probe_id(f"comfy-clip-{length}", self.encode_texts([PROBE_TEXT])[0].values())

    def encode_texts(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        with torch.no_grad():
            return [self.family.comfy_text(self.clip, text, self.length, self.system_prompt) for text in texts]

    def release(self) -> None:
        pass  # ComfyUI's model management owns the weights


class ComfyImageEncoder:
    """ComfyUI's VAE object (e.g. from VAELoader) as the engine's image encoder.

    ``VAE.encode`` takes (B, H, W, 3) pixels in [0, 1] and returns the posterior's mode without the latent
    format's scale and shift (comfy/sd.py, DiagonalGaussianRegularizer): the engine's raw latents.
    """

    def __init__(self, vae: Any):
        self.vae = vae
        probe = self.encode_images(probe_pixels())
        self.channels = probe.shape[1]
        self.id = probe_id("comfy-vae", [probe])

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.encode(((pixels + 1) / 2).movedim(1, -1)).float().cpu()
