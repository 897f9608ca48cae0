"""Key layouts of SDXL-family files (SDXL, Illustrious, Kohaku XL, Pony, Segmind Vega, SSD-1B) and the renames
between them and the diffusers / transformers classes the engine trains.

Layouts on disk, as users have them in ComfyUI's ``models/`` folders:

- all-in-one checkpoint (``models/checkpoints``, SGM/LDM layout):
  ``model.diffusion_model.``               UNet, LDM names (input_blocks / middle_block / output_blocks)
  ``conditioner.embedders.0.transformer.`` CLIP-L, transformers names (``text_model.…``), no projection
  ``conditioner.embedders.1.model.``       CLIP-G (bigG), OpenCLIP names (``transformer.resblocks.N``, fused
                                           ``attn.in_proj_weight``, ``text_projection`` (D, P) applied as x @ P)
  ``first_stage_model.``                   VAE, LDM names
  ``v_pred``, ``ztsnr``                    empty marker tensors of v-prediction (zero-terminal-SNR) models
- UNet alone (``models/diffusion_models``): LDM names, with or without ``model.diffusion_model.``.
- text encoders alone (``models/text_encoders``): transformers names (``text_model.…``, CLIP-G with
  ``text_projection.weight``) or OpenCLIP names without prefix.
- VAE alone (``models/vae``): LDM names.

The renames are tables over the block structure, which is read from the keys; widths come from the tensors.
Renamed tensors are the input tensors (split or transposed ones are views or new tensors), and a key that fits no
table raises ``ValueError``. The conventions not in the weights are SDXL's and ComfyUI's: 64-wide attention
heads, 32 GroupNorm groups, 256-wide size embeddings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .parts import CLIP_FILE_PREFIX, count_blocks

CKPT_UNET = "model.diffusion_model."
CKPT_CLIP_L = "conditioner.embedders.0.transformer."
CKPT_CLIP_G = "conditioner.embedders.1.model."
CKPT_VAE = "first_stage_model."
V_PRED_MARKER, ZTSNR_MARKER = "v_pred", "ztsnr"  # ComfyUI keys the model type on these (supported_models.py)
LDM_MARKER = "input_blocks.0.0.weight"
DIFFUSERS_MARKER = "conv_in.weight"
OPEN_CLIP_MARKER = "transformer.resblocks.0.ln_1.weight"
HEAD_DIM = 64  # ComfyUI hard-codes num_head_channels = 64 for the SDXL family
SIZE_EMBED_DIM = 256  # each of the 6 size values is embedded 256 wide (SDXL's add_time_ids)
_PARAMS = ("weight", "bias")

# ---------------------------------------------------------------- UNet: LDM (ComfyUI) <-> diffusers

# Whole-model modules, LDM -> diffusers.
_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",  # pooled text + 6 size embeddings -> time width
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
# Inside a ResBlock, LDM -> diffusers ResnetBlock2D. Transformer blocks keep their inner names in both.
_RESNET_LEAF = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",  # a 1x1 conv where the width changes
}


@dataclass(frozen=True)
class UNetLayout:
    """The block structure both layouts share, per level (up levels in diffusers order).

    ``layers``: resnets per down level (an up level has one more); ``*_attn``: the level's blocks carry a
    transformer; ``*_sample``: the level ends in a down-/upsampler.
    """
    layers: tuple[int, ...]
    down_attn: tuple[bool, ...]
    down_sample: tuple[bool, ...]
    up_attn: tuple[bool, ...]
    up_sample: tuple[bool, ...]


def _has_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def unet_layout_from_ldm(sd: Mapping[str, Any]) -> UNetLayout:
    """Walk ``input_blocks`` as ComfyUI's detector does: a block with ``0.op`` is a downsampler and closes a
    level; any other block is a ResBlock, with a transformer at ``.1`` on attention levels."""
    keys = list(sd)
    layers, down_attn, down_sample = [], [], []
    res, attn = 0, False
    for i in range(1, count_blocks(sd, "input_blocks.")):
        if f"input_blocks.{i}.0.op.weight" in sd:
            layers.append(res)
            down_attn.append(attn)
            down_sample.append(True)
            res, attn = 0, False
        else:
            res += 1
            attn = attn or _has_prefix(keys, f"input_blocks.{i}.1.")
    layers.append(res)
    down_attn.append(attn)
    down_sample.append(False)
    up_attn, up_sample = [], []
    n = 0
    for level in reversed(range(len(layers))):
        count = layers[level] + 1
        has_attn = _has_prefix(keys, f"output_blocks.{n}.1.") and f"output_blocks.{n}.1.conv.weight" not in sd
        up_attn.append(has_attn)
        up_sample.append(f"output_blocks.{n + count - 1}.{2 if has_attn else 1}.conv.weight" in sd)
        n += count
    if not _has_prefix(keys, "middle_block.1.transformer_blocks."):
        raise ValueError("middle_block.1 is not a transformer: not an SDXL-family UNet")
    return UNetLayout(tuple(layers), tuple(down_attn), tuple(down_sample), tuple(up_attn), tuple(up_sample))


def unet_layout_from_diffusers(sd: Mapping[str, Any]) -> UNetLayout:
    keys = list(sd)
    levels = count_blocks(sd, "down_blocks.")
    return UNetLayout(
        layers=tuple(count_blocks(sd, f"down_blocks.{i}.resnets.") for i in range(levels)),
        down_attn=tuple(_has_prefix(keys, f"down_blocks.{i}.attentions.") for i in range(levels)),
        down_sample=tuple(_has_prefix(keys, f"down_blocks.{i}.downsamplers.") for i in range(levels)),
        up_attn=tuple(_has_prefix(keys, f"up_blocks.{u}.attentions.") for u in range(levels)),
        up_sample=tuple(_has_prefix(keys, f"up_blocks.{u}.upsamplers.") for u in range(levels)))


def _unet_block_table(layout: UNetLayout) -> list[tuple[str, str, bool]]:
    """(LDM prefix, diffusers prefix, is a resnet) of every block.

    LDM numbers ``input_blocks`` 1.. over each level's resnets and downsampler, and ``output_blocks`` 0.. over
    the up levels (``layers + 1`` blocks each); an upsampler sits in its level's last output block, at ``.1``
    or, after a transformer, at ``.2``.
    """
    table = []
    n = 1
    for level, count in enumerate(layout.layers):
        for j in range(count):
            table.append((f"input_blocks.{n}.0.", f"down_blocks.{level}.resnets.{j}.", True))
            if layout.down_attn[level]:
                table.append((f"input_blocks.{n}.1.", f"down_blocks.{level}.attentions.{j}.", False))
            n += 1
        if layout.down_sample[level]:
            table.append((f"input_blocks.{n}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", False))
            n += 1
    table += [("middle_block.0.", "mid_block.resnets.0.", True),
              ("middle_block.1.", "mid_block.attentions.0.", False),
              ("middle_block.2.", "mid_block.resnets.1.", True)]
    n = 0
    for up, level in enumerate(reversed(range(len(layout.layers)))):
        count = layout.layers[level] + 1
        for j in range(count):
            table.append((f"output_blocks.{n}.0.", f"up_blocks.{up}.resnets.{j}.", True))
            if layout.up_attn[up]:
                table.append((f"output_blocks.{n}.1.", f"up_blocks.{up}.attentions.{j}.", False))
            if j == count - 1 and layout.up_sample[up]:
                slot = 2 if layout.up_attn[up] else 1
                table.append((f"output_blocks.{n}.{slot}.conv.", f"up_blocks.{up}.upsamplers.0.conv.", False))
            n += 1
    return table


def _rename_unet(sd: Mapping[str, torch.Tensor], table: list[tuple[str, str, bool]], top: Mapping[str, str],
                 leaf: Mapping[str, str], layout: str) -> dict[str, torch.Tensor]:
    ordered = sorted(table, key=lambda row: -len(row[0]))  # "input_blocks.3.0.op." before "input_blocks.3.0."
    out, unknown = {}, []
    for key, tensor in sd.items():
        module, _, param = key.rpartition(".")
        new = f"{top[module]}.{param}" if module in top and param in _PARAMS else None
        if new is None:
            src, dst, is_resnet = next((row for row in ordered if key.startswith(row[0])), ("", "", False))
            rest = key[len(src):]
            if src and is_resnet:
                renamed = next((to + rest[len(frm):] for frm, to in leaf.items() if rest.startswith(frm + ".")), None)
                new = dst + renamed if renamed else None
            elif src:
                new = dst + rest
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        raise ValueError(f"keys not in the {layout} SDXL UNet layout (first of {len(unknown)}): {sorted(unknown)[:5]}")
    return out


def unet_from_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM UNet keys (no ``model.diffusion_model.``) → diffusers ``UNet2DConditionModel`` keys, in order."""
    return _rename_unet(sd, _unet_block_table(unet_layout_from_ldm(sd)), _UNET_TOP, _RESNET_LEAF, "LDM")


def unet_to_ldm(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` keys → LDM keys, in order: the inverse of :func:`unet_from_ldm`."""
    table = [(diff, ldm, res) for ldm, diff, res in _unet_block_table(unet_layout_from_diffusers(sd))]
    return _rename_unet(sd, table, {v: k for k, v in _UNET_TOP.items()},
                        {v: k for k, v in _RESNET_LEAF.items()}, "diffusers")


def _depths(sd: Mapping[str, Any], prefix: str, count: int) -> list[int]:
    return [count_blocks(sd, f"{prefix}{j}.transformer_blocks.") for j in range(count)]


def _one_or_list(values: list[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else values


def unet_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments for a diffusers-keyed SDXL-family UNet, read from its shapes.

    From the weights: levels, resnets per level, widths, every transformer's depth, the context width,
    linear or convolution ``proj_in``, in/out channels and the add-embedding's input width (pooled text
    width + 6 x 256). Raises ValueError for a UNet diffusers cannot build (a middle block deeper than the last
    level's transformers).
    """
    layout = unet_layout_from_diffusers(sd)
    levels = len(layout.layers)
    widths = [sd[f"down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(levels)]
    down = [_one_or_list(_depths(sd, f"down_blocks.{i}.attentions.", layout.layers[i])) if layout.down_attn[i]
            else 1 for i in range(levels)]
    up = [_depths(sd, f"up_blocks.{u}.attentions.", layout.layers[levels - 1 - u] + 1) if layout.up_attn[u]
          else [1] * (layout.layers[levels - 1 - u] + 1) for u in range(levels)]
    mid = count_blocks(sd, "mid_block.attentions.0.transformer_blocks.")
    if down[-1] != mid:  # diffusers gives the middle block the last level's depth
        if layout.down_attn[-1]:
            raise ValueError(f"the middle block's depth {mid} differs from the last level's {down[-1]}: "
                             "diffusers cannot build this UNet")
        down[-1] = mid
    first = next(f"down_blocks.{i}.attentions.0." for i in range(levels) if layout.down_attn[i])
    config: dict[str, Any] = {
        "sample_size": 128,
        "in_channels": sd["conv_in.weight"].shape[1],
        "out_channels": sd["conv_out.weight"].shape[0],
        "block_out_channels": widths,
        "layers_per_block": _one_or_list(list(layout.layers)),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attn],
        "transformer_layers_per_block": down,
        "cross_attention_dim": sd[first + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
        "attention_head_dim": [max(1, w // HEAD_DIM) for w in widths],  # diffusers' name for the head count
        "use_linear_projection": sd[first + "proj_in.weight"].ndim == 2,
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SIZE_EMBED_DIM,
        "projection_class_embeddings_input_dim": sd["add_embedding.linear_1.weight"].shape[1],
    }
    mirrored = [[d if isinstance(d, int) else d[0]] * (layout.layers[levels - 1 - u] + 1)
                for u, d in enumerate(reversed(down))]
    if any(isinstance(d, list) for d in down) or any(up[u] != mirrored[u] for u in range(levels)
                                                      if layout.up_attn[u]):
        config["reverse_transformer_layers_per_block"] = up  # diffusers needs both lists then
        config["transformer_layers_per_block"] = [d if isinstance(d, list) else [d] * layout.layers[i]
                                                  for i, d in enumerate(down)]
    return config


# ---------------------------------------------------------------- CLIP-G: OpenCLIP <-> transformers

_OPEN_CLIP_TOP = {  # OpenCLIP key -> transformers key (classic names, with text_model.)
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",  # (V, D)
    "positional_embedding": "text_model.embeddings.position_embedding.weight",  # (77, D)
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_LAYER = {  # inside resblocks.N / encoder.layers.N
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_OPEN_CLIP_IGNORED = ("logit_scale", "attn_mask")  # no place in a text model
_RE_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_RE_RESBLOCK_QKV = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_RE_HF_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def clip_g_from_open_clip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower keys → ``CLIPTextModelWithProjection`` keys (classic ``text_model.`` names).

    ``attn.in_proj_*`` (3D, ...) splits into q | k | v rows, D read from the tensor; ``text_projection``
    (D, P), applied as x @ P, becomes the Linear weight P.T (P, D).
    """
    out, unknown = {}, []
    for key, tensor in sd.items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = tensor
        elif key == "text_projection":
            out["text_projection.weight"] = tensor.t().contiguous()
        elif m := _RE_RESBLOCK_QKV.match(key):
            for name, piece in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                out[f"text_model.encoder.layers.{m.group(1)}.{name}.{m.group(2)}"] = piece
        elif (m := _RE_RESBLOCK.match(key)) and m.group(2) in _OPEN_CLIP_LAYER:
            out[f"text_model.encoder.layers.{m.group(1)}.{_OPEN_CLIP_LAYER[m.group(2)]}.{m.group(3)}"] = tensor
        elif key not in _OPEN_CLIP_IGNORED:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys not in the OpenCLIP text layout (first of {len(unknown)}): {sorted(unknown)[:5]}")
    return out


def clip_g_to_open_clip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPTextModelWithProjection`` keys (either transformers naming) → OpenCLIP text tower keys: q, k, v
    fused into ``in_proj_*``, the projection transposed. The inverse of :func:`clip_g_from_open_clip`."""
    top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    layer = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
    out, unknown, fused = {}, [], {}
    for key, tensor in classic_clip_keys(sd).items():
        if key in top:
            out[top[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.t().contiguous()
        elif (m := _RE_HF_LAYER.match(key)) and (m.group(2) in _QKV or m.group(2) in layer):
            i, name, param = m.groups()
            if name in _QKV:
                fused.setdefault((i, param), {})[name] = tensor
            else:
                out[f"transformer.resblocks.{i}.{layer[name]}.{param}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys not in the transformers CLIP layout (first of {len(unknown)}): {sorted(unknown)[:5]}")
    for (i, param), qkv in fused.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([qkv[n] for n in _QKV])
    return out


def classic_clip_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP keys as files store them: ``text_model.`` in front of everything but the projection
    (transformers 5 names ``CLIPTextModel``'s modules without it); ``position_ids`` buffers dropped."""
    return {k if k.startswith((CLIP_FILE_PREFIX, "text_projection")) else CLIP_FILE_PREFIX + k: v
            for k, v in sd.items() if not k.endswith("position_ids")}


def clip_file_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in any layout ComfyUI reads (OpenCLIP keys; transformers keys, with the projection as
    ``text_projection.weight`` (P, D) or as a bare OpenCLIP-style ``text_projection`` (D, P) of older saves) →
    classic transformers keys."""
    if OPEN_CLIP_MARKER in sd:
        return clip_g_from_open_clip(sd)
    out = classic_clip_keys({k: v for k, v in sd.items() if k != "text_projection"})
    if "text_projection" in sd:
        out["text_projection.weight"] = sd["text_projection"].t().contiguous()
    return out


# ---------------------------------------------------------------- whole files


def unet_file_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet of a single file (prefix already dropped) under diffusers names: LDM keys are renamed,
    diffusers keys kept. ValueError saying what was expected for anything else."""
    if LDM_MARKER in sd:
        return unet_from_ldm(sd)
    if DIFFUSERS_MARKER in sd:
        return dict(sd)
    raise ValueError(f"expected keys like '{LDM_MARKER}' (ComfyUI/LDM, alone or under '{CKPT_UNET}' in a "
                     f"checkpoint) or '{DIFFUSERS_MARKER}' (diffusers), found {', '.join(list(sd)[:3])}")


def checkpoint_state_dict(unet: Mapping[str, torch.Tensor], clip_l: Mapping[str, torch.Tensor],
                          clip_g: Mapping[str, torch.Tensor], vae_ldm: Mapping[str, torch.Tensor],
                          v_prediction: bool = False, zero_terminal_snr: bool = False) -> dict[str, torch.Tensor]:
    """An all-in-one checkpoint ComfyUI's CheckpointLoaderSimple loads: a diffusers UNet, transformers CLIP-L
    and CLIP-G and an LDM VAE under their prefixes and layouts, as ComfyUI's CheckpointSave writes them (CLIP-L
    without a projection but with ``position_ids``; CLIP-G in OpenCLIP names with ``logit_scale``), and the
    model-type markers."""
    out = {CKPT_UNET + k: v for k, v in unet_to_ldm(unet).items()}
    classic_l = classic_clip_keys(clip_l)
    out.update((CKPT_CLIP_L + k, v) for k, v in classic_l.items() if not k.startswith("text_projection"))
    positions = classic_l[CLIP_FILE_PREFIX + "embeddings.position_embedding.weight"].shape[0]
    out[CKPT_CLIP_L + CLIP_FILE_PREFIX + "embeddings.position_ids"] = torch.arange(positions)[None]
    out.update((CKPT_CLIP_G + k, v) for k, v in clip_g_to_open_clip(clip_g).items())
    out[CKPT_CLIP_G + "logit_scale"] = torch.tensor(4.6052)  # ln 100, as released files have
    out.update((CKPT_VAE + k, v) for k, v in vae_ldm.items())
    if v_prediction:
        out[V_PRED_MARKER] = torch.tensor([])
        if zero_terminal_snr:
            out[ZTSNR_MARKER] = torch.tensor([])
    return out
