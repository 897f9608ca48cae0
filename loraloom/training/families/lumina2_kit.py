"""Small random Lumina 2 models written in the file layouts users have: the family's tiny-model kit.

:func:`build` makes the transformer (its qkv fused, as the family loads it), a Gemma 2 with ComfyUI's fixed head size
256 and a sentencepiece tokenizer, and the 16-channel VAE. :func:`write` writes them as the native single file
(bf16, an fp8 variant and one under a bare ``diffusion_model.`` prefix), ComfyUI's Gemma file with the tokenizer
inside (``spiece_model``), a Hugging Face-keyed Gemma file with a tokenizer folder, an LDM ``ae.safetensors``, an
all-in-one checkpoint and a diffusers pipeline folder, all from one seeded build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, Lumina2Transformer2DModel
from transformers import Gemma2Config, Gemma2Model

from ...loaders.files import atomic_save_safetensors, atomic_write_bytes
from ..tiny_models import WORDS, to_fp8
from .base import TinyModel
from .flux_layout import vae_to_ldm
from .lumina2 import (
    BOS,
    CAPTION_POSITIONS,
    CHECKPOINT_GEMMA,
    CHECKPOINT_TEXT,
    GEMMA_HEAD_DIM,
    PROMPT_SEPARATOR,
    SYSTEM_PROMPTS,
    TOKENIZER_FILE,
    TOKENIZER_KEY,
    CaptionEncoder,
    Lumina2,
    fuse_qkv,
    truncated_gemma,
)
from .lumina2_layout import ffn_arguments, rope_axes, transformer_from_native, transformer_to_native

if TYPE_CHECKING:
    from sentencepiece import SentencePieceProcessor


@dataclass(frozen=True)
class Lumina2Size:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    refiners: int  # noise_refiner and context_refiner blocks each
    gemma_width: int  # = the transformer's caption width
    gemma_heads: int  # of ComfyUI's fixed size 256
    gemma_kv_heads: int
    gemma_ff: int
    gemma_layers: int = 3  # ComfyUI reads layer -2 only from a Gemma of more than 2 layers
    vae_widths: tuple[int, ...] = (32, 32, 64)  # multiples of 32: the Flux VAE's norm groups


# Grouped-query like the real 24/8 heads: 2 query heads share 1 kv head (head_dim 32).
TINY = Lumina2Size(hidden=64, heads=2, kv_heads=1, layers=2, refiners=1, gemma_width=64, gemma_heads=2,
                   gemma_kv_heads=1, gemma_ff=128)
# The smallest model stock ComfyUI detects as Lumina 2 with every weight used: dim 2304, 24/8 heads (hard-coded by
# its detection), exactly 2 + 2 refiner blocks (never read from the file), one layer; about 0.43B parameters. Gemma
# at the real width (the caption width), with real head counts, a narrow MLP and 3 layers: ComfyUI builds it through
# model_options["gemma2_2b_model_config"].
REAL_WIDTH = Lumina2Size(hidden=2304, heads=24, kv_heads=8, layers=1, refiners=2, gemma_width=2304, gemma_heads=8,
                         gemma_kv_heads=4, gemma_ff=256)
# Lumina-Image-2.0: 26 layers and 2 + 2 refiner blocks of width 2304; Gemma-2-2B.
FULL = Lumina2Size(hidden=2304, heads=24, kv_heads=8, layers=26, refiners=2, gemma_width=2304, gemma_heads=8,
                   gemma_kv_heads=4, gemma_ff=9216, gemma_layers=26)


def transformer_config(size: Lumina2Size) -> dict:
    """``Lumina2Transformer2DModel`` arguments of ``size``'s transformer."""
    return dict(sample_size=16, patch_size=2, in_channels=16, hidden_size=size.hidden, num_layers=size.layers,
                num_refiner_layers=size.refiners, num_attention_heads=size.heads, num_kv_heads=size.kv_heads,
                **ffn_arguments(size.hidden, 4 * size.hidden), norm_eps=1e-5,
                axes_dim_rope=rope_axes(size.hidden // size.heads), axes_lens=(CAPTION_POSITIONS, 512, 512),
                cap_feat_dim=size.gemma_width)


def build(size: Lumina2Size = TINY, seed: int = 0, words: tuple[str, ...] = ()) -> TinyModel:
    """Every Lumina 2 part, randomly initialised from ``seed`` (fp32); ``words`` join the tokenizer's vocabulary.

    Norm weights are perturbed from their initial values, so that a conversion mixing up norms shows."""
    from sentencepiece import SentencePieceProcessor  # here: FULL's users (gpu.py on a bare image) need no tokenizer

    tokenizer = SentencePieceProcessor(model_proto=tokenizer_proto(words))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = Lumina2Transformer2DModel(**transformer_config(size))
        gemma = Gemma2Model(Gemma2Config(
            vocab_size=tokenizer.get_piece_size(), hidden_size=size.gemma_width, intermediate_size=size.gemma_ff,
            num_hidden_layers=size.gemma_layers, num_attention_heads=size.gemma_heads,
            num_key_value_heads=size.gemma_kv_heads, head_dim=GEMMA_HEAD_DIM, query_pre_attn_scalar=GEMMA_HEAD_DIM,
            attn_logit_softcapping=None, final_logit_softcapping=None, pad_token_id=0, eos_token_id=1,
            bos_token_id=BOS))
        n = len(size.vae_widths)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=size.vae_widths,
                            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            layers_per_block=1, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                            scaling_factor=0.3611, shift_factor=0.1159)
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.add_(0.1 * torch.randn_like(p))
            for name, p in gemma.named_parameters():
                if "norm" in name:  # Gemma's RMSNorm scales by (1 + w), w initialised at 0
                    p.normal_(0, 0.1)
    fuse_qkv(transformer)  # as the loader does
    text = _as_encoder(gemma, tokenizer)
    return TinyModel(transformer.requires_grad_(False).eval(), vae.eval(), text)


@dataclass
class TinyCaptionEncoder(CaptionEncoder):
    """The engine's encoder, with the whole Gemma it was cut from: the files hold every layer."""
    full: Gemma2Model | None = None


def _as_encoder(gemma: Gemma2Model, tokenizer: SentencePieceProcessor) -> TinyCaptionEncoder:
    """The engine's encoder over ``gemma``: its layers but the last, as the loader builds it from a file."""
    truncated = truncated_gemma(dict(gemma.state_dict()), None, torch.float32, Path("<tiny Gemma>"))
    return TinyCaptionEncoder(truncated, tokenizer, Lumina2.text_length, Lumina2.system_prompt, full=gemma.eval())


def tokenizer_proto(words: tuple[str, ...] = ()) -> bytes:
    """A serialized sentencepiece unigram model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and byte
    fallback: a piece per word of a small English vocabulary plus ``words`` (with and without the leading
    ``▁``), single characters, and the family's system prompts with their separator as one piece each, so that
    a test's short text length still holds the caption."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    model = spm.ModelProto()
    piece_type = spm.ModelProto.SentencePiece
    seen: set[str] = set()

    def add(piece: str, score: float, kind: int) -> None:
        if piece not in seen:
            seen.add(piece)
            model.pieces.add(piece=piece, score=score, type=kind)

    for piece, kind in (("<pad>", piece_type.CONTROL), ("<eos>", piece_type.CONTROL), ("<bos>", piece_type.CONTROL),
                        ("<unk>", piece_type.UNKNOWN)):
        add(piece, 0.0, kind)
    for prompt in SYSTEM_PROMPTS.values():
        add((prompt + PROMPT_SEPARATOR.rstrip()).replace(" ", "▁"), 0.0, piece_type.USER_DEFINED)
    for byte in range(256):
        add(f"<0x{byte:02X}>", 0.0, piece_type.BYTE)
    for word in dict.fromkeys([*WORDS, *(w.lower() for w in words), "<Prompt", "Start>"]):
        add("▁" + word, -1.0, piece_type.NORMAL)  # whole words beat their letters in the unigram's best path
        add(word, -1.5, piece_type.NORMAL)
    add("▁", -3.0, piece_type.NORMAL)
    for char in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.-_:;!?()'\"":
        add(char, -5.0, piece_type.NORMAL)
    trainer = model.trainer_spec
    trainer.model_type = spm.TrainerSpec.UNIGRAM
    trainer.vocab_size = len(model.pieces)
    trainer.byte_fallback = True
    trainer.pad_id, trainer.eos_id, trainer.bos_id, trainer.unk_id = 0, 1, BOS, 3
    trainer.pad_piece, trainer.eos_piece, trainer.bos_piece, trainer.unk_piece = "<pad>", "<eos>", "<bos>", "<unk>"
    normalizer = model.normalizer_spec  # Gemma's: text as is, spaces as ▁, no dummy prefix
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def write(tiny: TinyModel, folder: str | Path, diffusers: bool = True) -> dict[str, Path]:
    """Write ``tiny`` in every user layout under ``folder``; returns the paths by ModelConfig slot, plus
    ``diffusion_model_fp8``, ``diffusion_model_prefixed`` (under a bare ``diffusion_model.``), ``checkpoint``,
    ``text_encoder_hf`` (Gemma in Hugging Face keys, no tokenizer inside) with ``gemma_tokenizer`` (a folder with
    tokenizer.model) and, with ``diffusers``, ``diffusers``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text: TinyCaptionEncoder = tiny.text
    native = transformer_to_native(tiny.denoiser.state_dict())
    bf16 = {k: v.to(torch.bfloat16) for k, v in native.items()}
    proto = text.tokenizer.serialized_model_proto()
    spiece = torch.frombuffer(bytearray(proto), dtype=torch.uint8)
    gemma_sd = {f"model.{k}": v.contiguous() for k, v in text.full.state_dict().items()}
    paths = {
        "diffusion_model": folder / "lumina2-tiny.safetensors",
        "diffusion_model_fp8": folder / "lumina2-tiny-fp8-e4m3fn.safetensors",
        "diffusion_model_prefixed": folder / "lumina2-tiny-prefixed.safetensors",
        "text_encoder": folder / "gemma_2_2b-tiny.safetensors",
        "text_encoder_hf": folder / "gemma-hf" / "model.safetensors",
        "gemma_tokenizer": folder / "gemma-hf",
        "vae": folder / "ae.safetensors",
        "checkpoint": folder / "lumina2-tiny-checkpoint.safetensors",
    }
    atomic_save_safetensors(bf16, paths["diffusion_model"])
    atomic_save_safetensors(to_fp8(native), paths["diffusion_model_fp8"])
    atomic_save_safetensors({f"diffusion_model.{k}": v for k, v in bf16.items()}, paths["diffusion_model_prefixed"])
    atomic_save_safetensors({**gemma_sd, TOKENIZER_KEY: spiece}, paths["text_encoder"])
    paths["gemma_tokenizer"].mkdir(exist_ok=True)
    atomic_save_safetensors(gemma_sd, paths["text_encoder_hf"])
    atomic_write_bytes(paths["gemma_tokenizer"] / TOKENIZER_FILE, proto)
    vae_sd = vae_to_ldm(tiny.vae.state_dict())
    atomic_save_safetensors(vae_sd, paths["vae"])
    # ComfyUI's all-in-one layout (lumina_2.safetensors, NetaYume): the tokenizer beside the Gemma weights.
    bundle = {"model.diffusion_model.": bf16, f"{CHECKPOINT_TEXT}{CHECKPOINT_GEMMA}": gemma_sd,
              CHECKPOINT_TEXT: {TOKENIZER_KEY: spiece}, "vae.": vae_sd}
    atomic_save_safetensors({prefix + k: v for prefix, sd in bundle.items() for k, v in sd.items()},
                            paths["checkpoint"])
    if diffusers:
        paths["diffusers"] = _write_diffusers(tiny, native, proto, folder / "diffusers")
    return paths


def _write_diffusers(tiny: TinyModel, native: dict[str, torch.Tensor], proto: bytes, root: Path) -> Path:
    """A diffusers Lumina2Pipeline folder: the transformer in diffusers' own split q/k/v layout."""
    transformer = root / "transformer"
    transformer.mkdir(parents=True, exist_ok=True)
    tiny.denoiser.save_config(transformer)
    split = {k: v.contiguous() for k, v in transformer_from_native(native, fused_qkv=False).items()}
    atomic_save_safetensors(split, transformer / "diffusion_pytorch_model.safetensors")
    tiny.vae.save_pretrained(root / "vae")
    tiny.text.full.save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir(exist_ok=True)
    atomic_write_bytes(root / "tokenizer" / TOKENIZER_FILE, proto)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Lumina2Pipeline"}))
    return root
