"""Key renames between diffusers' ``Lumina2Transformer2DModel`` and the native Lumina 2 (NextDiT) layout.

The native layout is the one of Alpha-VLLM's Lumina-Image-2.0 release and of the files ComfyUI users keep in
``models/diffusion_models`` (and, under ``model.diffusion_model.``, in all-in-one checkpoints such as Illustrious-LU
and NetaYume); its names are the attribute paths of ComfyUI's ``comfy/ldm/lumina/model.py`` ``NextDiT``. The
loader strips any prefix before these functions see the keys.

Both directions are rename tables plus one fused projection per attention: native ``attention.qkv`` (q + 2kv, D)
is ``attn.to_q`` | ``attn.to_k`` | ``attn.to_v`` with grouped-query sizes, NOT equal thirds (2304 | 768 | 768 in the
real model). The engine keeps it fused (``attn.to_qkv``, see :mod:`.lumina2`) so that every adapter algorithm trains
on the matrix ComfyUI patches. Every width is read from the tensors: the query rows from ``attention.out``
(D, q), k and v share the rest equally. diffusers' own ``convert_lumina2_to_diffusers`` hard-codes the real widths
and refiner count, and fails on ``model.diffusion_model.``-prefixed files; these functions do neither.

The functions are pure (inputs unchanged; renamed tensors are the input tensors, split ones are views) and strict:
an unrecognised key raises ``ValueError`` rather than being dropped.

Shapes of the real model: D = 2304 hidden, q = 24 heads x 96, kv = 8 x 96, F = 9216 feed-forward, C = 2304 caption
features (Gemma-2-2B), E = min(D, 1024) adaLN width, P = 2 x 2 x 16 = 64 patch features.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from .parts import KeyReader

# A key only a native file has, and only a diffusers file has: what tells the layouts apart (ComfyUI's detection
# keys on the first too).
NATIVE_MARKER = "cap_embedder.1.weight"
DIFFUSERS_MARKER = "time_caption_embed.caption_embedder.1.weight"

# Whole-model renames, native module -> diffusers module (".weight" and ".bias" appended).
_TOP: dict[str, str] = {
    "x_embedder": "x_embedder",  # (D, P)
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",  # (E, 256)
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",  # (E, E)
    "cap_embedder.0": "time_caption_embed.caption_embedder.0",  # RMSNorm (C,): weight only
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",  # (D, C)
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",  # (D, E): scale only, so no halves to swap
    "final_layer.linear": "norm_out.linear_2",  # (P, D)
}
_WEIGHT_ONLY = {"cap_embedder.0"}
# NextDiT builds this RMSNorm (D,) and never calls it; diffusers has no such module. Dropped when read, written as
# ones so that ComfyUI reports no missing key.
UNUSED_NATIVE = "norm_final.weight"

# Per-block renames, native leaf -> diffusers leaf.
_BLOCK_COMMON: dict[str, str] = {
    "attention.out.weight": "attn.to_out.0.weight",  # (D, q)
    "attention.q_norm.weight": "attn.norm_q.weight",  # (head_dim,)
    "attention.k_norm.weight": "attn.norm_k.weight",
    "feed_forward.w1.weight": "feed_forward.linear_1.weight",  # (F, D), the SiLU gate
    "feed_forward.w2.weight": "feed_forward.linear_2.weight",  # (D, F)
    "feed_forward.w3.weight": "feed_forward.linear_3.weight",  # (F, D)
    "attention_norm2.weight": "norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
}
# Blocks with adaLN modulation (layers, noise_refiner). diffusers' LuminaRMSNormZero holds the pre-attention norm
# and the modulation Linear, chunked (scale_msa, gate_msa, scale_mlp, gate_mlp) as NextDiT does: no reordering.
_BLOCK_MODULATED: dict[str, str] = _BLOCK_COMMON | {
    "attention_norm1.weight": "norm1.norm.weight",
    "adaLN_modulation.1.weight": "norm1.linear.weight",  # (4D, E)
    "adaLN_modulation.1.bias": "norm1.linear.bias",
}
_BLOCK_PLAIN: dict[str, str] = _BLOCK_COMMON | {"attention_norm1.weight": "norm1.weight"}  # context_refiner
BLOCK_LISTS: dict[str, dict[str, str]] = {
    "layers": _BLOCK_MODULATED,
    "noise_refiner": _BLOCK_MODULATED,
    "context_refiner": _BLOCK_PLAIN,
}
_NATIVE_QKV = "attention.qkv.weight"  # (q + 2kv, D), no bias
_SPLIT_QKV = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")
FUSED_QKV = "attn.to_qkv"  # the engine's fused projection, whose weight is the native tensor itself
_PARAMS = ("weight", "bias")

# Linear modules of the fused diffusers model (adapter targets) -> native modules. Block leaves hold in every
# block list (context_refiner blocks have no norm1.linear).
_BLOCK_LINEARS: dict[str, str] = {
    FUSED_QKV: "attention.qkv",
    "attn.to_out.0": "attention.out",
    "feed_forward.linear_1": "feed_forward.w1",
    "feed_forward.linear_2": "feed_forward.w2",
    "feed_forward.linear_3": "feed_forward.w3",
    "norm1.linear": "adaLN_modulation.1",
}
_TOP_LINEARS: dict[str, str] = {d: n for n, d in _TOP.items() if n not in _WEIGHT_ONLY}
_RE_BLOCK_MODULE = re.compile(rf"^(?P<list>{'|'.join(BLOCK_LISTS)})\.(?P<i>\d+)\.(?P<leaf>.+)$")


def block_indices(keys: Iterable[str], block_list: str) -> list[int]:
    """The sorted N of keys ``<block_list>.N.…``."""
    pattern = re.compile(rf"^{block_list}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _params(native: str) -> tuple[str, ...]:
    return ("weight",) if native in _WEIGHT_ONLY else _PARAMS


def qkv_sizes(qkv_rows: int, q_rows: int) -> tuple[int, int, int]:
    """(q, k, v) rows of a fused grouped-query projection of ``qkv_rows`` rows: k and v share what q leaves."""
    kv_total = qkv_rows - q_rows
    if kv_total <= 0 or kv_total % 2:
        raise ValueError(f"a fused qkv of {qkv_rows} rows cannot hold {q_rows} query rows plus equal k and v")
    return q_rows, kv_total // 2, kv_total // 2


def transformer_from_native(sd: Mapping[str, torch.Tensor], *, fused_qkv: bool = True) -> dict[str, torch.Tensor]:
    """Native NextDiT keys (no prefix) -> diffusers ``Lumina2Transformer2DModel`` keys.

    ``attention.qkv.weight`` (q + 2kv, D) becomes ``attn.to_qkv.weight`` unchanged, or with ``fused_qkv=False``
    diffusers' ``attn.to_q`` (q, D), ``attn.to_k`` (kv, D), ``attn.to_v`` (kv, D), q = ``attention.out`` columns.
    ``norm_final.weight`` is dropped.
    """
    take = KeyReader(sd, "native Lumina 2")
    out: dict[str, torch.Tensor] = {}
    for native, diffusers in _TOP.items():
        for p in _params(native):
            out[f"{diffusers}.{p}"] = take(f"{native}.{p}")
    take.skip(UNUSED_NATIVE)
    for block_list, renames in BLOCK_LISTS.items():
        for i in block_indices(sd, block_list):
            prefix = f"{block_list}.{i}."
            for native, diffusers in renames.items():
                out[prefix + diffusers] = take(prefix + native)
            qkv = take(prefix + _NATIVE_QKV)
            if fused_qkv:
                out[f"{prefix}{FUSED_QKV}.weight"] = qkv
            else:
                sizes = qkv_sizes(qkv.shape[0], sd[prefix + "attention.out.weight"].shape[1])
                for name, piece in zip(_SPLIT_QKV, torch.split(qkv, sizes, dim=0)):
                    out[prefix + name] = piece
    take.check_all_used()
    return out


def transformer_to_native(sd: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Diffusers ``Lumina2Transformer2DModel`` keys (split ``to_q/to_k/to_v`` or the engine's fused ``to_qkv``) ->
    native keys, with ``prefix`` in front of each: "" for a ``diffusion_models`` file, ``"model.diffusion_model."``
    for an all-in-one checkpoint. ``norm_final.weight`` is written as ones (D,)."""
    take = KeyReader(sd, "diffusers Lumina 2")
    out: dict[str, torch.Tensor] = {}
    for native, diffusers in _TOP.items():
        for p in _params(native):
            out[f"{prefix}{native}.{p}"] = take(f"{diffusers}.{p}")
    embedder = sd["x_embedder.weight"]
    out[prefix + UNUSED_NATIVE] = torch.ones(embedder.shape[0], dtype=embedder.dtype)
    for block_list, renames in BLOCK_LISTS.items():
        for i in block_indices(sd, block_list):
            block = f"{block_list}.{i}."
            for native, diffusers in renames.items():
                out[prefix + block + native] = take(block + diffusers)
            fused = f"{block}{FUSED_QKV}.weight"
            qkv = take(fused) if fused in sd else torch.cat([take(block + name) for name in _SPLIT_QKV], dim=0)
            out[prefix + block + _NATIVE_QKV] = qkv
    take.check_all_used()
    return out


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per axis (caption position, row, column): what no file records. Lumina 2's (32, 32, 32) for
    head_dim 96 (ComfyUI hard-codes it); for other widths rows and columns get equal even shares, the caption axis
    the rest (32 -> (12, 10, 10))."""
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


def config_from_native(sd: Mapping[str, torch.Tensor], caption_positions: int = 300) -> dict[str, object]:
    """``Lumina2Transformer2DModel`` constructor arguments read from the shapes of a native state dict.

    From shapes: hidden D (``x_embedder`` rows), input channels (P / 2², patch 2), head_dim (``q_norm``), query and
    kv heads, layer and refiner counts, caption width C, feed-forward width F. The RoPE split is :func:`rope_axes`.
    ``caption_positions``: the length of diffusers' precomputed caption RoPE table (its default 300 allows 299
    caption tokens; ComfyUI computes positions on the fly, so longer captions are valid there too).
    """
    hidden, patch_features = sd["x_embedder.weight"].shape
    block = "layers.0." if "layers.0.attention.q_norm.weight" in sd else "noise_refiner.0."
    head_dim = sd[f"{block}attention.q_norm.weight"].shape[0]
    q_rows = sd[f"{block}attention.out.weight"].shape[1]
    _, kv_rows, _ = qkv_sizes(sd[f"{block}attention.qkv.weight"].shape[0], q_rows)
    refiners = len(block_indices(sd, "noise_refiner"))
    if refiners != len(block_indices(sd, "context_refiner")):
        raise ValueError("the file has different numbers of noise_refiner and context_refiner blocks")
    return {
        "patch_size": 2,
        "in_channels": patch_features // 4,
        "hidden_size": hidden,
        "num_layers": len(block_indices(sd, "layers")),
        "num_refiner_layers": refiners,
        "num_attention_heads": q_rows // head_dim,
        "num_kv_heads": kv_rows // head_dim,
        **ffn_arguments(hidden, sd[f"{block}feed_forward.w1.weight"].shape[0]),
        "axes_dim_rope": rope_axes(head_dim),
        "axes_lens": (caption_positions, 512, 512),
        "cap_feat_dim": sd["cap_embedder.1.weight"].shape[1],
    }


def ffn_arguments(hidden: int, ffn: int) -> dict[str, object]:
    """``multiple_of`` and ``ffn_dim_multiplier`` with which diffusers' LuminaFeedForward (4·D, scaled by the
    multiplier, rounded up to a multiple) has width ``ffn``: Lumina 2's 256 when that gives it (9216 for D = 2304),
    else ``ffn`` itself as the multiple, with a multiplier below 1 for a narrower ``ffn``."""
    if 256 * -(-4 * hidden // 256) == ffn:
        return {"multiple_of": 256, "ffn_dim_multiplier": None}
    return {"multiple_of": ffn, "ffn_dim_multiplier": None if ffn >= 4 * hidden else ffn / (4 * hidden)}


def module_to_native(name: str) -> str:
    """A Linear of the fused diffusers model -> its native module path (no ``diffusion_model.`` prefix):
    ``layers.3.attn.to_qkv`` -> ``layers.3.attention.qkv``, ``noise_refiner.0.norm1.linear`` ->
    ``noise_refiner.0.adaLN_modulation.1``, ``time_caption_embed.caption_embedder.1`` -> ``cap_embedder.1``.

    Split ``attn.to_q/to_k/to_v`` have no native module of their own (they are row blocks of ``qkv``), hence the
    engine's fused projection.
    """
    if m := _RE_BLOCK_MODULE.match(name):
        leaf = _BLOCK_LINEARS.get(m["leaf"])
        if leaf is not None:
            return f"{m['list']}.{m['i']}.{leaf}"
    elif name in _TOP_LINEARS:
        return _TOP_LINEARS[name]
    raise ValueError(f"{name!r} is not a Lumina 2 linear layer with a native name")
