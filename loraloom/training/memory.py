"""``model.vram_budget``: the storage precision, gradient checkpointing and offloading that fit a GPU.

:func:`measure` counts what a run of the loaded model needs, in bytes: the frozen base in each storage
precision, the largest repeated block (what block offloading keeps on the device, twice), the adapter with its
gradient and AdamW moments, and the activations autograd saves for backward with and without gradient
checkpointing. The activations are measured, not guessed: the family's own forward pass runs once each way on
a twin of the model on the meta device (shapes only: no memory, no arithmetic), with the adapter attached and
the run's batch and resolution.

:func:`plan` is a pure function of those sizes and the budget. It walks :data:`LADDER`, fastest and most exact
set-up first, and takes the first whose estimate fits.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from . import adapters
from .families.base import DENOISER
from .offload import repeated_blocks

if TYPE_CHECKING:
    from .config import AdapterConfig, RunConfig
    from .families.base import Family, Geometry

GB = 1e9
# Bytes per weight of a Linear stored in float8, and in NF4 (4 bits plus one 8-bit scale per 64 weights, its
# second-level scales negligible: bitsandbytes' compress_statistics).
FP8_BYTES, NF4_BYTES = 1.0, 0.5 + 1 / 64
ADAPTER_BYTES = 16  # per trained parameter: fp32 weight, gradient and AdamW's two moments
# What the estimate leaves for the CUDA context, cuBLAS workspaces and the allocator's fragmentation.
RESERVE_BYTES, RESERVE_FRACTION = 1.0 * GB, 0.10
# (base_precision, gradient_checkpointing, offload, offload_activations), fastest and most exact first: each
# step saves memory at a cost in speed (checkpointing: a recomputed forward pass; offloading: copies over PCIe)
# or in exactness (fp8, nf4).
LADDER = (
    ("auto", False, "none", False),
    ("auto", True, "none", False),
    ("fp8", True, "none", False),
    ("nf4", True, "none", False),
    ("nf4", True, "blocks", False),
    ("nf4", True, "blocks", True),
)


@dataclass(frozen=True)
class Sizes:
    """What a run needs, in bytes (see :func:`measure`). Per storage precision: ``auto`` (as loaded), fp8, nf4."""
    weights: dict[str, int]  # the whole frozen base
    outside_blocks: dict[str, int]  # what block offloading keeps on the device besides two blocks
    largest_block: dict[str, int]
    adapter: int  # trained parameters x ADAPTER_BYTES
    activations: int  # saved for backward without gradient checkpointing
    activations_checkpointed: int  # with it: what crosses block boundaries plus the largest block's own
    activations_offloaded: int  # with it and activation offloading: the largest block's own


@dataclass(frozen=True)
class MemoryPlan:
    """How the run stores and trains its base; ``budget_gb`` 0 means as configured, nothing estimated."""
    base_precision: str
    gradient_checkpointing: bool
    offload: str
    offload_activations: bool
    budget_gb: float = 0.0
    estimate_gb: float = 0.0
    fits: bool = True
    reason: str = "as configured (model.vram_budget = 0)"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def configured(cfg: RunConfig) -> MemoryPlan:
    """The plan of a run without a budget: its own settings."""
    return MemoryPlan(cfg.model.base_precision, cfg.train.gradient_checkpointing, cfg.model.offload,
                      cfg.model.offload_activations)


def estimate(sizes: Sizes, precision: str, checkpointing: bool, offload: str, offload_activations: bool
             ) -> dict[str, float]:
    """Estimated GPU memory of one set-up, in bytes: ``weights`` on the device, ``adapter``, ``activations``
    and ``total`` (their sum plus the reserve)."""
    weights = (sizes.weights[precision] if offload == "none"
               else sizes.outside_blocks[precision] + 2 * sizes.largest_block[precision])
    activations = (sizes.activations if not checkpointing else
                   sizes.activations_offloaded if offload_activations else sizes.activations_checkpointed)
    total = (weights + sizes.adapter + activations) * (1 + RESERVE_FRACTION) + RESERVE_BYTES
    return {"weights": weights, "adapter": sizes.adapter, "activations": activations, "total": total}


def plan(budget_gb: float, sizes: Sizes, quantize: bool = True) -> MemoryPlan:
    """The first set-up of :data:`LADDER` whose estimate fits ``budget_gb`` (10^9 bytes); the last one, marked as
    not fitting, when none does. fp8 is skipped when the base is stored in float8 already; fp8 and nf4 are
    skipped without ``quantize`` (a full fine-tune trains the weights themselves), nf4's offloading rungs then
    offloading the base as it is."""
    ladder = [s for s in LADDER if not (s[0] == "fp8" and sizes.weights["fp8"] >= sizes.weights["auto"])]
    if not quantize:
        ladder = list(dict.fromkeys(("auto", *s[1:]) if s[0] != "auto" else s for s in ladder if s[0] != "fp8"))
    for i, setup in enumerate(ladder):
        parts = estimate(sizes, *setup)
        fits = parts["total"] <= budget_gb * GB
        if fits or i == len(ladder) - 1:
            why = (f"estimated {parts['total'] / GB:.1f} GB of {budget_gb:g} GB: weights on the GPU "
                   f"{parts['weights'] / GB:.1f}, adapter and optimizer {parts['adapter'] / GB:.2f}, activations "
                   f"{parts['activations'] / GB:.1f}, reserve {RESERVE_BYTES / GB:g} + {RESERVE_FRACTION:.0%}")
            if not fits:
                why = f"nothing fits, the most frugal set-up is {why}; lower train.batch_size or data.resolution"
            return MemoryPlan(*setup, budget_gb, round(parts["total"] / GB, 2), fits, why)
    raise AssertionError("the ladder is never empty")


def measure(model: torch.nn.Module, family: Family, cfg: RunConfig, latent: torch.Tensor,
            text: dict[str, torch.Tensor], geometry: Geometry, compute_dtype: torch.dtype) -> Sizes:
    """The :class:`Sizes` of training the loaded ``model`` (not yet quantised or adapted) with ``cfg``.

    ``latent`` (C, h, w), ``text`` and ``geometry`` are one example of the run's data; the batch is
    ``cfg.train.batch_size`` of it. Only the latent's shape counts; the text's small values (caption masks,
    window counts) are read by some families' forward passes, and they get them (:class:`MetaValues`).
    """
    blocks = repeated_blocks(model)
    quantized = re.compile(family.quantized)
    in_block = {id(t) for b in blocks for t in (*b.parameters(), *b.buffers())}
    linears = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def stored(tensors: list[torch.Tensor]) -> dict[str, int]:
        out = {"auto": 0, "fp8": 0.0, "nf4": 0.0}
        for t in tensors:
            size = t.numel() * t.element_size()
            out["auto"] += size
            name = linears.get(id(t))
            out["fp8"] += min(size, t.numel() * FP8_BYTES) if name is not None else size
            out["nf4"] += t.numel() * NF4_BYTES if name is not None and quantized.fullmatch(name) else size
        return {k: int(v) for k, v in out.items()}

    everything = [*model.parameters(), *model.buffers()]
    twin = torch.nn.Module.to(meta_twin(model), compute_dtype)  # diffusers' own to() warns about nothing
    adapter = attach_adapter(twin, family, cfg.adapter)
    full, per_block = _saved_bytes(twin, family, cfg, latent, text, geometry, compute_dtype, checkpointing=False)
    checkpointed, _ = _saved_bytes(twin, family, cfg, latent, text, geometry, compute_dtype, checkpointing=True)
    return Sizes(
        weights=stored(everything),
        outside_blocks=stored([t for t in everything if id(t) not in in_block]),
        largest_block=max((stored([*b.parameters(), *b.buffers()]) for b in blocks), key=lambda s: s["auto"]),
        adapter=ADAPTER_BYTES * sum(p.numel() for ps in adapter.parameters().values() for p in ps),
        activations=full, activations_checkpointed=checkpointed + per_block, activations_offloaded=per_block)


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` with every parameter and buffer on the meta device: the same modules, as loaded (fused
    projections and all), without memory."""
    memo = {id(t): torch.empty_like(t, device="meta") for t in model.buffers()}
    memo |= {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
             for p in model.parameters()}
    return copy.deepcopy(model, memo)


def attach_adapter(model: torch.nn.Module, family: Family, settings: AdapterConfig) -> adapters.Adapter:
    """``settings``' adapter on ``model``'s frozen denoiser, on ``family``'s targets (shapes for a meta model)."""
    model.requires_grad_(False)
    return adapters.attach({DENOISER: model}, {DENOISER: family.targets[settings.targets]}, settings, 0)


def _saved_bytes(twin: torch.nn.Module, family: Family, cfg: RunConfig, latent: torch.Tensor,
                 text: dict[str, torch.Tensor], geometry: Geometry, dtype: torch.dtype, checkpointing: bool
                 ) -> tuple[int, int]:
    """Bytes autograd saves in one training forward pass of the meta twin (Parameters excluded), and the most
    saved inside one repeated block."""
    if checkpointing:
        twin.enable_gradient_checkpointing()
    else:
        twin.disable_gradient_checkpointing()
    twin.train()
    batch = cfg.train.batch_size
    current: list[int] = []  # index of the block running now
    per_block: dict[int, int] = {}
    total = [0]
    counted: dict[int, torch.Tensor] = {}  # by id, kept alive so that no id is reused

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # A saved view holds its base's whole storage, once however often it is saved; a weight's is not new.
        base = tensor if tensor._base is None else tensor._base
        if not isinstance(base, torch.nn.Parameter) and id(base) not in counted:
            counted[id(base)] = base
            size = base.untyped_storage().nbytes()
            total[0] += size
            if current:
                per_block[current[-1]] = per_block.get(current[-1], 0) + size
        return tensor

    def enter(i: int) -> None:
        current.append(i)

    def leave() -> None:
        current.pop()

    handles = [h for i, block in enumerate(repeated_blocks(twin)) for h in (
        block.register_forward_pre_hook(lambda _m, _a, i=i: enter(i)),
        block.register_forward_hook(lambda _m, _a, _o: leave(), always_call=True))]
    values = MetaValues()
    inputs = torch.empty((batch, *latent.shape), device="meta", dtype=dtype)
    texts = values.inputs(text, batch, dtype)
    try:
        with values, _FusedAttention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            family.predict(twin, inputs, torch.zeros(batch, device="meta"), texts, [geometry] * batch,
                           cfg.train.guidance)
    finally:
        for handle in handles:
            handle.remove()
    return total[0], max(per_block.values(), default=0)


class MetaValues(TorchFunctionMode):
    """A forward pass on the meta device that reads some of its inputs' values.

    Meta tensors have shapes, not values, so a model that reads an input (a caption mask's lengths, a count of
    caption windows) cannot run on them. A meta tensor made by :meth:`tensor` keeps its values on the CPU beside
    it; an operation whose meta operands all have values computes its result's values too, on the CPU; reading
    one (``tolist``, ``item``, ``int``, ...) answers from them. Values are for the inputs a model reads: an
    operation mixing in a tensor without values (a weight, an activation) computes none, and writing such a
    result into a tensor with values makes it forget them, so that a read after it fails instead of answering
    wrong.
    """

    READS = frozenset({torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
                       torch.Tensor.__bool__, torch.Tensor.__index__})

    def __init__(self) -> None:
        super().__init__()
        self.values = WeakIdKeyDictionary()

    def tensor(self, value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A meta tensor of ``value``'s shape, in ``dtype`` (default ``value``'s), that has its values (exact, in
        ``value``'s own dtype)."""
        meta = torch.empty_like(value, device="meta", dtype=dtype)
        self.values[meta] = value.detach().to("cpu", copy=True)  # written into as the meta tensor is
        return meta

    def inputs(self, text: dict[str, torch.Tensor], batch: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One caption's embeddings ``text`` as a batch of ``batch`` meta tensors, floats in ``dtype``: what
        autocast makes of them on a GPU (the meta device has no autocast)."""
        return {k: self.tensor(v.expand(batch, *v.shape), dtype if v.is_floating_point() else None)
                for k, v in text.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS and args[0] in self.values:
            return func(self.values[args[0]], *args[1:], **kwargs)
        out = func(*args, **kwargs)
        metas = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_meta]
        if metas and all(t in self.values for t in metas):
            on_cpu_args, on_cpu_kwargs = tree_map(self._on_cpu, (args, kwargs))
            computed = func(*on_cpu_args, **on_cpu_kwargs)
            for result, value in zip(tree_leaves(out), tree_leaves(computed), strict=False):
                if isinstance(result, torch.Tensor) and result.is_meta and isinstance(value, torch.Tensor):
                    self.values[result] = value
        else:  # written into by something without values: forget what it held
            for t in metas:
                if t in self.values and _writes(func, t, args, kwargs):
                    del self.values[t]
        return out

    def _on_cpu(self, x):
        if isinstance(x, torch.Tensor) and x in self.values:
            return self.values[x]
        if isinstance(x, (str, torch.device)) and str(x) == "meta":
            return torch.device("cpu")
        return x


_IN_PLACE_OPERATORS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"})


def _writes(func, tensor: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether ``func(*args, **kwargs)`` writes into ``tensor``: an in-place method on it, item assignment, or
    ``out=``."""
    name = getattr(func, "__name__", "")
    in_place = (name.endswith("_") and not name.startswith("__")) or name in _IN_PLACE_OPERATORS
    return (in_place and args and args[0] is tensor) or any(t is tensor for t in tree_leaves(kwargs.get("out")))


class _FusedAttention(TorchFunctionMode):
    """Scaled dot-product attention as a GPU runs it, for :func:`_saved_bytes` on the meta device.

    On the meta device SDPA falls back to its math form, which saves the (B, heads, L, L) attention matrix for
    backward: gigabytes per block of a 12B transformer at 1024². CUDA runs FlashAttention (or the
    memory-efficient kernel with a mask), which saves only q, k, v, the output and per-row statistics; this mode
    calls those kernels' meta forms instead."""

    ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        a = {**dict(zip(self.ARGS, args)), **kwargs}
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        if a.get("enable_gqa") and q.shape[-3] != k.shape[-3]:
            return func(*args, **kwargs)
        common = {"dropout_p": a.get("dropout_p", 0.0), "is_causal": a.get("is_causal", False), "scale": a.get("scale")}
        if mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, **common)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, **common)[0]
