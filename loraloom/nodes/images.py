"""Pictures for the graph: the loss chart and a labelled side-by-side of images with and without the adapter."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..training.preview import loss_chart, side_by_side
from .runs import LossHistory
from .widgets import CATEGORY


def to_image_batch(picture: Image.Image) -> torch.Tensor:
    """A PIL picture as a ComfyUI IMAGE: (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def from_image_batch(images: torch.Tensor) -> list[Image.Image]:
    """A ComfyUI IMAGE (B, H, W, C) in [0, 1] as B PIL pictures."""
    pixels = (images[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


class LossGraph:
    DESCRIPTION = "The run's training loss (smoothed over the raw line) and validation loss against step."
    CATEGORY = f"{CATEGORY}/view"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "draw"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "loss_history": ("LORALOOM_LOSS",),
            "smoothing": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 0.99, "step": 0.01}),
            "width": ("INT", {"default": 640, "min": 128, "max": 4096}),
            "height": ("INT", {"default": 360, "min": 96, "max": 4096}),
        }}

    def draw(self, loss_history: LossHistory, smoothing: float, width: int, height: int):
        chart = loss_chart(list(loss_history.steps), list(loss_history.losses), list(loss_history.val_steps),
                           list(loss_history.val_losses), (width, height), smoothing=smoothing or None)
        return (to_image_batch(chart),)


class SideBySide:
    DESCRIPTION = ("Two image batches side by side in one labelled picture, row i holding the i-th image of "
                   "each: sample both with the same seed to compare with and without the adapter.")
    CATEGORY = f"{CATEGORY}/view"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "compose"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images_a": ("IMAGE",),
            "images_b": ("IMAGE",),
            "label_a": ("STRING", {"default": "without adapter"}),
            "label_b": ("STRING", {"default": "with adapter"}),
            "title": ("STRING", {"default": ""}),
        }}

    def compose(self, images_a: torch.Tensor, images_b: torch.Tensor, label_a: str, label_b: str, title: str):
        if label_a == label_b:
            raise ValueError(f"label_a and label_b are both {label_a!r}: give the two columns different labels")
        picture = side_by_side({label_a: from_image_batch(images_a), label_b: from_image_batch(images_b)},
                               title=title or None)
        return (to_image_batch(picture),)
