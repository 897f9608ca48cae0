"""Full fine-tune: the targets' own weights and biases train; nothing is added to the model.

The family preset (``adapter.targets``) and ``[[adapter.blocks]]`` choose the layers whose weights train (a block
with ``rank = 0`` leaves its layers frozen; other ranks, alphas and factors mean nothing here). Everything else
(norm scales, embedders outside the preset) stays frozen.

Precision: each trained tensor becomes a float32 master copy, whatever the base's storage dtype; under bf16
mixed precision the layers still compute in bf16 (autocast casts the weight at use), and the optimizer updates
the float32 copy, so small updates are not rounded away. The base's own tensors are kept, as stored, in host
memory: :meth:`Full.disabled` swaps them back in (side-by-side previews) and :meth:`Full.export` subtracts them
(the diff patch). Memory per trained parameter: 4 bytes (master) + 4 (gradient) + the optimizer's state (8 for
AdamW, 2 for the 8-bit optimizers), plus the stored base copy in host memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import ConfigError
from ..precision import is_float8
from .base import LAYERS, Adapter, Target

PARAMS = ("weight", "bias")


class Full(Adapter):
    name = "full"
    layers = LAYERS
    whole_model = True

    def __init__(self, components: dict[str, torch.nn.Module], targets: list[Target], settings, seed: int):
        super().__init__(components, targets, settings, seed)
        self.trained: dict[str, torch.nn.Parameter] = {}  # "<target>.weight" / ".bias" -> the float32 master
        self.base: dict[str, torch.Tensor] = {}  # the same keys -> the base's tensor as stored, in host memory
        for target in targets:
            for kind in PARAMS:
                stored = getattr(target.module, kind, None)
                if stored is None:
                    continue
                _check_trainable(target.name, stored)
                master = torch.nn.Parameter(stored.detach().to(torch.float32, copy=True), requires_grad=True)
                setattr(target.module, kind, master)
                self.trained[f"{target.name}.{kind}"] = master
                self.base[f"{target.name}.{kind}"] = stored.detach().to("cpu")

    def parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for key, param in self.trained.items():
            groups.setdefault(key.split(".", 1)[0], []).append(param)
        return groups

    def state(self) -> dict[str, torch.Tensor]:
        """``<target>.weight`` (out, in, ...) and ``<target>.bias`` (out,): the trained tensors, float32, in host
        memory."""
        return {key: param.detach().to("cpu", copy=True) for key, param in self.trained.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.trained.keys():
            odd = sorted(state.keys() ^ self.trained.keys())
            raise ValueError(f"the saved weights do not fit this model (targets changed?): {odd[:3]} differ")
        for key, value in state.items():
            param = self.trained[key]
            if param.shape != value.shape:
                raise ValueError(f"{key} is {tuple(value.shape)} in the saved weights, {tuple(param.shape)} here")
            with torch.no_grad():
                param.copy_(value)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        live = {key: param.data for key, param in self.trained.items()}
        try:
            for key, param in self.trained.items():
                param.data = self.base[key].to(param.device, param.dtype)
            yield
        finally:
            for key, param in self.trained.items():
                param.data = live[key]

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per target ``diff`` (trained - base weight) and ``diff_b`` (the bias's), float32: ComfyUI's loader adds
        them to the base's tensors."""
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, param in self.trained.items():
            target, kind = key.rsplit(".", 1)
            base = self.base[key].to(param.device, torch.float32)
            groups.setdefault(target, {})["diff" if kind == "weight" else "diff_b"] = param.detach() - base
        return groups

    def load_export(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        state = {key: base.float() for key, base in self.base.items()}  # a layer the file lacks: the base's
        for name, tensors in groups.items():
            if f"{name}.weight" not in self.trained:
                raise ValueError(f"{name}: the file changes a layer this run does not train (check adapter.targets)")
            unknown = set(tensors) - {"diff", "diff_b"}
            if unknown:
                raise ValueError(f"{name}: not a full fine-tune's patch (its tensors are {sorted(tensors)}); choose "
                                 "the file's algorithm in adapter.algorithm")
            for suffix, kind in (("diff", "weight"), ("diff_b", "bias")):
                if suffix in tensors:
                    state[f"{name}.{kind}"] = self.base[f"{name}.{kind}"].float() + tensors[suffix].float().cpu()
        self.load_state(state)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        return {key: param.detach() for key, param in self.trained.items()}


def _check_trainable(name: str, stored: torch.Tensor) -> None:
    """A float8 or 4-bit tensor has no gradient: say which setting stores it so."""
    if is_float8(stored) or not stored.is_floating_point():
        raise ConfigError(
            f"{name} is stored in {stored.dtype} (a float8 or 4-bit base), and a full fine-tune trains the weights "
            "themselves: set model.base_precision to the compute dtype ('bf16', or 'fp32' with train."
            "mixed_precision = 'fp32') to train an upcast copy of this file, or use a bf16/fp16 model file")
