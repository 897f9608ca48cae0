"""Lumina 2 (NextDiT: Lumina-Image-2.0, Illustrious-LU, NetaYume): the transformer, Gemma-2-2B, the 16-channel VAE.

Shapes: latents are raw VAE latents (B, 16, H/8, W/8); the transformer sees them scaled as ComfyUI's
``latent_formats.Flux`` and cuts them into 2×2 patches itself. Text embeddings are Gemma-2-2B's hidden layer -2
(before the final norm), (B, T, 2304), with a mask (B, T): the system prompt and the caption, right-padded to
``model.text_length`` tokens with zeros.

Time: Lumina 2's network counts time the other way (1 = clean; diffusers' pipeline feeds it ``1 - t`` and negates
its output, ComfyUI's NextDiT does both inside). At this family's boundary the engine's velocity at engine time t
(0 = clean) is ``v = -model(x_t, 1 - t)``; :func:`velocity` is the one place that converts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from ...loaders.files import ModelFileError, find_weights, read_safetensors, strip_prefix
from ..errors import ConfigError
from ..objectives import shift_timesteps
from ..precision import assign_weights
from . import parts
from .base import DENOISER, Family, FullSize, Geometry, ModelFile, TinyModel
from .flux_vae import FluxVaeFlowMatching, unscale_latents
from .lumina2_layout import (
    DIFFUSERS_MARKER,
    FUSED_QKV,
    NATIVE_MARKER,
    config_from_native,
    module_to_native,
    transformer_from_native,
    transformer_to_native,
)

if TYPE_CHECKING:
    from diffusers import Lumina2Transformer2DModel
    from diffusers.models.attention_processor import Attention
    from sentencepiece import SentencePieceProcessor
    from transformers import Gemma2Config, Gemma2Model

    from ..config import ModelConfig, RunConfig, TrainConfig

log = logging.getLogger(__name__)

# ComfyUI samples Lumina 2 with ModelSamplingDiscreteFlow at this shift (its ModelSamplingAuraFlow node sets
# others: 4 in NetaYume's template); also the family's training shift.
SHIFT = 6.0
SIGMA_TABLE = 1000  # entries of that sampler's sigma table, which the "simple" scheduler strides through

# What Lumina 2 reads before every caption (ComfyUI's CLIPTextEncodeLumina2 choices; diffusers' default is
# "superior"). Fine-tunes bring their own, e.g. NetaYume's "You are an assistant designed to generate high quality
# anime images based on textual prompts.": model.system_prompt takes any text.
SYSTEM_PROMPTS = {
    "superior": "You are an assistant designed to generate superior images with the superior degree of image-text "
                "alignment based on textual prompts or user prompts.",
    "alignment": "You are an assistant designed to generate high-quality images with the highest degree of "
                 "image-text alignment based on textual prompts.",
}
PROMPT_SEPARATOR = " <Prompt Start> "

# Gemma 2 as ComfyUI reads it: the sentencepiece model rides in the file as a uint8 tensor; an all-in-one
# checkpoint holds both under text_encoders.; the head size is not in the shapes (ComfyUI fixes it too).
TOKENIZER_KEY = "spiece_model"
TOKENIZER_FILE = "tokenizer.model"  # the same sentencepiece model in a Hugging Face / diffusers tokenizer folder
CHECKPOINT_TEXT = "text_encoders."
CHECKPOINT_GEMMA = "gemma2_2b.transformer."
GEMMA_MARKER = "layers.0.post_feedforward_layernorm.weight"  # Gemma 2 has it, Gemma 1 and Llama do not
GEMMA_HEAD_DIM = 256
BOS = 2
CAPTION_POSITIONS = 300  # diffusers' caption RoPE table (299 tokens); longer text lengths get a longer one

# peft target patterns (regex, full match) over the fused diffusers model's module names; the refiner blocks
# are trained too (the context refiner has no modulation).
_BLOCK = r"(layers|noise_refiner|context_refiner)\.\d+\."
_ATTN = rf"attn\.({FUSED_QKV.removeprefix('attn.')}|to_out\.0)"
_MLP = r"feed_forward\.linear_[123]"
TARGETS = {
    "attention": rf"^{_BLOCK}{_ATTN}$",
    "attention_mlp": rf"^{_BLOCK}({_ATTN}|{_MLP})$",
    "all_linear": rf"^{_BLOCK}({_ATTN}|{_MLP}|norm1\.linear)$",
}
# Exported keys: native names under this prefix are the only ones ComfyUI's loader maps for Lumina 2.
EXPORT_PREFIX = "diffusion_model."


# ---------------------------------------------------------------- the transformer, with one qkv projection


class FusedLumina2AttnProcessor:
    """diffusers' ``Lumina2AttnProcessor2_0`` maths reading q, k and v from one ``attn.to_qkv`` Linear.

    ComfyUI's NextDiT has one ``attention.qkv`` (q + 2kv, D); training that matrix lets every adapter algorithm
    (LoKr and LoHa too, whose updates do not split into blocks) export under the name ComfyUI patches.
    Shapes: hidden_states (B, L, D) → (B, L, q + 2kv), q = heads·head_dim, kv = kv_heads·head_dim;
    attention_mask (B, L), True = attend, or None; image_rotary_emb (B, L, head_dim/2) complex. Returns (B, L, D).
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None,
                 base_sequence_length: int | None = None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        # Lumina 2 blocks pass encoder_hidden_states = hidden_states: self-attention only.
        batch, length, _ = hidden_states.shape
        qkv = attn.to_qkv(hidden_states)
        query, key, value = qkv.split([attn.inner_dim, attn.inner_kv_dim, attn.inner_kv_dim], dim=-1)
        head_dim = attn.inner_dim // attn.heads
        kv_heads = attn.inner_kv_dim // head_dim
        dtype = query.dtype
        query = query.view(batch, length, attn.heads, head_dim)
        key = key.view(batch, length, kv_heads, head_dim)
        value = value.view(batch, length, kv_heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        scale = attn.scale
        if base_sequence_length is not None:  # "proportional attention"; the pipelines never ask for it
            scale = math.sqrt(math.log(length, base_sequence_length)) * attn.scale
        # Grouped-query: kv head j serves the heads/kv_heads consecutive query heads from j·heads/kv_heads.
        repeat = attn.heads // kv_heads
        key = key.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
        value = value.unsqueeze(3).repeat(1, 1, 1, repeat, 1).flatten(2, 3)
        if attention_mask is not None:
            attention_mask = attention_mask.bool().view(batch, 1, 1, -1)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attention_mask, scale=scale)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def fuse_qkv(model: torch.nn.Module) -> int:
    """Give every Lumina 2 attention of ``model`` one ``to_qkv`` Linear (``to_q | to_k | to_v`` concatenated, the
    old Linears deleted) and :class:`FusedLumina2AttnProcessor`; in place, also on a meta-device model. Call before
    an adapter wraps the model. Returns how many attentions were fused."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0

    count = 0
    for attn in model.modules():
        if not (isinstance(attn, Attention) and isinstance(attn.processor, Lumina2AttnProcessor2_0)):
            continue
        projections = (attn.to_q, attn.to_k, attn.to_v)
        weight = torch.cat([p.weight.detach() for p in projections], dim=0)
        fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device,
                                dtype=weight.dtype)
        if weight.device.type != "meta":
            fused.weight.data.copy_(weight)
        fused.requires_grad_(attn.to_q.weight.requires_grad)
        del attn.to_q, attn.to_k, attn.to_v
        attn.to_qkv = fused
        attn.set_processor(FusedLumina2AttnProcessor())
        count += 1
    return count


def load_transformer(path: str | Path, compute_dtype: torch.dtype, fp8_storage: bool = False,
                     allow_pickle: bool = False, caption_positions: int = CAPTION_POSITIONS
                     ) -> Lumina2Transformer2DModel:
    """The Lumina 2 transformer, its qkv fused, from a native single file (no prefix, ``model.diffusion_model.``
    as in all-in-one checkpoints, or a bare ``diffusion_model.``), a diffusers-keyed file or a diffusers folder.

    Widths come from the shapes. fp8 linear weights stay fp8 when ``fp8_storage`` (see :mod:`..precision`),
    everything else is stored in ``compute_dtype``. ``caption_positions``: see :func:`.config_from_native`.
    """
    from accelerate import init_empty_weights
    from diffusers import Lumina2Transformer2DModel

    path = Path(path)
    if path.is_dir():
        config, sd = parts.read_diffusers_folder(path, "transformer", "the Lumina 2 transformer", allow_pickle)
        if DIFFUSERS_MARKER not in sd:
            raise _not_lumina2(path, sd)
        config["axes_lens"] = (max(config.get("axes_lens", (CAPTION_POSITIONS,))[0], caption_positions), 512, 512)
        sd = _converted(path, lambda: transformer_from_native(transformer_to_native(sd)))
    else:
        sd = read_safetensors([path], what="the Lumina 2 transformer", allow_pickle=allow_pickle,
                              prefixes=("model.diffusion_model.", "diffusion_model."))
        if DIFFUSERS_MARKER in sd:
            sd = _converted(path, lambda: transformer_to_native(sd))
        if NATIVE_MARKER not in sd:
            raise _not_lumina2(path, sd)
        config = _converted(path, lambda: config_from_native(sd, caption_positions))
        sd = _converted(path, lambda: transformer_from_native(sd))
    with init_empty_weights():
        model = Lumina2Transformer2DModel(**config)
    fuse_qkv(model)
    assign_weights(model, sd, compute_dtype, fp8_storage, path)
    return model.requires_grad_(False).eval()


def _converted(path: Path, convert):
    """``convert()``, with a layout error turned into one that names the file."""
    try:
        return convert()
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: not a complete Lumina 2 transformer ({e}); the file may be truncated or of "
                             "another model") from None


def _not_lumina2(path: Path, sd: dict) -> ModelFileError:
    return ModelFileError(
        f"{path} is not a Lumina 2 transformer: expected keys like '{NATIVE_MARKER}' (native / ComfyUI) or "
        f"'{DIFFUSERS_MARKER}' (diffusers), found {', '.join(list(sd)[:3])}. Check model.diffusion_model points at a "
        "Lumina 2 file (lumina_2_model_bf16.safetensors, an Illustrious-LU or NetaYume checkpoint).")


# ---------------------------------------------------------------- Gemma-2-2B


def prompt_text(caption: str, system_prompt: str) -> str:
    """What Lumina 2 reads for a caption: ``<system prompt> <Prompt Start> <caption>``, the caption alone without
    a system prompt."""
    return f"{system_prompt}{PROMPT_SEPARATOR}{caption}" if system_prompt else caption


@dataclass
class CaptionEncoder:
    """Gemma 2 cut after the layer whose output Lumina 2 reads, with its sentencepiece tokenizer."""
    gemma: Gemma2Model  # the file's layers but the last, final norm replaced by Identity
    tokenizer: SentencePieceProcessor
    length: int  # tokens per caption, BOS and system prompt included
    system_prompt: str
    cut: int = 0  # captions cut to ``length`` so far (the first one is logged)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (B, length) with BOS first, right-padded with 0 (ComfyUI's pad id), and the mask (B, length), 1 for a
        token. Longer rows are cut: ComfyUI would keep them, but a run's captions share one length."""
        rows = [[BOS, *self.tokenizer.encode(prompt_text(c, self.system_prompt))] for c in captions]
        ids = torch.zeros(len(rows), self.length, dtype=torch.long)
        mask = torch.zeros(len(rows), self.length, dtype=torch.long)
        for i, row in enumerate(rows):
            if len(row) > self.length:
                if not self.cut:
                    log.warning("a caption of %d tokens (system prompt included) was cut to model.text_length = %d: "
                                "%r", len(row), self.length, captions[i][:80])
                self.cut += 1
                row = row[:self.length]
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return ids, mask

    @torch.no_grad()
    def encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """{"gemma": (B, length, C) float32, zero where padded; "mask": (B, length) float32}.

        Gemma reads the tokens up to the longest caption: one caption is encoded unpadded, exactly as ComfyUI
        encodes a prompt, and right-padding never changes the tokens before it (causal attention)."""
        ids, mask = self.tokenize(captions)
        n = int(mask.sum(1).max())
        hidden = self.gemma(input_ids=ids[:, :n].to(self.gemma.device)).last_hidden_state.float().cpu()
        out = torch.zeros(len(captions), self.length, hidden.shape[-1])
        out[:, :n] = hidden * mask[:, :n, None]
        return {"gemma": out, "mask": mask.float()}


def gemma_config(sd: dict[str, torch.Tensor]) -> Gemma2Config:
    """Gemma2Config from the shapes of a Gemma2Model state dict (no ``model.`` prefix), as ComfyUI builds it: head
    size 256, no attention-logit soft-cap (ComfyUI has none)."""
    from transformers import Gemma2Config

    vocab, hidden = sd["embed_tokens.weight"].shape
    return Gemma2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=parts.count_blocks(sd, "layers."),
        intermediate_size=sd["layers.0.mlp.gate_proj.weight"].shape[0],
        num_attention_heads=sd["layers.0.self_attn.q_proj.weight"].shape[0] // GEMMA_HEAD_DIM,
        num_key_value_heads=sd["layers.0.self_attn.k_proj.weight"].shape[0] // GEMMA_HEAD_DIM,
        head_dim=GEMMA_HEAD_DIM, query_pre_attn_scalar=GEMMA_HEAD_DIM, attn_logit_softcapping=None,
        final_logit_softcapping=None, pad_token_id=0, eos_token_id=1, bos_token_id=BOS)


def load_caption_encoder(model: ModelConfig, dtype: torch.dtype) -> CaptionEncoder:
    """Gemma-2-2B and its tokenizer from ComfyUI's ``text_encoders`` file (tokenizer inside as ``spiece_model``),
    an all-in-one checkpoint, a Hugging Face-keyed file, or a folder (Gemma's own or a diffusers pipeline's)."""
    path = Path(model.text_encoder)
    config: dict | None = None
    if path.is_dir():
        folder = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelFileError(f"{folder}: no readable config.json ({e}); expected Gemma-2-2B's folder or a "
                                 "diffusers pipeline with text_encoder/") from None
        sd = read_safetensors(find_weights(folder, model.allow_pickle), "Gemma-2-2B", model.allow_pickle)
    else:
        sd = read_safetensors([path], what="Gemma-2-2B", allow_pickle=model.allow_pickle, prefixes=(CHECKPOINT_TEXT,))
        sd = {k.removeprefix(CHECKPOINT_GEMMA): v for k, v in sd.items()}
    proto = sd.pop(TOKENIZER_KEY, None)
    sd.pop("lm_head.weight", None)  # a causal-LM file's head, tied to the embeddings
    sd = strip_prefix(sd, ("model.",))
    if GEMMA_MARKER not in sd:
        raise ModelFileError(f"{path} is not a Gemma 2 text encoder: expected the key 'model.{GEMMA_MARKER}', found "
                             f"{', '.join(list(sd)[:3])}. Lumina 2 reads Gemma-2-2B (gemma_2_2b_fp16.safetensors).")
    tokenizer = _load_tokenizer(model, path, proto)
    return CaptionEncoder(truncated_gemma(sd, config, dtype, path), tokenizer, model.text_length,
                          model.system_prompt)


def truncated_gemma(sd: dict[str, torch.Tensor], config: dict | None, dtype: torch.dtype, path: Path
                     ) -> Gemma2Model:
    """Gemma2Model with the file's layers but the last and an Identity for the final norm: hidden layer -2 is the
    output of the last layer it keeps."""
    from accelerate import init_empty_weights
    from transformers import Gemma2Config, Gemma2Model

    if config is None:
        settings = gemma_config(sd).to_dict()
    else:
        settings = {k: v for k, v in config.items() if not k.startswith("_")}
        settings.update(attn_logit_softcapping=None)  # as ComfyUI runs it
    layers = settings["num_hidden_layers"]
    if layers < 2:
        raise ModelFileError(f"{path}: Gemma with {layers} layer(s); Lumina 2 reads the output of the next-to-last "
                             "layer, so it needs at least 2")
    keep = layers - 1
    settings["num_hidden_layers"] = keep
    if settings.get("layer_types"):
        settings["layer_types"] = settings["layer_types"][:keep]
    settings.pop("torch_dtype", None)
    settings.pop("dtype", None)
    gemma_settings = Gemma2Config(**settings)
    gemma_settings._attn_implementation = "eager"  # transformers runs Gemma 2 no other way
    with init_empty_weights():  # parameters on meta; buffers (RoPE, the embedding scale) real
        gemma = Gemma2Model(gemma_settings)
    gemma.norm = torch.nn.Identity()
    dead = (f"layers.{keep}.", "norm.")
    weights = {k: v.to(dtype) for k, v in sd.items() if not k.startswith(dead)}
    try:
        gemma.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: weights do not match a Gemma 2 of these shapes ({str(e)[:200]})") from None
    return gemma.requires_grad_(False).eval()


def _load_tokenizer(model: ModelConfig, path: Path, proto: torch.Tensor | None) -> SentencePieceProcessor:
    """The sentencepiece model: ``model.tokenizer`` (a folder with tokenizer.model, or the file), else the one the
    text encoder file carries, else a tokenizer.model beside a text encoder folder."""
    from sentencepiece import SentencePieceProcessor

    candidates = [Path(model.tokenizer)] if model.tokenizer else []
    if not candidates and proto is not None:
        return SentencePieceProcessor(model_proto=proto.numpy().tobytes())
    if path.is_dir():
        candidates += [path, path / "tokenizer", path.parent / "tokenizer"]
    for candidate in candidates:
        file = candidate / TOKENIZER_FILE if candidate.is_dir() else candidate
        if file.is_file():
            return SentencePieceProcessor(model_file=str(file))
    raise ModelFileError(
        f"no Gemma tokenizer for {path}: the file carries no '{TOKENIZER_KEY}' tensor and no {TOKENIZER_FILE} was "
        f"found{' in ' + model.tokenizer if model.tokenizer else ''}. Use ComfyUI's gemma_2_2b file (it carries "
        f"the tokenizer), or set model.tokenizer to a folder holding Gemma-2-2B's {TOKENIZER_FILE}.")


# ---------------------------------------------------------------- the transformer's view


def velocity(model: Lumina2Transformer2DModel, x: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor]
             ) -> torch.Tensor:
    """The engine's velocity ``noise - x0`` at engine time t: ``-model(x_t, 1 - t)``.

    x: scaled latents (B, 16, h, w), h and w even; t: (B,) in [0, 1], 0 = clean; text: "gemma" (B, T, C) and "mask"
    (B, T) from :meth:`CaptionEncoder.encode`. Padding every caption of the batch shares is dropped first: masked
    tokens change nothing, and ComfyUI sees captions unpadded. Returns (B, 16, h, w) float32.
    """
    device = next(model.parameters()).device
    mask = text["mask"] > 0
    n = int(mask.sum(1).max())
    out = model(hidden_states=x.to(device), timestep=(1 - t).to(device),
                encoder_hidden_states=text["gemma"][:, :n].to(device), encoder_attention_mask=mask[:, :n].to(device),
                return_dict=False)[0]
    return -out.float()


def comfy_sigmas(steps: int, shift: float = SHIFT) -> torch.Tensor:
    """The ``steps + 1`` sigmas (= engine times, 1 to 0) of ComfyUI's "simple" scheduler on Lumina 2's sampler:
    every (1000/steps)-th entry of the table ``shift·u / (1 + (shift-1)·u)``, u = i/1000, from the top, then 0."""
    table = shift_timesteps(torch.arange(1, SIGMA_TABLE + 1, dtype=torch.float64) / SIGMA_TABLE, shift)
    stride = SIGMA_TABLE / steps
    return torch.tensor([*(table[-(1 + int(i * stride))] for i in range(steps)), 0.0], dtype=torch.float32)


class Lumina2(FluxVaeFlowMatching, Family):
    name = "lumina2"
    title = "Lumina2"  # ComfyUI's spelling (CLIPLoader type lumina2, CLIPTextEncodeLumina2)
    architecture = "lumina-2"
    files = (
        ModelFile("diffusion_model", "transformer", "diffusion_models",
                  "The Lumina 2 transformer (lumina_2_model_bf16.safetensors, Illustrious-LU, NetaYume, ...)."),
        ModelFile("text_encoder", "gemma", "text_encoders", "Gemma-2-2B (gemma_2_2b_fp16.safetensors)."),
        ModelFile("vae", "vae", "vae", "The Flux VAE (ae.safetensors)."),
    )
    bucket_divisor = 16  # VAE factor 8 x 2x2 patches
    caption_format = "text"  # Lumina 2 and its fine-tunes read natural language (tags work as text too)
    text_length = 256  # diffusers' max_sequence_length, system prompt included
    system_prompt = SYSTEM_PROMPTS["superior"]
    negative_caption = ""  # previews guide against the empty caption, as ComfyUI's templates do
    targets = TARGETS
    quantized = TARGETS["all_linear"]
    node_options = ("base_precision", "text_length", "system_prompt")
    export_suffixes: ClassVar[dict[str, str]] = {"lora_down.weight": "lora_A.weight",
                                                 "lora_up.weight": "lora_B.weight"}
    node_note = ("Captions in natural language; the system prompt ('auto': Lumina 2's \"superior\" one) is read "
                 "before each, as CLIPTextEncodeLumina2 does.")

    def resolve_train(self, train: TrainConfig) -> TrainConfig:
        return dataclasses.replace(train, timesteps="shift" if train.timesteps == "auto" else train.timesteps,
                                   shift=train.shift or SHIFT)

    def example(self) -> dict[str, dict[str, Any]]:
        """Lumina-Image-2.0 at its native 1024 px; previews at ComfyUI templates' cfg 4."""
        return {"model": dict(
            diffusion_model="ComfyUI/models/diffusion_models/lumina_2_model_bf16.safetensors",
            text_encoder="ComfyUI/models/text_encoders/gemma_2_2b_fp16.safetensors",
            vae="ComfyUI/models/vae/ae.safetensors"),
            "data": {"resolution": 1024}, "sample": {"guidance": 4.0, "steps": 25}}

    def load_denoiser(self, model: ModelConfig, dtype: torch.dtype, keep_float8: bool) -> torch.nn.Module:
        return load_transformer(model.diffusion_model, dtype, keep_float8, model.allow_pickle,
                                max(CAPTION_POSITIONS, model.text_length + 1))

    def load_text_encoder(self, model: ModelConfig, dtype: torch.dtype) -> CaptionEncoder:
        return load_caption_encoder(model, dtype)

    def text_encoder_to(self, text: CaptionEncoder, device: torch.device) -> None:
        text.gemma.to(device)

    def encode_text(self, text: CaptionEncoder, captions: list[str]) -> dict[str, torch.Tensor]:
        return text.encode(captions)

    def predict(self, model: torch.nn.Module, inputs: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                geometry: list[Geometry], guidance: float) -> torch.Tensor:
        return velocity(model, inputs, t, text)

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, text: dict[str, torch.Tensor], size: tuple[int, int],
               latent_hw: tuple[int, int], seed: int, steps: int, guidance: float,
               negative: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Euler steps from noise (t=1) to image (t=0) on the sigmas a stock ComfyUI graph uses (shift 6, "simple"),
        with classifier-free guidance at scale ``guidance`` against ``negative`` when both are given."""
        h, w = latent_hw
        x = torch.randn(1, self.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))
        guided = negative is not None and guidance != 1.0
        cond = {k: torch.cat([v, negative[k]]) for k, v in text.items()} if guided else text
        for s, s_next in itertools.pairwise(comfy_sigmas(steps)):
            v = velocity(model, x.expand(len(cond["mask"]), -1, -1, -1), s.expand(len(cond["mask"])), cond)
            if guided:
                v = v[1:] + guidance * (v[:1] - v[1:])
            x = x + (s_next - s) * v
        return unscale_latents(x)

    def export_key(self, component: str, module: str) -> str:
        if component != DENOISER:
            raise ValueError(f"Lumina 2 trains no {component}")
        return EXPORT_PREFIX + module_to_native(module)

    def native_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """NextDiT keys (``layers.N.attention.qkv`` fused, ...), as lumina_2_model_bf16.safetensors."""
        return transformer_to_native(denoiser_state)

    def metadata(self, cfg: RunConfig) -> dict[str, str]:
        return {"ss_network_module": "networks.lora_lumina", "ss_base_model_version": "lumina2",
                "modelspec.implementation": "https://github.com/Alpha-VLLM/Lumina-Image-2.0"}

    def tiny(self, seed: int = 0, words: tuple[str, ...] = (), real_width: bool = False) -> TinyModel:
        from .lumina2_kit import REAL_WIDTH, TINY, build

        return build(REAL_WIDTH if real_width else TINY, seed, words)

    def full_size(self) -> FullSize:
        """Lumina-Image-2.0's transformer (2.6B parameters, projections fused as loaded); Gemma-2-2B features of
        ``text_length`` tokens, every one a caption's."""
        from diffusers import Lumina2Transformer2DModel

        from .lumina2_kit import FULL, transformer_config

        with torch.device("meta"):
            model = Lumina2Transformer2DModel(**transformer_config(FULL))
        fuse_qkv(model)
        return FullSize(model.requires_grad_(False).eval(), 8, {
            "gemma": torch.randn(self.text_length, FULL.gemma_width), "mask": torch.ones(self.text_length)})

    def write_tiny(self, tiny: TinyModel, folder: Path, diffusers: bool = True) -> dict[str, Path]:
        from .lumina2_kit import write

        return write(tiny, folder, diffusers)

    def comfy_text(self, clip: Any, caption: str, length: int, system_prompt: str = "") -> dict[str, torch.Tensor]:
        """ComfyUI's Lumina 2 CLIP (CLIPLoader type lumina2, or a checkpoint's) reads BOS + the prompt, unpadded and
        uncut; the caption is cut to ``length`` tokens and padded with zeros as the engine's encoder does, so the
        embeddings are the engine's. The system prompt goes in front as CLIPTextEncodeLumina2 puts it."""
        tokens = clip.tokenize(prompt_text(caption, system_prompt), disable_weights=True)
        if "gemma2_2b" not in tokens:
            raise ConfigError(f"the CLIP input has text encoders {sorted(tokens)}, not Lumina 2's Gemma-2-2B: load "
                              "it with CLIPLoader, type lumina2")
        tokens["gemma2_2b"] = [section[:length] for section in tokens["gemma2_2b"][:1]]
        hidden = clip.encode_from_tokens(tokens)[0].float().cpu()  # (n, C)
        n = len(tokens["gemma2_2b"][0])
        padded = torch.zeros(length, hidden.shape[-1])
        padded[:n] = hidden[:n]
        return {"gemma": padded, "mask": (torch.arange(length) < n).float()}

    def comfy_conditioning(self, text: dict[str, torch.Tensor], guidance: float) -> list:
        """``[[gemma (1, n, C), {"attention_mask": (1, n)}]]`` with the caption's n tokens, as ComfyUI's encoder
        gives it: the mask sets NextDiT's token count. Unpadded, because ComfyUI batches a positive and a negative
        of equal length, and its padded-batch mask would then hide image tokens of the shorter one."""
        n = int(text["mask"].sum())
        return [[text["gemma"][None, :n], {"attention_mask": torch.ones(1, n, dtype=torch.long)}]]
