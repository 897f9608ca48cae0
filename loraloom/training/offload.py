"""Keeping the frozen base and the saved activations in CPU memory while a GPU trains.

**Block offloading** (``model.offload = "blocks"``). The denoiser's repeated blocks (diffusers'
``_repeated_blocks``: a transformer's double and single blocks, a UNet's transformer blocks) keep their frozen
parameters and buffers in CPU memory, pinned on CUDA. A forward pre-hook puts device copies in place of a
block's tensors for the length of its call; a forward hook puts the CPU originals back, also when gradient
checkpointing stops a recomputation early. Autograd only ever sees the copies, and keeps those it saved for as
long as backward needs them: with gradient checkpointing a block saves nothing in the forward pass, so the
device holds the running block and the next one (copied ahead), in the forward pass and again in the
recomputation of backward, which runs the blocks in reverse. Trainable tensors (the adapter) and everything
outside the blocks stay on the device. On CUDA the next block's copy runs on a side stream from pinned memory
while the current block computes. On the CPU the same logic runs with real copies, so tests can check it.

**Activation offloading** (``model.offload_activations``). Tensors autograd saves for backward (with gradient
checkpointing: each block's inputs) are copied to pinned CPU memory on a side stream in the forward pass and
back in backward. Parameters and small tensors stay where they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks in call order: diffusers' ``_repeated_blocks`` class names, or where a model
    has none, its ``_no_split_modules``, the blocks accelerate keeps whole."""
    names = set(getattr(model, "_repeated_blocks", ()) or getattr(model, "_no_split_modules", ()) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"model.offload: {type(model).__name__} names no repeated blocks (_repeated_blocks) to "
                          "offload; set model.offload = 'none'")
    return blocks


@dataclass
class _Slot:
    """One frozen tensor of a block: where it lives in its module, and the CPU original."""
    module: torch.nn.Module
    kind: str  # "_parameters" or "_buffers"
    name: str
    original: torch.Tensor


class BlockOffload:
    """Hooks that bring each repeated block's frozen tensors to ``device`` while it runs (see the module doc).

    Construction moves ``model`` into place: frozen block tensors to CPU memory (pinned on CUDA), everything
    else to ``device``. :meth:`remove` puts the whole model on ``device`` and takes the hooks off.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.blocks = repeated_blocks(model)
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots = [self._place_block(block) for block in self.blocks]
        inside = {id(m) for block in self.blocks for m in block.modules()}
        for module in model.modules():
            if id(module) not in inside:
                for kind in ("_parameters", "_buffers"):
                    for tensor in getattr(module, kind).values():
                        if tensor is not None:
                            _move(tensor, device)
        self._pending: dict[int, tuple[list[torch.Tensor], Any]] = {}  # a block copied ahead: (copies, event)
        self._last: int | None = None
        self._forward = True
        self.installed = 0  # blocks whose device copies are in place now
        self.peak_on_device = 0  # most blocks on the device at once (in place + copied ahead), for tests
        self.copies = 0  # blocks copied to the device so far
        self.handles = [h for i, block in enumerate(self.blocks) for h in (
            block.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i)),
            block.register_forward_hook(lambda _m, _a, _o, i=i: self._exit(i), always_call=True))]

    def _place_block(self, block: torch.nn.Module) -> list[_Slot]:
        slots = []
        for module in block.modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    if tensor is None:
                        continue
                    if kind == "_parameters" and tensor.requires_grad:
                        _move(tensor, self.device)  # trained: the optimizer updates it on the device
                        continue
                    _move(tensor, torch.device("cpu"), pin=self.cuda)
                    if getattr(tensor, "quant_state", None) is not None:
                        tensor.quant_state.to(self.device)  # 4-bit scales are small: they stay on the device
                    slots.append(_Slot(module, kind, name, tensor))
        return slots

    def _copy(self, i: int) -> tuple[list[torch.Tensor], Any]:
        """Device copies of block ``i``'s frozen tensors; on CUDA issued on the side stream, with its event."""
        self.copies += 1
        if not self.cuda:
            return [_device_copy(s.original, self.device) for s in self.slots[i]], None
        with torch.cuda.stream(self.stream):
            copies = [_device_copy(s.original, self.device, non_blocking=True) for s in self.slots[i]]
            event = torch.cuda.Event()
            event.record(self.stream)
        return copies, event

    def _enter(self, i: int) -> None:
        copies, event = self._pending.pop(i, None) or self._copy(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for tensor in copies:  # made on the side stream, used on this one: not freed before it is done
                tensor.record_stream(current)
        for slot, tensor in zip(self.slots[i], copies):
            getattr(slot.module, slot.kind)[slot.name] = tensor
        self.installed += 1
        upcoming = self._upcoming(i)
        pending = self._pending.get(upcoming) if upcoming is not None else None
        self._pending = {upcoming: pending or self._copy(upcoming)} if upcoming is not None else {}
        self.peak_on_device = max(self.peak_on_device, self.installed + len(self._pending))

    def _exit(self, i: int) -> None:
        for slot in self.slots[i]:
            getattr(slot.module, slot.kind)[slot.name] = slot.original
        self.installed -= 1

    def _upcoming(self, i: int) -> int | None:
        """The block likely to run after ``i``: the next one in a forward pass, the previous one in backward's
        recomputation. The same block twice in a row is a turn: the last block of a forward pass is the first
        one backward recomputes, and the block backward ends with starts the next forward pass."""
        last, self._last = self._last, i
        self._forward = True if last is None or i > last else False if i < last else not self._forward
        j = i + 1 if self._forward else i - 1
        return j if 0 <= j < len(self.blocks) else None

    def remove(self) -> None:
        """Take the hooks off and put every block back on the device, as a model without offloading."""
        for handle in self.handles:
            handle.remove()
        self._pending = {}
        for slots in self.slots:
            for slot in slots:
                _move(slot.original, self.device)


def _move(tensor: torch.Tensor, device: torch.device, pin: bool = False) -> None:
    """Move ``tensor``'s data in place (the Parameter object stays the one modules and optimizers hold)."""
    data = tensor.data.to(device)
    tensor.data = data.pin_memory() if pin else data


def _device_copy(tensor: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    """A copy of ``tensor`` on ``device`` (a fresh tensor even on the same device) of the same kind: a frozen
    Parameter, a bitsandbytes 4-bit Parameter with its quantisation state, or a plain buffer."""
    data = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    data.copy_(tensor.data, non_blocking=non_blocking)
    if getattr(tensor, "quant_state", None) is not None:
        return type(tensor)(data, requires_grad=False, quant_state=tensor.quant_state, blocksize=tensor.blocksize,
                            compress_statistics=tensor.compress_statistics, quant_type=tensor.quant_type,
                            quant_storage=tensor.quant_storage, module=tensor.module,
                            bnb_quantized=tensor.bnb_quantized)
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(data, requires_grad=False)
    return data


class ActivationOffload:
    """Saved-tensor hooks that keep what autograd saves in (pinned) CPU memory until backward needs it.

    Tensors under ``min_bytes``, Parameters and tensors not on ``device`` are kept as they are. On CUDA the copy
    out runs on a side stream after the producing work, and backward's copy in waits for it; nothing blocks the
    host. ``offloaded_bytes`` counts what went out (for tests and logs).
    """

    def __init__(self, device: torch.device, min_bytes: int = 2**20):
        self.device, self.min_bytes = device, min_bytes
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.offloaded_bytes = 0

    def pack(self, tensor: torch.Tensor) -> Any:
        size = tensor.numel() * tensor.element_size()
        if isinstance(tensor, torch.nn.Parameter) or tensor.device.type != self.device.type or size < self.min_bytes:
            return tensor
        self.offloaded_bytes += size
        if not self.cuda:
            return tensor.device, tensor.detach().clone(), None
        current = torch.cuda.current_stream(tensor.device)
        self.stream.wait_stream(current)  # the tensor is complete once the work queued before it is
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        tensor.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return tensor.device, host, event

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, host, event = packed
        if event is None:
            return host
        torch.cuda.current_stream(device).wait_event(event)
        return host.to(device, non_blocking=True)

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield


def activations(offload: ActivationOffload | None):
    """The context a training forward pass runs in: activation offloading when configured, else nothing."""
    return offload() if offload is not None else nullcontext()
