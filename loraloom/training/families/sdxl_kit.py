"""Small random SDXL-family models written in the file layouts users have: the family's tiny-model kit.

- ``TINY``: SDXL's structure (a plain level, then levels of 1 and 2 transformer blocks, 2 resnets each, the
  text-time add-embedding with 6 x 256 size embeddings, two CLIPs whose hidden states concatenate to the
  context) at 32 / 64 channels: 3.3M UNet parameters, 3-layer 32-wide CLIPs over the tiny tokenizer.
- ``REAL_WIDTH``: the smallest UNet stock ComfyUI detects as SDXL-family (its ``Segmind_Vega`` match: 320
  channels at every level, transformer depths 0/1/2, context 2048, adm 2816; 115.5M parameters against SDXL's
  2567M), real-width CLIPs (768 / 1280: the context and pooled widths) of 3 layers over the real 49408-token
  vocabulary, and the real SDXL VAE (ComfyUI hard-codes its widths). ComfyUI's checkpoint loader builds 12- and
  32-layer CLIPs and leaves the missing layers uninitialised; in-process tests pass the depth through
  ``te_model_options``.

:func:`write` writes an all-in-one checkpoint (ComfyUI/LDM prefixes, OpenCLIP CLIP-G), the UNet alone (LDM keys,
bf16) and in fp8, clip_l / clip_g files (transformers keys), the VAE (LDM keys), a tokenizer folder and a
diffusers folder, all from one seeded build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ...loaders.files import atomic_save_safetensors
from ..tiny_models import make_tokenizer, to_fp8
from .base import TinyModel
from .flux_layout import vae_to_ldm
from .sdxl import LATENT_SCALE, STEPS, WINDOW, TextEncoders
from .sdxl_layout import HEAD_DIM, SIZE_EMBED_DIM, checkpoint_state_dict, classic_clip_keys, unet_to_ldm

CLIP_VOCAB = 49408  # ComfyUI's CLIP embeddings hard-code the vocabulary


@dataclass(frozen=True)
class ClipSize:
    hidden: int
    layers: int  # at least 3: ComfyUI reads the hidden state of layer -2 and asserts |-2| < layers
    intermediate: int


@dataclass(frozen=True)
class SdxlSize:
    unet_widths: tuple[int, ...]
    depths: tuple[int, ...]  # transformer blocks per level; 0: a plain level
    clip_l: ClipSize
    clip_g: ClipSize
    vae_widths: tuple[int, ...]
    vae_layers: int
    real_vocabulary: bool  # CLIPs over the 49408-token vocabulary (ComfyUI's tokenizer) or the tiny one
    layers_per_block: int = 2


TINY = SdxlSize(unet_widths=(32, 64, 64), depths=(0, 1, 2), clip_l=ClipSize(32, 3, 64), clip_g=ClipSize(32, 3, 64),
                vae_widths=(32, 32, 64), vae_layers=1, real_vocabulary=False)
# SDXL 1.0: its UNet, and CLIP-L / CLIP-G (12 and 32 layers) and VAE at their released sizes.
FULL = SdxlSize(unet_widths=(320, 640, 1280), depths=(0, 2, 10), clip_l=ClipSize(768, 12, 3072),
                clip_g=ClipSize(1280, 32, 5120), vae_widths=(128, 256, 512, 512), vae_layers=2, real_vocabulary=True)
REAL_WIDTH = SdxlSize(unet_widths=(320, 320, 320), depths=(0, 1, 2), clip_l=ClipSize(768, 3, 3072),
                      clip_g=ClipSize(1280, 3, 5120), vae_widths=(128, 256, 512, 512), vae_layers=2,
                      real_vocabulary=True)


def _clip_config(size: ClipSize, tokenizer, vocab: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                          num_hidden_layers=size.layers, num_attention_heads=max(1, size.hidden // HEAD_DIM),
                          max_position_embeddings=WINDOW, hidden_act=act, projection_dim=size.hidden,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def _jitter(module: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Seeded noise on every parameter, so no two norms or biases are equal and a swapped rename shows."""
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return module


def unet_config(size: SdxlSize) -> dict:
    """``UNet2DConditionModel`` arguments of ``size``'s UNet."""
    return dict(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=size.unet_widths,
        layers_per_block=size.layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in size.depths),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(size.depths)),
        transformer_layers_per_block=tuple(max(d, 1) for d in size.depths),
        attention_head_dim=tuple(max(1, w // HEAD_DIM) for w in size.unet_widths),
        cross_attention_dim=size.clip_l.hidden + size.clip_g.hidden, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=SIZE_EMBED_DIM,
        projection_class_embeddings_input_dim=size.clip_g.hidden + 6 * SIZE_EMBED_DIM)


def build(size: SdxlSize = TINY, seed: int = 0, words: tuple[str, ...] = ()) -> TinyModel:
    """Every part, randomly initialised from ``seed`` (fp32); ``words`` join the tiny tokenizer's vocabulary."""
    tokenizer = make_tokenizer(words, WINDOW, add_bos=True)
    vocab = CLIP_VOCAB if size.real_vocabulary else len(tokenizer)
    n = len(size.vae_widths)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(size))
        clip_l = CLIPTextModel(_clip_config(size.clip_l, tokenizer, vocab, "quick_gelu"))
        clip_g = CLIPTextModelWithProjection(_clip_config(size.clip_g, tokenizer, vocab, "gelu"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=size.vae_widths,
                            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            layers_per_block=size.vae_layers, norm_num_groups=32, scaling_factor=LATENT_SCALE)
        generator = torch.Generator().manual_seed(seed + 1)
        for module in (unet, clip_l, clip_g):
            _jitter(module, generator)
    text = TextEncoders(clip_l.eval(), clip_g.eval(), tokenizer)
    return TinyModel(unet.eval(), vae.eval(), text)


def write(tiny: TinyModel, folder: str | Path, diffusers: bool = True) -> dict[str, Path]:
    """Write ``tiny`` in every user layout under ``folder``; returns the paths by ModelConfig slot."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text: TextEncoders = tiny.text
    paths = {
        "diffusion_model": folder / "sdxl-tiny-unet.safetensors",
        "diffusion_model_fp8": folder / "sdxl-tiny-unet-fp8-e4m3fn.safetensors",
        "text_encoder": folder / "clip_l.safetensors",
        "text_encoder_2": folder / "clip_g.safetensors",
        "vae": folder / "sdxl_vae.safetensors",
        "checkpoint": folder / "sdxl-tiny.safetensors",
        "tokenizer": folder / "tokenizer",
    }
    unet = {k: v.to(torch.bfloat16) for k, v in tiny.denoiser.state_dict().items()}
    ldm = unet_to_ldm(unet)
    atomic_save_safetensors(ldm, paths["diffusion_model"])
    atomic_save_safetensors(to_fp8(ldm), paths["diffusion_model_fp8"])
    clip_l, clip_g = classic_clip_keys(text.clip_l.state_dict()), classic_clip_keys(text.clip_g.state_dict())
    atomic_save_safetensors(clip_l, paths["text_encoder"])
    atomic_save_safetensors(clip_g, paths["text_encoder_2"])
    vae = vae_to_ldm(tiny.vae.state_dict())
    atomic_save_safetensors(vae, paths["vae"])
    atomic_save_safetensors(checkpoint_state_dict(unet, clip_l, clip_g, vae), paths["checkpoint"])
    text.tokenizer.save_pretrained(paths["tokenizer"])
    if diffusers:
        root = folder / "diffusers"
        tiny.denoiser.save_pretrained(root / "unet")
        tiny.vae.save_pretrained(root / "vae")
        text.clip_l.save_pretrained(root / "text_encoder")
        text.clip_g.save_pretrained(root / "text_encoder_2")
        text.tokenizer.save_pretrained(root / "tokenizer")
        text.tokenizer.save_pretrained(root / "tokenizer_2")
        (root / "scheduler").mkdir(parents=True, exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": STEPS, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
            "timestep_spacing": "leading", "steps_offset": 1}))
        (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
        paths["diffusers"] = root
    return paths
