"""Every call the nodes make into ComfyUI (routes.py holds the HTTP routes). Every import is lazy, so the
nodes' logic can be imported and tested without ComfyUI installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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

    root = Path(comfy.__file__).parent
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
