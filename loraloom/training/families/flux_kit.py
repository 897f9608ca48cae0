"""Small random Flux models written in the file layouts users have: the family's tiny-model kit.

:func:`write` writes BFL/ComfyUI single files (bf16 and an all-linear fp8), HF-keyed text encoder files, an LDM
``ae.safetensors``, tokenizer folders, an all-in-one checkpoint and a diffusers folder, all from one seeded build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ...loaders.files import atomic_save_safetensors
from ..tiny_models import make_tokenizer, to_fp8
from .base import TinyModel
from .flux import TextEncoders
from .flux_layout import transformer_to_bfl, vae_to_ldm
from .parts import CLIP_FILE_PREFIX


@dataclass(frozen=True)
class FluxSize:
    heads: int
    head_dim: int
    double_blocks: int
    single_blocks: int
    t5_width: int  # = the transformer's context width
    t5_heads: int
    t5_ff: int
    clip_width: int  # = the pooled width
    vae_widths: tuple[int, ...]
    text_layers: int = 1


# Multiples of 32 everywhere: the loader assumes the Flux VAE's 32 norm groups.
TINY = FluxSize(heads=2, head_dim=32, double_blocks=2, single_blocks=2, t5_width=64, t5_heads=2, t5_ff=128,
                clip_width=64, vae_widths=(32, 32, 64))
# Stock ComfyUI detects this as Flux: hidden 3072, 24 heads, context 4096, pooled 768; depth 1 + 1.
REAL_WIDTH = FluxSize(heads=24, head_dim=128, double_blocks=1, single_blocks=1, t5_width=4096, t5_heads=64,
                      t5_ff=1024, clip_width=768, vae_widths=(32, 32, 64))


def build(size: FluxSize = TINY, seed: int = 0, words: tuple[str, ...] = ()) -> TinyModel:
    """Every Flux part, randomly initialised from ``seed`` (fp32); ``words`` join the tokenizers' vocabulary."""
    clip_tok = make_tokenizer(words, 77, add_bos=True)
    t5_tok = make_tokenizer(words, 512, add_bos=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hd = size.head_dim
        transformer = FluxTransformer2DModel(
            in_channels=64, num_layers=size.double_blocks, num_single_layers=size.single_blocks,
            attention_head_dim=hd, num_attention_heads=size.heads, joint_attention_dim=size.t5_width,
            pooled_projection_dim=size.clip_width, guidance_embeds=True,
            axes_dims_rope=(hd // 8, hd * 7 // 16, hd * 7 // 16))
        n = len(size.vae_widths)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=size.vae_widths,
                            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            layers_per_block=1, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                            scaling_factor=0.3611, shift_factor=0.1159)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=size.clip_width, intermediate_size=size.clip_width * 4,
            num_hidden_layers=size.text_layers, num_attention_heads=max(1, size.clip_width // 64),
            max_position_embeddings=77, projection_dim=size.clip_width, hidden_act="quick_gelu",
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id))
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tok), d_model=size.t5_width, d_kv=size.t5_width // size.t5_heads, d_ff=size.t5_ff,
            num_layers=size.text_layers, num_heads=size.t5_heads, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1))
    return TinyModel(transformer.eval(), vae.eval(), TextEncoders(clip.eval(), clip_tok, t5.eval(), t5_tok))


def write(tiny: TinyModel, folder: str | Path, diffusers: bool = True) -> dict[str, Path]:
    """Write ``tiny`` in every user layout under ``folder``; returns the paths by ModelConfig slot."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text: TextEncoders = tiny.text
    bfl = transformer_to_bfl(tiny.denoiser.state_dict())
    paths = {
        "diffusion_model": folder / "flux1-tiny.safetensors",
        "diffusion_model_fp8": folder / "flux1-tiny-fp8-e4m3fn.safetensors",
        "text_encoder": folder / "clip_l.safetensors",
        "text_encoder_2": folder / "t5xxl.safetensors",
        "vae": folder / "ae.safetensors",
        "checkpoint": folder / "flux1-tiny-checkpoint.safetensors",
        "tokenizer": folder / "tokenizer",
        "tokenizer_2": folder / "tokenizer_2",
    }
    atomic_save_safetensors({k: v.to(torch.bfloat16) for k, v in bfl.items()}, paths["diffusion_model"])
    atomic_save_safetensors(to_fp8(bfl), paths["diffusion_model_fp8"])
    clip_sd = {k if k.startswith(CLIP_FILE_PREFIX) else CLIP_FILE_PREFIX + k: v
               for k, v in text.clip.state_dict().items()}
    atomic_save_safetensors(clip_sd, paths["text_encoder"])
    t5_sd = {k: v for k, v in text.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    atomic_save_safetensors(t5_sd, paths["text_encoder_2"])
    vae_sd = vae_to_ldm(tiny.vae.state_dict())
    atomic_save_safetensors(vae_sd, paths["vae"])
    # ComfyUI's all-in-one layout (as flux1-dev-fp8.safetensors in models/checkpoints): one file, four prefixes.
    bundle = {"model.diffusion_model.": {k: v.to(torch.bfloat16) for k, v in bfl.items()},
              "text_encoders.clip_l.transformer.": clip_sd, "text_encoders.t5xxl.transformer.": t5_sd, "vae.": vae_sd}
    atomic_save_safetensors({prefix + k: v for prefix, sd in bundle.items() for k, v in sd.items()},
                            paths["checkpoint"])
    text.clip_tokenizer.save_pretrained(paths["tokenizer"])
    text.t5_tokenizer.save_pretrained(paths["tokenizer_2"])
    if diffusers:
        root = folder / "diffusers"
        tiny.denoiser.save_pretrained(root / "transformer")
        tiny.vae.save_pretrained(root / "vae")
        text.clip.save_pretrained(root / "text_encoder")
        text.t5.save_pretrained(root / "text_encoder_2")
        text.clip_tokenizer.save_pretrained(root / "tokenizer")
        text.t5_tokenizer.save_pretrained(root / "tokenizer_2")
        (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
        paths["diffusers"] = root
    return paths
