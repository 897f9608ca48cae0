"""Prompt encoding with the engine's text encoders, for sampling with stock nodes when ComfyUI's own CLIP
loaders are not used (the run's encoders are already chosen on the Model for training node)."""

from __future__ import annotations

import torch

from ..training.config import ModelConfig
from ..training.families import FAMILIES
from .widgets import CATEGORY


def encode_prompt(model: ModelConfig, text: str, guidance: float) -> list:
    """ComfyUI CONDITIONING for Flux: ``[[t5 (1, T, D), {"pooled_output": (1, D_clip), "guidance": g}]]``."""
    family = FAMILIES[model.family]
    cuda = torch.cuda.is_available()
    encoders = family.load_text_encoders(model, torch.bfloat16 if cuda else torch.float32)
    if cuda:
        encoders.clip.to("cuda")
        encoders.t5.to("cuda")
    with torch.no_grad():
        text_embeddings = family.encode_prompts(encoders, [text])
    return [[text_embeddings["t5"], {"pooled_output": text_embeddings["pooled"], "guidance": guidance}]]


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
                                   "tooltip": "Flux's guidance input: 3.5 for Flux-dev."}),
        }}

    def encode(self, model: ModelConfig, text: str, guidance: float):
        return (encode_prompt(model, text, guidance),)
