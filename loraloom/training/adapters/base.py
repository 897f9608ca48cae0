"""The contract of an adapter algorithm: everything that differs between LoRA, DoRA, LoKr, LoHa, LoCon and a
full fine-tune.

Session, export, checkpoints and nodes reach an algorithm only through :class:`Adapter`; one module per
algorithm implements it and registers in ``adapters/__init__.py``. ``tests/test_adapters.py`` runs every
registered algorithm on every family through the contract.

Names: a target is ``<component>.<module>``, the component being the part of the trained model it lives in
(``diffusion_model``, or a text encoder's ``model.<slot>`` name when text encoders are trained too) and the
module its name inside that part. Checkpoint tensors are ``<target>.<tensor>``; exports are grouped by target,
and the family turns each target into the key ComfyUI's loader reads.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import AdapterConfig

LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)  # what an adapter can wrap


@dataclass(frozen=True)
class Target:
    """One module an adapter wraps, with the settings that apply to it (after ``adapter.blocks``)."""
    name: str  # <component>.<module>
    module: torch.nn.Module
    rank: int
    alpha: float
    factor: int  # LoKr's Kronecker factor (-1: as square as possible)

    @property
    def component(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def module_name(self) -> str:
        return self.name.split(".", 1)[1]


def select_targets(components: dict[str, torch.nn.Module], patterns: dict[str, str], settings: AdapterConfig,
                   layers: tuple[type, ...] = LAYERS) -> list[Target]:
    """The modules of ``components`` that an adapter wraps, sorted by name.

    ``patterns`` maps a component to a regex over its module names (the family's preset for it); a module must
    match it fully and be one of ``layers``. ``settings.blocks`` then set each target's rank, alpha and factor:
    the first block whose pattern fully matches ``<component>.<module>`` applies, and rank 0 leaves it out.
    """
    rules = [(re.compile(b.pattern), b) for b in settings.blocks]
    found = []
    for component, pattern in patterns.items():
        wanted = re.compile(pattern)
        for module_name, module in components[component].named_modules():
            if not (wanted.fullmatch(module_name) and isinstance(module, layers)):
                continue
            name = f"{component}.{module_name}"
            block = next((b for rule, b in rules if rule.fullmatch(name)), None)
            rank = block.rank if block and block.rank >= 0 else settings.rank
            if rank == 0:
                continue
            found.append(Target(name, module, rank,
                                block.alpha if block and block.alpha > 0 else settings.alpha,
                                block.factor if block and block.factor else settings.factor))
    if not found:
        raise ConfigError(f"adapter.targets = {settings.targets!r} (with adapter.blocks) selects no layer of the "
                          "model: choose another preset or loosen the block patterns")
    return sorted(found, key=lambda t: t.name)


class Adapter(ABC):
    """An algorithm's trainable modules on a frozen model's targets.

    Construction wraps the targets, its initial weights drawn from the seed without touching the global RNG.
    The base must already be in its storage precision (float8, 4-bit) when an adapter is attached.
    """

    name: ClassVar[str]  # adapter.algorithm
    layers: ClassVar[tuple[type, ...]] = (torch.nn.Linear,)  # the module types it wraps
    # Trains the targets' own weights (full fine-tune), not a delta: it must keep the model's module names (wrap
    # nothing), and is exported as the whole model in the family's native layout plus a diff patch.
    whole_model: ClassVar[bool] = False

    def __init__(self, components: dict[str, torch.nn.Module], targets: list[Target], settings: AdapterConfig,
                 seed: int):
        self.targets = {t.name: t for t in targets}
        self.settings = settings

    @abstractmethod
    def parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        """The trainable parameters by component (each component may have its own learning rate)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Everything the adapter learned, for checkpoints: ``<target>.<tensor>`` → a detached copy."""

    @abstractmethod
    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`state` returned (same targets and settings); ValueError naming a misfit."""

    @abstractmethod
    def disabled(self) -> AbstractContextManager[None]:
        """The base model alone while the context lasts (side-by-side previews); restored afterwards."""

    @abstractmethod
    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per target, the tensors of the format ComfyUI's LoRA loader applies (``lora_down.weight``,
        ``lokr_w1``, ``alpha``, ``dora_scale``, ``diff``, ...), such that ComfyUI's patched weight computes what
        the engine trained. Keys are suffixes after the target's exported name."""

    @abstractmethod
    def load_export(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        """The inverse of :meth:`export`: continue training from a file (ours or another trainer's in the same
        format). ``groups`` maps target names to their tensors; ValueError naming what does not fit."""

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """``<target>.weight`` (and ``.bias`` where it changes) as the trained model computes them, float32: a
        whole-model algorithm's trained tensors, or the base weight with a delta algorithm's update folded in
        (what ``loraloom merge`` writes). Detached, not copies: read them before the next step."""
        raise ConfigError(f"adapter.algorithm = {self.name!r} cannot fold its update into the base weights yet: "
                          "merge it in ComfyUI (LoraLoader, then save the model)")
