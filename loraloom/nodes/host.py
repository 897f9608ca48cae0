"""Every call the nodes make into ComfyUI (routes.py holds the HTTP routes), including the methods of its CLIP and
VAE objects. Every ComfyUI import is lazy, so the nodes' logic can be imported and tested without ComfyUI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..training.config import ConfigError
from ..training.encoders import PROBE_TEXT, probe_id, probe_pixels


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


def model_path(folder: str, name: str) -> Path:
    """The file behind a :func:`model_choices` entry."""
    import folder_paths

    if name.startswith(CHECKPOINTS) and name not in folder_paths.get_filename_list(folder):
        folder, name = "checkpoints", name.removeprefix(CHECKPOINTS)
    return Path(folder_paths.get_full_path_or_raise(folder, name))


def first_folder(folder: str) -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths(folder)[0])


def bundled_tokenizer(which: str) -> Path:
    """A tokenizer folder that ships with ComfyUI: ``clip`` (CLIP-L) or ``t5`` (T5-XXL)."""
    import comfy

    root = Path(next(iter(comfy.__path__)))  # a namespace package in ComfyUI: no comfy.__file__
    return root / ("sd1_tokenizer" if which == "clip" else "text_encoders/t5_tokenizer")


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
    """ComfyUI's CLIP object (Flux: CLIP-L + T5-XXL, e.g. from DualCLIPLoader) as the engine's text encoder.

    Captions are read literally: no ``(word:1.2)`` weighting, which would change tags such as ``name (series)``.
    ComfyUI pads Flux's T5 input to at least 256 tokens and never cuts it; a run needs one length, since batches
    are stacked, so every caption is padded the same way (ComfyUI's own ``t5xxl_min_length`` option) to
    ``length`` tokens and cut there, as the engine's encoders do. At 256, short captions are encoded exactly as
    CLIPTextEncode encodes a prompt.
    """

    def __init__(self, clip: Any, length: int):
        self.clip, self.length = clip, length
        self.id = probe_id(f"comfy-clip-{length}", self.encode_texts([PROBE_TEXT])[0].values())

    def encode_texts(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        return [self._encode(text) for text in texts]

    def _encode(self, text: str) -> dict[str, torch.Tensor]:
        tokens = self.clip.tokenize(text, disable_weights=True, tokenizer_options={"t5xxl_min_length": self.length})
        if "t5xxl" not in tokens:
            raise ConfigError(f"the CLIP input has text encoders {sorted(tokens)}, not Flux's T5-XXL and CLIP-L: "
                              "load them with DualCLIPLoader, type flux")
        # One section (ComfyUI's T5 limit is 99999999 tokens); longer than ``length``: keep its end token.
        tokens["t5xxl"] = [s[:self.length - 1] + s[-1:] if len(s) > self.length else s for s in tokens["t5xxl"]]
        with torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return {"t5": cond[0].float().cpu(), "pooled": pooled[0].float().cpu()}

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
