"""Key renames from diffusers layouts to the single-file layouts ComfyUI users have on disk.

These are the exact inverses of diffusers' own loaders,
``diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers`` and
``...convert_ldm_vae_checkpoint``: ``convert(to_x(sd))`` gives back every key of ``sd`` with an identical
tensor. Used to write tiny random models in the BFL/ComfyUI layouts, and to export full fine-tunes.

Both functions are pure: the input dict is not changed. Renamed tensors are the input tensors
themselves (no copy); fused, swapped or reshaped ones are new tensors or views. Every input key must be
recognised; an unknown one raises ``ValueError`` rather than being dropped silently.

Notation in shapes: H = hidden width (heads × head_dim, 3072 in Flux.1), M = MLP width (4·H),
C = channels of a VAE block.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .parts import KeyReader

__all__ = ["transformer_from_bfl", "transformer_to_bfl", "vae_to_ldm"]

# --------------------------------------------------------------------------------------------------
# Flux transformer: diffusers FluxTransformer2DModel -> Black Forest Labs flux1-dev.safetensors
# --------------------------------------------------------------------------------------------------

# Whole-model one-to-one renames (module prefixes; ".weight"/".bias" are appended).
_FLUX_TOP: dict[str, str] = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    # Only in guidance-distilled models (guidance_embeds=True, e.g. dev); schnell has none.
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
# final_layer.adaLN_modulation.1 (2H, H): BFL orders its output (shift, scale), diffusers'
# AdaLayerNormContinuous (scale, shift); the loader swaps the halves, so we swap them back.
_FLUX_SWAPPED: dict[str, str] = {"norm_out.linear": "final_layer.adaLN_modulation.1"}

# Double-stream block i: diffusers "transformer_blocks.{i}.<k>" -> BFL "double_blocks.{i}.<v>".
_DOUBLE_RENAME: dict[str, str] = {
    "norm1.linear.weight": "img_mod.lin.weight",  # (6H, H)
    "norm1.linear.bias": "img_mod.lin.bias",
    "norm1_context.linear.weight": "txt_mod.lin.weight",
    "norm1_context.linear.bias": "txt_mod.lin.bias",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",  # (head_dim,) RMSNorm
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_out.0.weight": "img_attn.proj.weight",  # (H, H)
    "attn.to_out.0.bias": "img_attn.proj.bias",
    "attn.to_add_out.weight": "txt_attn.proj.weight",
    "attn.to_add_out.bias": "txt_attn.proj.bias",
    "ff.net.0.proj.weight": "img_mlp.0.weight",  # (M, H)
    "ff.net.0.proj.bias": "img_mlp.0.bias",
    "ff.net.2.weight": "img_mlp.2.weight",  # (H, M)
    "ff.net.2.bias": "img_mlp.2.bias",
    "ff_context.net.0.proj.weight": "txt_mlp.0.weight",
    "ff_context.net.0.proj.bias": "txt_mlp.0.bias",
    "ff_context.net.2.weight": "txt_mlp.2.weight",
    "ff_context.net.2.bias": "txt_mlp.2.bias",
}
# Fused projections: BFL target module <- diffusers modules concatenated in this order along dim 0
# (the loader splits them back with chunk(3) / split(H, H, H, M)).
_DOUBLE_FUSED: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),  # (3H, H)
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),  # (3H, H)
}

# Single-stream block i: diffusers "single_transformer_blocks.{i}.<k>" -> BFL "single_blocks.{i}.<v>".
_SINGLE_RENAME: dict[str, str] = {
    "norm.linear.weight": "modulation.lin.weight",  # (3H, H)
    "norm.linear.bias": "modulation.lin.bias",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "proj_out.weight": "linear2.weight",  # (H, H + M)
    "proj_out.bias": "linear2.bias",
}
_SINGLE_FUSED: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),  # (3H + M, H)
}

_PARAMS = ("weight", "bias")
# (BFL block prefix, diffusers block prefix, one-to-one renames, fused projections) per kind of block.
_BLOCKS = (("double_blocks.", "transformer_blocks.", _DOUBLE_RENAME, _DOUBLE_FUSED),
           ("single_blocks.", "single_transformer_blocks.", _SINGLE_RENAME, _SINGLE_FUSED))


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a; b) -> (b; a) along dim 0. Self-inverse, so it undoes diffusers' ``swap_scale_shift``."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _block_indices(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pattern.match(k))})


def transformer_to_bfl(sd: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Diffusers ``FluxTransformer2DModel.state_dict()`` -> BFL ``flux1-dev.safetensors`` keys.

    Fused tensors, with H the hidden width and M = 4H the MLP width, both read from the tensors:

    - ``double_blocks.{i}.img_attn.qkv.weight`` (3H, H) = to_q | to_k | to_v, bias (3H,);
      ``txt_attn.qkv`` likewise from add_q_proj | add_k_proj | add_v_proj;
    - ``single_blocks.{i}.linear1.weight`` (3H + M, H) = to_q | to_k | to_v | proj_mlp, bias (3H + M,);
    - ``final_layer.adaLN_modulation.1.weight`` (2H, H) = ``norm_out.linear`` with its halves swapped
      (BFL: shift, scale; diffusers: scale, shift).

    ``guidance_in.*`` is written only when the model has ``time_text_embed.guidance_embedder`` (dev);
    diffusers' loader detects guidance by the presence of any key containing "guidance".

    ``prefix`` is prepended to every output key: "" for the BFL / ComfyUI ``diffusion_models`` file,
    ``"model.diffusion_model."`` for a ComfyUI full checkpoint (diffusers' loader strips that prefix).

    Note: diffusers' loader hard-codes H = 3072 when splitting ``linear1``, so it can read back only
    real-width files; this function itself has no width built in.
    """
    out: dict[str, torch.Tensor] = {}
    take = KeyReader(sd, "diffusers Flux")

    def put(key: str, tensor: torch.Tensor) -> None:
        out[prefix + key] = tensor

    for src, dst in _FLUX_TOP.items():
        if src.startswith("time_text_embed.guidance_embedder") and f"{src}.weight" not in sd:
            continue  # guidance_embeds=False
        for p in _PARAMS:
            put(f"{dst}.{p}", take(f"{src}.{p}"))
    for src, dst in _FLUX_SWAPPED.items():
        for p in _PARAMS:
            put(f"{dst}.{p}", _swap_halves(take(f"{src}.{p}")))

    for bfl_prefix, diffusers_prefix, renames, fusions in _BLOCKS:
        for i in _block_indices(sd, diffusers_prefix):
            src, dst = f"{diffusers_prefix}{i}.", f"{bfl_prefix}{i}."
            for k, v in renames.items():
                put(dst + v, take(src + k))
            for fused, parts in fusions.items():
                for p in _PARAMS:
                    put(f"{dst}{fused}.{p}", torch.cat([take(f"{src}{part}.{p}") for part in parts], dim=0))

    take.check_all_used()
    return out



def transformer_from_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL ``flux1-dev.safetensors`` keys -> diffusers ``FluxTransformer2DModel`` keys: the inverse of
    :func:`transformer_to_bfl`, from the same tables.

    Unlike diffusers' own converter, widths come from the tensors: fused ``qkv`` (3H, H) splits in three,
    ``linear1`` (3H + M, H) into H, H, H and the rest, with H = ``img_in.weight.shape[0]``.
    """
    out: dict[str, torch.Tensor] = {}
    take = KeyReader(sd, "BFL Flux")
    hidden = sd["img_in.weight"].shape[0]
    for dst, src in _FLUX_TOP.items():
        if src.startswith("guidance_in") and f"{src}.weight" not in sd:
            continue
        for p in _PARAMS:
            out[f"{dst}.{p}"] = take(f"{src}.{p}")
    for dst, src in _FLUX_SWAPPED.items():
        for p in _PARAMS:
            out[f"{dst}.{p}"] = _swap_halves(take(f"{src}.{p}"))
    for bfl_prefix, diffusers_prefix, renames, fusions in _BLOCKS:
        for i in _block_indices(sd, bfl_prefix):
            src, dst = f"{bfl_prefix}{i}.", f"{diffusers_prefix}{i}."
            for k, v in renames.items():
                out[dst + k] = take(src + v)
            for fused, parts in fusions.items():
                for p in _PARAMS:
                    whole = take(f"{src}{fused}.{p}")
                    sizes = [hidden] * (len(parts) - 1) + [whole.shape[0] - hidden * (len(parts) - 1)]
                    for part, piece in zip(parts, torch.split(whole, sizes, dim=0)):
                        out[f"{dst}{part}.{p}"] = piece
    take.check_all_used()
    return out

# --------------------------------------------------------------------------------------------------
# VAE: diffusers AutoencoderKL -> LDM / BFL ae.safetensors
# --------------------------------------------------------------------------------------------------

# Whole-model one-to-one renames (full keys). quant_conv / post_quant_conv exist only in SD-style VAEs;
# the Flux VAE has neither (use_quant_conv=False, use_post_quant_conv=False).
_VAE_TOP: dict[str, str] = {
    f"{part}.{name}.{p}": f"{part}.{ldm}.{p}"
    for part in ("encoder", "decoder")
    for name, ldm in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out"))
    for p in _PARAMS
} | {f"{q}.{p}": f"{q}.{p}" for q in ("quant_conv", "post_quant_conv") for p in _PARAMS}

# Leaf renames inside a resnet (everything else keeps its name: norm1, conv1, norm2, conv2).
_VAE_RESNET_LEAF: dict[str, str] = {"conv_shortcut": "nin_shortcut"}  # 1×1 conv when C_in != C_out

# Mid-block attention leaves: diffusers (Linear, weight (C, C)) -> LDM (1×1 Conv2d, weight (C, C, 1, 1)).
_VAE_ATTN_LEAF: dict[str, str] = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
_VAE_ATTN_CONV = {"q", "k", "v", "proj_out"}  # leaves whose weight gets the trailing (1, 1)

_RE_VAE_DOWN = re.compile(r"^encoder\.down_blocks\.(?P<i>\d+)\.(?P<rest>.+)$")
_RE_VAE_UP = re.compile(r"^decoder\.up_blocks\.(?P<i>\d+)\.(?P<rest>.+)$")
_RE_VAE_MID = re.compile(r"^(?P<part>encoder|decoder)\.mid_block\.(?P<rest>.+)$")
_RE_RESNET = re.compile(r"^resnets\.(?P<j>\d+)\.(?P<leaf>[^.]+)\.(?P<p>weight|bias)$")
_RE_SAMPLER = re.compile(r"^(?P<kind>downsamplers|upsamplers)\.0\.conv\.(?P<p>weight|bias)$")
_RE_ATTN = re.compile(r"^attentions\.0\.(?P<leaf>.+)\.(?P<p>weight|bias)$")
_SAMPLER = {"downsamplers": "downsample", "upsamplers": "upsample"}


def _resnet_leaf(leaf: str) -> str:
    return _VAE_RESNET_LEAF.get(leaf, leaf)


def vae_to_ldm(sd: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKL.state_dict()`` -> LDM keys, as in BFL's ``ae.safetensors``.

    Renames, for any number of blocks and resnets per block:

    - ``encoder.down_blocks.{i}.resnets.{j}`` -> ``encoder.down.{i}.block.{j}``,
      ``...downsamplers.0.conv`` -> ``encoder.down.{i}.downsample.conv``;
    - ``decoder.up_blocks.{i}`` -> ``decoder.up.{n-1-i}`` (LDM numbers decoder blocks from the lowest
      resolution up, diffusers in execution order), ``...upsamplers.0.conv`` -> ``...upsample.conv``;
    - ``conv_shortcut`` -> ``nin_shortcut``; ``conv_norm_out`` -> ``norm_out``;
    - ``{encoder,decoder}.mid_block.resnets.{j}`` -> ``{...}.mid.block_{j+1}``,
      ``mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}`` -> ``mid.attn_1.{norm,q,k,v,proj_out}``
      with the q/k/v/proj_out weights reshaped (C, C) -> (C, C, 1, 1), LDM's 1×1 convs
      (diffusers' loader slices ``[:, :, 0, 0]`` back).

    ``prefix`` is prepended to every output key. diffusers' loader looks for the first of
    ``LDM_VAE_KEYS`` = ("first_stage_model.", "vae.") that any key starts with, keeps only keys with that
    prefix and strips it; with none found it takes the keys as they are. So "" (BFL ``ae.safetensors``,
    ComfyUI ``vae/`` files), ``"first_stage_model."`` (SD-style full checkpoints) and ``"vae."`` all load.
    The loader needs the diffusers config too (it counts ``down_block_types`` / ``up_block_types``).
    """
    n_up = len(_block_indices(sd, "decoder.up_blocks."))
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []

    for key, tensor in sd.items():
        new: str | None = None
        value = tensor
        if key in _VAE_TOP:
            new = _VAE_TOP[key]
        elif (m := _RE_VAE_DOWN.match(key)) or (m := _RE_VAE_UP.match(key)):
            down = key.startswith("encoder.")
            i = int(m["i"])
            block = f"encoder.down.{i}" if down else f"decoder.up.{n_up - 1 - i}"
            if r := _RE_RESNET.match(m["rest"]):
                new = f"{block}.block.{r['j']}.{_resnet_leaf(r['leaf'])}.{r['p']}"
            elif (s := _RE_SAMPLER.match(m["rest"])) and (s["kind"] == "downsamplers") == down:
                new = f"{block}.{_SAMPLER[s['kind']]}.conv.{s['p']}"
        elif m := _RE_VAE_MID.match(key):
            mid = f"{m['part']}.mid"
            if r := _RE_RESNET.match(m["rest"]):
                new = f"{mid}.block_{int(r['j']) + 1}.{_resnet_leaf(r['leaf'])}.{r['p']}"
            elif (a := _RE_ATTN.match(m["rest"])) and a["leaf"] in _VAE_ATTN_LEAF:
                leaf = _VAE_ATTN_LEAF[a["leaf"]]
                new = f"{mid}.attn_1.{leaf}.{a['p']}"
                if leaf in _VAE_ATTN_CONV and a["p"] == "weight" and tensor.ndim == 2:
                    value = tensor.reshape(*tensor.shape, 1, 1)
        if new is None:
            unknown.append(key)
        else:
            out[prefix + new] = value

    if unknown:
        raise ValueError(f"keys not in the diffusers AutoencoderKL layout (first of {len(unknown)}): "
                         f"{sorted(unknown)[:5]}")
    return out
