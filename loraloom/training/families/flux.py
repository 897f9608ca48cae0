"""Flux.1: loading from the files users have, text and image encoding, prediction and sampling.

Shapes: latents are raw VAE latents (B, 16, H/8, W/8); the transformer sees them scaled and packed into
2×2 patches, (B, H/16·W/16, 64). T5 embeddings (B, T, 4096), CLIP pooled (B, 768) at real width.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...loaders.files import ModelFileError, find_weights, read_safetensors, strip_prefix
from ..config import ModelConfig
from ..objectives import inference_sigmas
from ..precision import assign_weights
from .flux_layout import transformer_from_bfl

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

# diffusers, transformers and accelerate are imported by the functions that load models: they take seconds to
# import, and `loraloom dataset inspect` needs only this module's constants.
log = logging.getLogger(__name__)

NAME = "flux"
ARCHITECTURE = "flux-1-dev"  # modelspec.architecture of exported adapters
# ComfyUI's latent_format.Flux: the transformer sees (latent - shift) * scale.
LATENT_SHIFT = 0.1159
LATENT_SCALE = 0.3611
VAE_FACTOR = 8  # real Flux VAE; tiny kits may differ, read from the loaded VAE
LATENT_CHANNELS = 16  # raw VAE latent channels: 4 x 16 = the transformer's packed input
BUCKET_DIVISOR = 16  # image sides of buckets: VAE factor 8 x 2x2 latent patches
CONFIG_DIR = Path(__file__).with_name("configs")

# peft target patterns (regex, full match) over diffusers module names.
_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
_ATTN_DOUBLE = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_ATTN_SINGLE = r"attn\.(to_q|to_k|to_v)"
_MLP_DOUBLE = r"(ff|ff_context)\.net\.(0\.proj|2)"
_MLP_SINGLE = r"(proj_mlp|proj_out)"
_MOD_DOUBLE = r"(norm1|norm1_context)\.linear"
_MOD_SINGLE = r"norm\.linear"
LORA_TARGETS = {
    "attention": rf"^({_DOUBLE}{_ATTN_DOUBLE}|{_SINGLE}{_ATTN_SINGLE})$",
    "attention_mlp": rf"^({_DOUBLE}({_ATTN_DOUBLE}|{_MLP_DOUBLE})|{_SINGLE}({_ATTN_SINGLE}|{_MLP_SINGLE}))$",
    "all_linear": rf"^({_DOUBLE}({_ATTN_DOUBLE}|{_MLP_DOUBLE}|{_MOD_DOUBLE})"
                  rf"|{_SINGLE}({_ATTN_SINGLE}|{_MLP_SINGLE}|{_MOD_SINGLE}))$",
}
# Exported keys: diffusers module names under this prefix load in stock ComfyUI and in diffusers.
EXPORT_PREFIX = "transformer."
BFL_MARKER = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_MARKER = "transformer_blocks.0.attn.to_q.weight"


@dataclass
class TextEncoders:
    clip: CLIPTextModel
    clip_tokenizer: object
    t5: T5EncoderModel
    t5_tokenizer: object
    t5_max_length: int = 512


# ---------------------------------------------------------------- transformer


def transformer_config_from_bfl(sd: dict[str, torch.Tensor]) -> dict:
    """Diffusers constructor arguments read from the shapes of a BFL-layout state dict."""
    hidden, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return {
        "in_channels": in_channels,
        "num_layers": _count_blocks(sd, "double_blocks."),
        "num_single_layers": _count_blocks(sd, "single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": sd["txt_in.weight"].shape[1],
        "pooled_projection_dim": sd["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        # Flux's (16, 56, 56) for head 128; the same proportions for test-sized heads.
        "axes_dims_rope": (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
    }


def _count_blocks(sd: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def load_transformer(path: str | Path, compute_dtype: torch.dtype, fp8_storage: bool, allow_pickle: bool = False
                     ) -> FluxTransformer2DModel:
    """A Flux transformer from a BFL/ComfyUI single file, a diffusers-keyed file, or a diffusers folder.

    fp8 linear weights stay fp8 when ``fp8_storage`` (see :mod:`..precision`); everything else is stored in
    ``compute_dtype``.
    """
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    path = Path(path)
    if path.is_dir():
        config, sd = read_diffusers_folder(path, "transformer", "the Flux transformer", allow_pickle)
    else:
        sd = read_safetensors([path], what="the Flux transformer", allow_pickle=allow_pickle,
                              prefixes=("model.diffusion_model.", "diffusion_model."))
        if BFL_MARKER in sd:
            config = transformer_config_from_bfl(sd)
            sd = transformer_from_bfl(sd)
        elif DIFFUSERS_MARKER in sd:
            config = None
        else:
            raise _not_flux(path, sd)
    if config is None:
        raise ModelFileError(f"{path}: diffusers-keyed Flux file without config; use the diffusers folder "
                             f"(with transformer/config.json) or a BFL/ComfyUI single file")
    if DIFFUSERS_MARKER not in sd:
        raise _not_flux(path, sd)
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    assign_weights(model, sd, compute_dtype, fp8_storage, path)
    return model.requires_grad_(False).eval()


def read_diffusers_folder(path: Path, subfolder: str, what: str, allow_pickle: bool = False
                          ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Constructor arguments and weights of a diffusers model folder (the pipeline root or the subfolder)."""
    folder = path / subfolder if (path / subfolder / "config.json").is_file() else path
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{folder}: no readable config.json ({e}); expected a diffusers folder with "
                             f"{what} (or its {subfolder}/ subfolder)") from None
    weights = read_safetensors(find_weights(folder, allow_pickle), what=what, allow_pickle=allow_pickle)
    return {k: v for k, v in config.items() if not k.startswith("_")}, weights


def _not_flux(path: Path, sd: dict) -> ModelFileError:
    sample = ", ".join(list(sd)[:3])
    return ModelFileError(
        f"{path} is not a Flux transformer: expected keys like '{BFL_MARKER}' (BFL/ComfyUI) or "
        f"'{DIFFUSERS_MARKER}' (diffusers), found {sample}. Check model.transformer points at a Flux file.")


# ---------------------------------------------------------------- VAE


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> AutoencoderKL:
    """The Flux VAE from ``ae.safetensors`` (BFL/LDM keys), a diffusers-keyed file or a diffusers folder."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    if path.is_dir():
        config, sd = read_diffusers_folder(path, "vae", "the Flux VAE", allow_pickle)
    else:
        sd = read_safetensors([path], what="the Flux VAE", allow_pickle=allow_pickle,
                              prefixes=("vae.", "first_stage_model."))
        if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
            raise ModelFileError(f"{path} is not a VAE: expected keys 'encoder.conv_in.weight' and "
                                 f"'decoder.conv_out.weight'. Check model.vae points at ae.safetensors.")
        config = vae_config_from_shapes(sd)
        if "encoder.down.0.block.0.conv1.weight" in sd:  # LDM/BFL layout
            sd = convert_ldm_vae_checkpoint(sd, config)
    with init_empty_weights():
        vae = AutoencoderKL(**config)
    try:
        vae.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: VAE weights do not match the expected layout ({str(e)[:200]})") from None
    return vae.requires_grad_(False).eval()


def vae_config_from_shapes(sd: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKL arguments from an LDM- or diffusers-keyed VAE state dict (Flux: 16 latent channels)."""
    if "encoder.down.0.block.0.conv1.weight" in sd:
        n = _count_blocks(sd, "encoder.down.")
        widths = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(n)]
        layers = _count_blocks(sd, "encoder.down.0.block.")
    else:
        n = _count_blocks(sd, "encoder.down_blocks.")
        widths = [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(n)]
        layers = _count_blocks(sd, "encoder.down_blocks.0.resnets.")
    latent = sd["decoder.conv_in.weight"].shape[1]
    config = json.loads((CONFIG_DIR / "flux_vae.json").read_text())
    config.update(
        block_out_channels=widths, layers_per_block=layers, latent_channels=latent,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
        use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd,
    )
    return config


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] → raw latents (B, C, H/f, W/f): the latent mean, unscaled."""
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Raw latents (B, C, h, w) → pixels (B, 3, h·f, w·f) in [-1, 1]."""
    return vae.decode(latents.to(vae.device, vae.dtype)).sample.float().clamp(-1, 1)


def vae_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------- text encoders


def load_text_encoders(cfg: ModelConfig, dtype: torch.dtype) -> TextEncoders:
    """CLIP-L and T5 with their tokenizers, from single files (HF keys) or folders."""
    from transformers import CLIPTextModel, T5EncoderModel

    clip_tok = _load_tokenizer(cfg.tokenizer, cfg.text_encoder, "tokenizer", "model.tokenizer",
                               "ComfyUI/comfy/sd1_tokenizer")
    t5_tok = _load_tokenizer(cfg.tokenizer_2, cfg.text_encoder_2, "tokenizer_2", "model.tokenizer_2",
                             "ComfyUI/comfy/text_encoders/t5_tokenizer")
    clip = _load_hf_encoder(cfg.text_encoder, "text_encoder", CLIPTextModel, _clip_config, clip_tok, dtype,
                            marker="embeddings.token_embedding.weight",
                            checkpoint_prefix="text_encoders.clip_l.transformer.", allow_pickle=cfg.allow_pickle)
    t5 = _load_hf_encoder(cfg.text_encoder_2, "text_encoder_2", T5EncoderModel, _t5_config, t5_tok, dtype,
                          marker="shared.weight", checkpoint_prefix="text_encoders.t5xxl.transformer.",
                          allow_pickle=cfg.allow_pickle)
    return TextEncoders(clip, clip_tok, t5, t5_tok, cfg.t5_max_length)


def _load_tokenizer(explicit: str, encoder_path: str, sibling: str, key: str, hint: str):
    from transformers import AutoTokenizer

    candidates = [Path(explicit)] if explicit else []
    enc = Path(encoder_path)
    if enc.is_dir():
        candidates += [enc, enc / sibling, enc.parent / sibling]
    for folder in candidates:
        if folder.is_dir() and any((folder / f).exists() for f in
                                   ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    raise ModelFileError(f"no tokenizer found for {encoder_path}: set {key} to a tokenizer folder "
                         f"(for example {hint}, or the {sibling}/ folder of a diffusers Flux model)")


# Files on disk use the classic transformers keys (``text_model.`` for CLIP); some transformers versions
# name the same module without that prefix, so both are accepted.
CLIP_FILE_PREFIX = "text_model."


def _load_hf_encoder(path: str, subfolder: str, cls, config_fn, tokenizer, dtype, marker: str,
                     checkpoint_prefix: str, allow_pickle: bool):
    from accelerate import init_empty_weights

    p = Path(path)
    if p.is_dir():
        folder = p / subfolder if (p / subfolder / "config.json").exists() else p
        # use_safetensors: transformers would otherwise fall back to a pickled pytorch_model.bin.
        model = cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                    use_safetensors=not allow_pickle)
        return model.requires_grad_(False).eval()
    sd = read_safetensors([p], what=f"the {cls.__name__}", allow_pickle=allow_pickle,
                          prefixes=(checkpoint_prefix,))
    sd = strip_prefix(sd, (CLIP_FILE_PREFIX,))
    if marker not in sd:
        raise ModelFileError(f"{p} is not a {cls.__name__} file: expected the key '{marker}', found "
                             f"{', '.join(list(sd)[:3])}")
    with init_empty_weights():
        model = cls(config_fn(sd, tokenizer))
    expected = model.state_dict()
    prefix = CLIP_FILE_PREFIX if all(k.startswith(CLIP_FILE_PREFIX) for k in expected) else ""
    sd = {prefix + k: v.to(dtype) for k, v in sd.items() if prefix + k in expected}
    # T5's encoder.embed_tokens is tied to shared and often absent from files.
    if "encoder.embed_tokens.weight" in expected and "encoder.embed_tokens.weight" not in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    try:
        model.load_state_dict(sd, assign=True, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{p}: weights do not match a {cls.__name__} ({str(e)[:200]})") from None
    return model.requires_grad_(False).eval()


def _clip_config(sd: dict, tokenizer) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    base = json.loads((CONFIG_DIR / "clip_l.json").read_text())
    vocab, hidden = sd["embeddings.token_embedding.weight"].shape
    base.update(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "encoder.layers."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextConfig(**base)


def _t5_config(sd: dict, tokenizer) -> T5Config:
    from transformers import T5Config

    base = json.loads((CONFIG_DIR / "t5xxl.json").read_text())
    vocab, d_model = sd["shared.weight"].shape
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    base.update(
        vocab_size=vocab, d_model=d_model, num_heads=heads,
        d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"].shape[1],
        num_layers=_count_blocks(sd, "encoder.block."),
        relative_attention_num_buckets=sd[
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[0],
    )
    return T5Config(**base)


@torch.no_grad()
def encode_prompts(enc: TextEncoders, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompts → {'t5': (B, T, D_t5), 'pooled': (B, D_clip)} as Flux's pipeline computes them."""
    device = enc.t5.device
    # CLIP's positions, not the tokenizer's model_max_length: ComfyUI's bundled sd1_tokenizer says 8192.
    clip_ids = enc.clip_tokenizer(prompts, padding="max_length", max_length=enc.clip.config.max_position_embeddings,
                                  truncation=True, return_tensors="pt").input_ids
    pooled = enc.clip(clip_ids.to(device), output_hidden_states=False).pooler_output
    t5_ids = enc.t5_tokenizer(prompts, padding="max_length", max_length=enc.t5_max_length,
                              truncation=True, return_tensors="pt").input_ids
    t5 = enc.t5(t5_ids.to(device), output_hidden_states=False)[0]
    return {"t5": t5.float().cpu(), "pooled": pooled.float().cpu()}


# ---------------------------------------------------------------- the transformer's view


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): 2×2 patches, as Flux tokenises images."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) → (B, C, h, w): the inverse of :func:`pack`."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """Positions of the packed tokens of an (h, w) latent: (h/2·w/2, 3) = (0, row, col)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


def scale_latents(raw: torch.Tensor) -> torch.Tensor:
    return (raw - LATENT_SHIFT) * LATENT_SCALE


def unscale_latents(x: torch.Tensor) -> torch.Tensor:
    return x / LATENT_SCALE + LATENT_SHIFT


def predict(model: FluxTransformer2DModel, x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
            guidance: float) -> torch.Tensor:
    """Velocity prediction. x: scaled latents (B, C, h, w); t: (B,) in [0, 1]; text from encode_prompts.

    Returns (B, C, h, w) float32.
    """
    b, _, h, w = x.shape
    device = next(model.parameters()).device
    dtype = text["t5"].dtype
    g = torch.full((b,), guidance, device=device) if model.config.guidance_embeds else None
    out = model(
        hidden_states=pack(x).to(device),
        encoder_hidden_states=text["t5"].to(device, dtype),
        pooled_projections=text["pooled"].to(device, dtype),
        timestep=t.to(device),
        img_ids=image_ids(h, w).to(device),
        txt_ids=torch.zeros(text["t5"].shape[1], 3, device=device),
        guidance=g,
        return_dict=False,
    )[0]
    return unpack(out.float(), h, w)


@torch.no_grad()
def sample(model: FluxTransformer2DModel, text: dict[str, torch.Tensor], latent_hw: tuple[int, int],
           latent_channels: int, seed: int, steps: int, guidance: float) -> torch.Tensor:
    """Euler sampling of the flow from noise (t=1) to image (t=0). Returns raw latents (1, C, h, w)."""
    h, w = latent_hw
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, latent_channels, h, w, generator=gen)
    sigmas = inference_sigmas(steps, (h // 2) * (w // 2))
    for s, s_next in itertools.pairwise(sigmas):
        v = predict(model, x, s.view(1), text, guidance)
        x = x + (s_next - s) * v
    return unscale_latents(x)
