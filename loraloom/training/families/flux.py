"""Flux.1 (dev, dev2pro, schnell): the transformer, CLIP-L + T5-XXL, the 16-channel VAE, rectified flow.

Shapes: latents are raw VAE latents (B, 16, H/8, W/8); the transformer sees them scaled and packed into
2×2 patches, (B, H/16·W/16, 64). T5 embeddings (B, T, 4096), CLIP pooled (B, 768) at real width.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...loaders.files import ModelFileError, read_safetensors
from ..errors import ConfigError
from ..objectives import inference_sigmas
from ..precision import assign_weights
from . import parts
from .base import DENOISER, Family, FullSize, Geometry, ModelFile, TinyModel, TokenizerFolder
from .flux_layout import transformer_from_bfl, transformer_to_bfl
from .flux_vae import FluxVaeFlowMatching, image_tokens, unscale_latents

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from ..config import ModelConfig, RunConfig, TrainConfig

# peft target patterns (regex, full match) over diffusers module names.
_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
_ATTN_DOUBLE = r"attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_ATTN_SINGLE = r"attn\.(to_q|to_k|to_v)"
_MLP_DOUBLE = r"(ff|ff_context)\.net\.(0\.proj|2)"
_MLP_SINGLE = r"(proj_mlp|proj_out)"
_MOD_DOUBLE = r"(norm1|norm1_context)\.linear"
_MOD_SINGLE = r"norm\.linear"
TARGETS = {
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
    max_length: int = 512  # T5 tokens per caption


# ---------------------------------------------------------------- transformer


def transformer_config_from_bfl(sd: dict[str, torch.Tensor]) -> dict:
    """Diffusers constructor arguments read from the shapes of a BFL-layout state dict."""
    hidden, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return {
        "in_channels": in_channels,
        "num_layers": parts.count_blocks(sd, "double_blocks."),
        "num_single_layers": parts.count_blocks(sd, "single_blocks."),
        "attention_head_dim": head_dim,
        "num_attention_heads": hidden // head_dim,
        "joint_attention_dim": sd["txt_in.weight"].shape[1],
        "pooled_projection_dim": sd["vector_in.in_layer.weight"].shape[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in sd,
        # Flux's (16, 56, 56) for head 128; the same proportions for test-sized heads.
        "axes_dims_rope": (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16),
    }


def load_transformer(path: str | Path, compute_dtype: torch.dtype, fp8_storage: bool = False,
                     allow_pickle: bool = False) -> FluxTransformer2DModel:
    """A Flux transformer from a BFL/ComfyUI single file, a diffusers-keyed file, or a diffusers folder.

    fp8 linear weights stay fp8 when ``fp8_storage`` (see :mod:`..precision`); everything else is stored in
    ``compute_dtype``.
    """
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    path = Path(path)
    if path.is_dir():
        config, sd = parts.read_diffusers_folder(path, "transformer", "the Flux transformer", allow_pickle)
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


def _not_flux(path: Path, sd: dict) -> ModelFileError:
    sample = ", ".join(list(sd)[:3])
    return ModelFileError(
        f"{path} is not a Flux transformer: expected keys like '{BFL_MARKER}' (BFL/ComfyUI) or "
        f"'{DIFFUSERS_MARKER}' (diffusers), found {sample}. Check model.diffusion_model points at a Flux file.")


# ---------------------------------------------------------------- text encoders


def load_text_encoders(cfg: ModelConfig, dtype: torch.dtype) -> TextEncoders:
    """CLIP-L and T5 with their tokenizers, from single files (HF keys) or folders."""
    from transformers import CLIPTextModel, T5EncoderModel

    clip_tok = parts.load_tokenizer(cfg.tokenizer, cfg.text_encoder, "tokenizer", "model.tokenizer",
                                    "ComfyUI/comfy/sd1_tokenizer")
    t5_tok = parts.load_tokenizer(cfg.tokenizer_2, cfg.text_encoder_2, "tokenizer_2", "model.tokenizer_2",
                                  "ComfyUI/comfy/text_encoders/t5_tokenizer")
    clip = parts.load_hf_encoder(cfg.text_encoder, "text_encoder", CLIPTextModel, parts.clip_config, clip_tok, dtype,
                                 marker="embeddings.token_embedding.weight",
                                 checkpoint_prefixes=("text_encoders.clip_l.transformer.",),
                                 allow_pickle=cfg.allow_pickle)
    t5 = parts.load_hf_encoder(cfg.text_encoder_2, "text_encoder_2", T5EncoderModel, _t5_config, t5_tok, dtype,
                               marker="shared.weight", checkpoint_prefixes=("text_encoders.t5xxl.transformer.",),
                               allow_pickle=cfg.allow_pickle)
    return TextEncoders(clip, clip_tok, t5, t5_tok, cfg.text_length)


def _t5_config(sd: dict, tokenizer) -> T5Config:
    from transformers import T5Config

    base = json.loads((parts.CONFIG_DIR / "t5xxl.json").read_text())
    vocab, d_model = sd["shared.weight"].shape
    heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape[1]
    base.update(
        vocab_size=vocab, d_model=d_model, num_heads=heads,
        d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"].shape[1],
        num_layers=parts.count_blocks(sd, "encoder.block."),
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
    t5_ids = enc.t5_tokenizer(prompts, padding="max_length", max_length=enc.max_length,
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


def image_ids(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Positions of the packed tokens of an (h, w) latent: (h/2·w/2, 3) = (0, row, col). Made on ``device``: a
    copy from the host would wait for the GPU."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device)
    ids[..., 1] = torch.arange(h // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def velocity(model: FluxTransformer2DModel, x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
             guidance: float) -> torch.Tensor:
    """The transformer's velocity. x: scaled latents (B, C, h, w); t: (B,) in [0, 1]; text from encode_prompts.

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
        img_ids=image_ids(h, w, device),
        txt_ids=torch.zeros(text["t5"].shape[1], 3, device=device),
        guidance=g,
        return_dict=False,
    )[0]
    return unpack(out.float(), h, w)


class Flux(FluxVaeFlowMatching, Family):
    name = "flux"
    title = "Flux"
    architecture = "flux-1-dev"
    files = (
        ModelFile("diffusion_model", "transformer", "diffusion_models", "The Flux transformer (dev2pro, dev, ...)."),
        ModelFile("text_encoder", "clip_l", "text_encoders", "CLIP-L (clip_l.safetensors)."),
        ModelFile("text_encoder_2", "t5", "text_encoders", "T5-XXL (t5xxl_fp16.safetensors, fp8 files too)."),
        ModelFile("vae", "vae", "vae", "The Flux VAE (ae.safetensors)."),
    )
    tokenizers = (
        TokenizerFolder("tokenizer", "clip_tokenizer", "sd1_tokenizer", "CLIP tokenizer folder"),
        TokenizerFolder("tokenizer_2", "t5_tokenizer", "text_encoders/t5_tokenizer", "T5 tokenizer folder"),
    )
    bucket_divisor = 16  # VAE factor 8 x 2x2 latent patches
    caption_format = "tags"
    text_length = 512  # T5 tokens per caption: Flux-dev's; schnell uses 256
    targets = TARGETS
    quantized = TARGETS["all_linear"]
    node_options = ("base_precision", "guidance_distilled", "text_length")
    # diffusers' names under transformer.: stock ComfyUI and diffusers' Flux loader read them with peft's suffixes.
    export_suffixes: ClassVar[dict[str, str]] = {"lora_down.weight": "lora_A.weight",
                                                 "lora_up.weight": "lora_B.weight"}
    node_note = "Train on a de-distilled base (Flux-dev2pro) at guidance 1.0 and apply the result to Flux-dev."

    def resolve_train(self, train: TrainConfig) -> TrainConfig:
        return dataclasses.replace(train, timesteps="auto_shift" if train.timesteps == "auto" else train.timesteps,
                                   shift=train.shift or 3.0)

    def warnings(self, cfg: RunConfig) -> list[str]:
        if cfg.model.guidance_distilled and cfg.train.guidance != 1.0:
            return [f"training a guidance-distilled base at train.guidance = {cfg.train.guidance}: the guidance "
                    "embedding drifts and LoRAs collapse. Train a de-distilled base (e.g. Flux-dev2pro) at 1.0 and "
                    "apply the LoRA to Flux-dev."]
        return []

    def example(self) -> dict[str, dict[str, Any]]:
        """Flux-dev2pro at guidance 1.0; the LoRA is applied to Flux-dev afterwards."""
        return {"model": dict(
            diffusion_model="ComfyUI/models/diffusion_models/flux1-dev2pro-fp8.safetensors",
            text_encoder="ComfyUI/models/text_encoders/clip_l.safetensors",
            text_encoder_2="ComfyUI/models/text_encoders/t5xxl_fp16.safetensors",
            tokenizer="ComfyUI/comfy/sd1_tokenizer", tokenizer_2="ComfyUI/comfy/text_encoders/t5_tokenizer",
            vae="ComfyUI/models/vae/ae.safetensors"),
            "data": {"resolution": 512}, "train": {"guidance": 1.0}, "sample": {"guidance": 3.5}}

    def load_denoiser(self, model: ModelConfig, dtype: torch.dtype, keep_float8: bool) -> torch.nn.Module:
        return load_transformer(model.diffusion_model, dtype, keep_float8, model.allow_pickle)

    def load_text_encoder(self, model: ModelConfig, dtype: torch.dtype) -> TextEncoders:
        return load_text_encoders(model, dtype)

    def text_encoder_to(self, text: TextEncoders, device: torch.device) -> None:
        text.clip.to(device)
        text.t5.to(device)

    def encode_text(self, text: TextEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
        return encode_prompts(text, captions)

    def predict(self, model: torch.nn.Module, inputs: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                geometry: list[Geometry], guidance: float) -> torch.Tensor:
        return velocity(model, inputs, t, text, guidance)

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, text: dict[str, torch.Tensor], size: tuple[int, int],
               latent_hw: tuple[int, int], seed: int, steps: int, guidance: float,
               negative: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Euler steps of the flow from noise (t=1) to image (t=0) on Flux's shifted schedule; ``guidance`` is the
        model's guidance input, so ``negative`` is not used."""
        h, w = latent_hw
        x = torch.randn(1, self.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))
        sigmas = inference_sigmas(steps, image_tokens(h, w))
        for s, s_next in itertools.pairwise(sigmas):
            x = x + (s_next - s) * velocity(model, x, s.view(1), text, guidance)
        return unscale_latents(x)

    def export_key(self, component: str, module: str) -> str:
        if component != DENOISER:
            raise ValueError(f"Flux trains no {component}")
        return EXPORT_PREFIX + module

    def native_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """BFL keys (``double_blocks.N.img_attn.qkv`` fused, ...), as flux1-dev.safetensors."""
        return transformer_to_bfl(denoiser_state)

    def metadata(self, cfg: RunConfig) -> dict[str, str]:
        return {"ss_network_module": "networks.lora_flux", "ss_base_model_version": "flux1",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux"}

    def tiny(self, seed: int = 0, words: tuple[str, ...] = (), real_width: bool = False) -> TinyModel:
        from .flux_kit import REAL_WIDTH, TINY, build

        return build(REAL_WIDTH if real_width else TINY, seed, words)

    def full_size(self) -> FullSize:
        """Flux.1-dev / dev2pro: 19 double and 38 single blocks of width 3072, T5-XXL (512 tokens) and CLIP-L."""
        from diffusers import FluxTransformer2DModel

        with torch.device("meta"):
            model = FluxTransformer2DModel(
                in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        return FullSize(model.requires_grad_(False).eval(), 8,
                        {"t5": torch.randn(self.text_length, 4096), "pooled": torch.randn(768)})

    def write_tiny(self, tiny: TinyModel, folder: Path, diffusers: bool = True) -> dict[str, Path]:
        from .flux_kit import write

        return write(tiny, folder, diffusers)

    def comfy_text(self, clip: Any, caption: str, length: int, system_prompt: str = "") -> dict[str, torch.Tensor]:
        """ComfyUI pads Flux's T5 input to at least 256 tokens and never cuts it; a run needs one length, since
        batches are stacked, so every caption is padded the same way (ComfyUI's own ``t5xxl_min_length``
        option) to ``length`` tokens and cut there, keeping the end token, as the engine's encoders do. At 256,
        short captions are encoded exactly as CLIPTextEncode encodes a prompt."""
        tokens = clip.tokenize(caption, disable_weights=True, tokenizer_options={"t5xxl_min_length": length})
        if "t5xxl" not in tokens:
            raise ConfigError(f"the CLIP input has text encoders {sorted(tokens)}, not Flux's T5-XXL and CLIP-L: "
                              "load them with DualCLIPLoader, type flux")
        # One section (ComfyUI's T5 limit is 99999999 tokens); longer than ``length``: keep its end token.
        tokens["t5xxl"] = [s[:length - 1] + s[-1:] if len(s) > length else s for s in tokens["t5xxl"]]
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return {"t5": cond[0].float().cpu(), "pooled": pooled[0].float().cpu()}

    def comfy_conditioning(self, text: dict[str, torch.Tensor], guidance: float) -> list:
        """``[[t5 (1, T, D), {"pooled_output": (1, D_clip), "guidance": g}]]``."""
        return [[text["t5"][None], {"pooled_output": text["pooled"][None], "guidance": guidance}]]
