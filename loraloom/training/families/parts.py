"""Parts several families share, loaded from the files users have: diffusers folders, transformers text
encoders with their tokenizers, and AutoencoderKL VAEs (Flux and Lumina 2 share one, SDXL has its own).

diffusers, transformers and accelerate are imported by the functions that load models: they take seconds to
import, and ``loraloom dataset inspect`` needs only the families' constants.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ...loaders.files import ModelFileError, find_weights, read_safetensors

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

CONFIG_DIR = Path(__file__).with_name("configs")
# Files on disk use the classic transformers keys (``text_model.`` for CLIP); some transformers versions
# name the same module without that prefix, so both are accepted.
CLIP_FILE_PREFIX = "text_model."
LDM_VAE_MARKER = "encoder.down.0.block.0.conv1.weight"


def count_blocks(sd: dict, prefix: str) -> int:
    """1 + the largest N of keys ``<prefix>N.…`` (0 when there are none)."""
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


class KeyReader:
    """Hands out a state dict's tensors by key and remembers which were taken, so a key rename table drops no key
    silently: :meth:`check_all_used` names every key no rule took."""

    def __init__(self, sd: Mapping[str, torch.Tensor], layout: str):
        self.sd, self.layout, self.used = sd, layout, set[str]()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise KeyError(f"{self.layout} state dict lacks {key!r}")
        self.used.add(key)
        return self.sd[key]

    def skip(self, key: str) -> None:
        """Take ``key`` (when present) without using it: a tensor the other layout has no place for."""
        if key in self.sd:
            self.used.add(key)

    def check_all_used(self) -> None:
        unknown = sorted(set(self.sd) - self.used)
        if unknown:
            raise ValueError(f"keys not in the {self.layout} layout (first of {len(unknown)}): {unknown[:5]}")


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


# ---------------------------------------------------------------- text encoders


def load_tokenizer(explicit: str, encoder_path: str, sibling: str, key: str, hint: str) -> Any:
    """A transformers tokenizer from ``explicit``, else beside a text encoder folder (itself, ``sibling``/)."""
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
                         f"(for example {hint}, or the {sibling}/ folder of a diffusers model)")


def load_hf_encoder(path: str, subfolder: str, cls: type, config_fn: Callable[[dict, Any], Any], tokenizer: Any,
                    dtype: torch.dtype, marker: str, checkpoint_prefixes: tuple[str, ...], allow_pickle: bool,
                    convert: Callable[[dict], dict] | None = None) -> Any:
    """A frozen transformers text encoder from a folder, a single file (HF keys) or an all-in-one checkpoint.

    ``checkpoint_prefixes``: where an all-in-one file keeps it; ``convert`` renames another key layout (e.g.
    OpenCLIP's) to transformers' before ``marker`` is looked for.
    """
    from accelerate import init_empty_weights

    p = Path(path)
    if p.is_dir():
        folder = p / subfolder if (p / subfolder / "config.json").exists() else p
        # use_safetensors: transformers would otherwise fall back to a pickled pytorch_model.bin.
        model = cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True,
                                    use_safetensors=not allow_pickle)
        return model.requires_grad_(False).eval()
    sd = read_safetensors([p], what=f"the {cls.__name__}", allow_pickle=allow_pickle, prefixes=checkpoint_prefixes)
    try:
        sd = convert(sd) if convert else sd
    except ValueError as e:
        raise ModelFileError(f"{p}: not a {cls.__name__} file ({e})") from None
    sd = {k.removeprefix(CLIP_FILE_PREFIX): v for k, v in sd.items()}
    if marker not in sd:
        raise ModelFileError(f"{p} is not a {cls.__name__} file: expected the key '{marker}', found "
                             f"{', '.join(list(sd)[:3])}")
    with init_empty_weights():
        model = cls(config_fn(sd, tokenizer))
    expected = model.state_dict()

    def fit(key: str) -> str:  # the model's own name: with text_model. or without, per module
        return key if key in expected else CLIP_FILE_PREFIX + key
    sd = {fit(k): v.to(dtype) for k, v in sd.items() if fit(k) in expected}
    # T5's encoder.embed_tokens is tied to shared and often absent from files.
    if "encoder.embed_tokens.weight" in expected and "encoder.embed_tokens.weight" not in sd:
        sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    try:
        model.load_state_dict(sd, assign=True, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{p}: weights do not match a {cls.__name__} ({str(e)[:200]})") from None
    return model.requires_grad_(False).eval()


def clip_config(sd: dict, tokenizer: Any, base: str = "clip_l.json", **fixed: Any) -> CLIPTextConfig:
    """CLIPTextConfig from the shapes of an HF-keyed CLIP text model state dict (``text_model.`` stripped)."""
    from transformers import CLIPTextConfig

    config = json.loads((CONFIG_DIR / base).read_text())
    vocab, hidden = sd["embeddings.token_embedding.weight"].shape
    config.update(
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=sd["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=count_blocks(sd, "encoder.layers."),
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=sd["embeddings.position_embedding.weight"].shape[0],
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, **fixed,
    )
    return CLIPTextConfig(**config)


# ---------------------------------------------------------------- VAE


def load_vae(path: str | Path, what: str = "the VAE", dtype: torch.dtype = torch.float32,
             allow_pickle: bool = False) -> AutoencoderKL:
    """An AutoencoderKL from a single file (LDM/BFL keys or diffusers keys, alone or under ``vae.`` /
    ``first_stage_model.`` in an all-in-one checkpoint) or a diffusers folder; widths read from the shapes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = Path(path)
    if path.is_dir():
        config, sd = read_diffusers_folder(path, "vae", what, allow_pickle)
    else:
        sd = read_safetensors([path], what=what, allow_pickle=allow_pickle, prefixes=("vae.", "first_stage_model."))
        if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
            raise ModelFileError(f"{path} is not a VAE: expected keys 'encoder.conv_in.weight' and "
                                 f"'decoder.conv_out.weight'. Check model.vae points at {what}.")
        config = vae_config_from_shapes(sd)
        if LDM_VAE_MARKER in sd:
            sd = convert_ldm_vae_checkpoint(sd, config)
    with init_empty_weights():
        vae = AutoencoderKL(**config)
    try:
        vae.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True, strict=True)
    except RuntimeError as e:
        raise ModelFileError(f"{path}: VAE weights do not match the expected layout ({str(e)[:200]})") from None
    return vae.requires_grad_(False).eval()


def vae_config_from_shapes(sd: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKL arguments from an LDM- or diffusers-keyed VAE state dict."""
    if LDM_VAE_MARKER in sd:
        n = count_blocks(sd, "encoder.down.")
        widths = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(n)]
        layers = count_blocks(sd, "encoder.down.0.block.")
    else:
        n = count_blocks(sd, "encoder.down_blocks.")
        widths = [sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(n)]
        layers = count_blocks(sd, "encoder.down_blocks.0.resnets.")
    config = json.loads((CONFIG_DIR / "vae.json").read_text())
    config.update(
        block_out_channels=widths, layers_per_block=layers, latent_channels=sd["decoder.conv_in.weight"].shape[1],
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
