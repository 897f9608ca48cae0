"""Encoding outside the training loop: a dataset into the cache ahead of training (with ComfyUI's CLIP and VAE
or the engine's encoders), and a prompt with the engine's text encoders for sampling with stock nodes."""

from __future__ import annotations

import dataclasses

from ..training.config import ConfigError, DataConfig, ModelConfig, RunConfig, config_from_dict
from ..training.encoders import Encoders, FamilyTextEncoder
from ..training.families import family
from ..training.session import EncodeSummary, default_device, encode_data
from . import host
from .runs import CACHE_SUBFOLDER
from .widgets import CATEGORY


@dataclasses.dataclass(frozen=True)
class EncodedDataset:
    """A dataset encoded into the cache, with the encoders that did it: Train steps takes it in place of the
    plain dataset and trains with the same encoders."""
    data: DataConfig
    model: ModelConfig
    encoders: Encoders
    per_step_captions: bool  # captions change every step: training encodes them with ``encoders.text``

    def for_training(self, model: ModelConfig, in_worker: bool) -> tuple[DataConfig, Encoders]:
        """The dataset and encoders for a run on ``model``; refuses what that run could not do."""
        if model != self.model:
            raise ConfigError("Encode dataset and Train steps are connected to different models: connect the same "
                              "Model for training node to both (the cache is keyed by the encoders it names)")
        if in_worker and self.per_step_captions and self.encoders.text is not None:
            raise ConfigError(
                "worker_process cannot train with ComfyUI's CLIP here: the captions change every step (caption "
                "shuffle / dropout), so they are encoded while training, and ComfyUI's CLIP cannot be handed to "
                "another process. Turn worker_process off, leave the clip input of Encode dataset unconnected (the "
                "worker then runs the model's own text encoders), or remove the per-step caption processors.")
        return self.data, self.encoders


class EncodeDataset:
    DESCRIPTION = ("Encode the dataset's images and captions into the cache now, with ComfyUI's CLIP and VAE "
                   "(from the loaders you know) or, where unconnected, the text encoders and VAE of the Model for "
                   "training node. Connect its dataset output to Train steps: it trains with the same encoders, and "
                   "later queue runs (and ComfyUI restarts) find everything encoded.")
    CATEGORY = f"{CATEGORY}/data"
    RETURN_TYPES = ("LORALOOM_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "summary")
    OUTPUT_TOOLTIPS = ("The dataset with its encoders, for Train steps.",
                       "Images and captions encoded now and found in the cache.")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LORALOOM_MODEL", {"tooltip": "The same Model for training node as Train steps."}),
            "dataset": ("LORALOOM_DATASET", {"tooltip": "A Dataset (folder) or Dataset (metadata file) node."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "The model family's text encoders from ComfyUI's loader (DualCLIPLoader, "
                              "CLIPLoader or a checkpoint loader). Unconnected: the model node's text encoder "
                              "files. Captions are padded to the model's text_length."}),
            "vae": ("VAE", {"tooltip": "The model family's VAE from VAELoader. Unconnected: the model's vae file."}),
        }}

    def encode(self, model: ModelConfig, dataset: DataConfig, clip=None, vae=None) -> tuple[EncodedDataset, str]:
        if isinstance(dataset, EncodedDataset):
            raise ConfigError("this dataset is already encoded: connect the Dataset node to Encode dataset directly")
        kind = family(model.family)
        image = host.ComfyImageEncoder(vae) if vae is not None else None
        if image is not None and image.channels != kind.latent_channels:
            raise ConfigError(f"the vae input makes {image.channels}-channel latents; {kind.title} needs "
                              f"{kind.latent_channels}: load the {kind.title} VAE with VAELoader")
        data = dataclasses.replace(dataset, cache_dir=str(host.output_dir() / CACHE_SUBFOLDER))
        cfg = config_from_dict(RunConfig(model=model, data=data).to_dict())
        text = (host.ComfyTextEncoder(clip, kind, cfg.model.text_length, cfg.model.system_prompt)
                if clip is not None else None)
        encoders = Encoders(text=text, image=image)
        summary = encode_data(cfg, encoders)
        return EncodedDataset(dataset, model, encoders, summary.per_step_captions), describe(summary, encoders)


def describe(summary: EncodeSummary, encoders: Encoders) -> str:
    """The Encode dataset node's summary: what was encoded, what came from the cache, with which encoders."""
    lines = [f"{summary.images} images: {summary.latents_encoded} encoded, {summary.latents_cached} from the cache",
             f"captions: {summary.texts_encoded} encoded, {summary.texts_cached} from the cache",
             "text encoder: " + (f"ComfyUI CLIP ({encoders.text.id})" if encoders.text else "the model's files"),
             "VAE: " + (f"ComfyUI VAE ({encoders.image.id})" if encoders.image else "the model's file")]
    if summary.skipped:
        lines.append("skipped: " + ", ".join(f"{reason} {count}" for reason, count in summary.skipped.items()))
    if summary.per_step_captions:
        lines.append("captions change every step: Train steps encodes them while it trains")
    return "\n".join(lines)


def encode_prompt(model: ModelConfig, text: str, guidance: float) -> list:
    """ComfyUI CONDITIONING of ``text`` by the family's own text encoders, as its CLIPTextEncode makes it."""
    kind = family(model.family)
    model = config_from_dict(RunConfig(model=model).to_dict()).model  # its "auto" values resolved
    [embeddings] = FamilyTextEncoder(kind, model, default_device()).encode_texts([text])
    return kind.comfy_conditioning(embeddings, guidance)


class EncodePrompt:
    DESCRIPTION = ("Encode a prompt with the text encoders of a Model for training node, for KSampler. "
                   "With ComfyUI's own text-encoder files, DualCLIPLoader + CLIPTextEncode do the same.")
    CATEGORY = f"{CATEGORY}/sample"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("LORALOOM_MODEL",),
            "text": ("STRING", {"multiline": True, "default": ""}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "The model's guidance input, for families that have one (3.5 for a "
                                   "guidance-distilled model); others ignore it."}),
        }}

    def encode(self, model: ModelConfig, text: str, guidance: float):
        return (encode_prompt(model, text, guidance),)
