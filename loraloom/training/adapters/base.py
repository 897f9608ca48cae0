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

import math
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
# Tensor suffixes of the LyCORIS/kohya format that ComfyUI's LoRA loader applies, after a layer's name. Exports
# use these names (a family may respell some, see Family.export_suffixes); files are read back through them.
FILE_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
                 "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                 "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# The AdapterConfig fields only some algorithms read (each declares its own in Adapter.options): a run that sets
# one its algorithm ignores is refused rather than trained without it.
ALGORITHM_OPTIONS = ("dropout_on", "factor", "full_matrix", "decompose_both", "tucker")


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
    The base must already be in its storage precision (float8, 4-bit) when an adapter is attached. The trainable
    modules live inside the wrapped layers, so ``model.to(device)``, ``train()`` and ``eval()`` reach them.
    Randomness while training (dropout) draws from torch's global RNG, which the session saves and restores.
    """

    name: ClassVar[str]  # adapter.algorithm
    layers: ClassVar[tuple[type, ...]] = (torch.nn.Linear,)  # the module types it wraps
    # Trains the targets' own weights (full fine-tune), not a delta: it must keep the model's module names (wrap
    # nothing), and is exported as the whole model in the family's native layout plus a diff patch.
    whole_model: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()  # the ALGORITHM_OPTIONS it reads

    @classmethod
    def check(cls, settings: AdapterConfig) -> None:
        """ConfigError for settings this algorithm cannot train (called before anything is loaded)."""
        from ..config import AdapterConfig

        defaults = AdapterConfig()
        for option in ALGORITHM_OPTIONS:
            if option not in cls.options and getattr(settings, option) != getattr(defaults, option):
                raise ConfigError(f"adapter.{option} = {getattr(settings, option)!r} does not apply to "
                                  f"adapter.algorithm = {cls.name!r}: leave it at {getattr(defaults, option)!r}")
        if "factor" not in cls.options:
            for i, block in enumerate(settings.blocks):
                if block.factor:
                    raise ConfigError(f"adapter.blocks[{i}].factor does not apply to adapter.algorithm = "
                                      f"{cls.name!r}: remove it")

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

    def metadata(self) -> dict[str, str]:
        """kohya ``ss_*`` fields that tell other tools which algorithm an exported file holds (the export's
        defaults describe a LoRA)."""
        return {}

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """``<target>.weight`` (and ``.bias`` where it changes) as the trained model computes them, float32: a
        whole-model algorithm's trained tensors, or the base weight with a delta algorithm's update folded in
        (what ``loraloom merge`` writes). Detached, not copies: read them before the next step."""
        raise ConfigError(f"adapter.algorithm = {self.name!r} cannot fold its update into the base weights yet: "
                          "merge it in ComfyUI (LoraLoader, then save the model)")


# ---------------------------------------------------------------- reading files back (load_export)


def file_algorithm(tensors: dict[str, torch.Tensor]) -> str:
    """The algorithm one layer's file tensors hold, read from their names: ``lokr``, ``loha``, ``dora`` (LoRA
    factors with a ``dora_scale``) or ``lora`` (LoRA and LoCon share one format)."""
    if any(key.startswith("lokr_") for key in tensors):
        return "lokr"
    if any(key.startswith("hada_") for key in tensors):
        return "loha"
    if "lora_down.weight" in tensors or "lora_up.weight" in tensors:
        return "dora" if "dora_scale" in tensors else "lora"
    raise ValueError(f"holds no adapter factors (its tensors: {sorted(tensors)})")


def require_algorithm(name: str, tensors: dict[str, torch.Tensor], accepted: tuple[str, ...], current: str) -> None:
    """ValueError naming the layer and the setting to change when its file tensors hold another algorithm."""
    found = file_algorithm(tensors)
    if found not in accepted:
        choices = " or ".join(repr(a) for a in (("lora", "locon") if found == "lora" else (found,)))
        raise ValueError(f"{name}: the file holds a {found} adapter here, this run trains {current}: set "
                         f"adapter.algorithm = {choices}")


def file_alpha(tensors: dict[str, torch.Tensor], rank: int) -> float:
    """The file's alpha for one layer: its ``alpha`` tensor, else the rank (ComfyUI scales by 1 without one)."""
    return float(tensors["alpha"]) if "alpha" in tensors else float(rank)


def check_rank(name: str, target: Target, rank: int) -> None:
    """ValueError naming the setting to change when a file's rank for ``target`` is not the run's."""
    if rank != target.rank:
        raise ValueError(f"{name}: rank {rank} in the file, {target.rank} in this run: set adapter.rank = {rank} "
                         f"{BLOCKS_TOO}")


def check_alpha(name: str, target: Target, alpha: float) -> None:
    """ValueError naming the setting to change when a file's alpha for ``target`` is not the run's: continuing
    must train at the scale the file was trained at."""
    if not math.isclose(alpha, target.alpha, rel_tol=1e-6):
        raise ValueError(f"{name}: alpha {alpha:g} in the file, {target.alpha:g} in this run: set adapter.alpha = "
                         f"{alpha:g} {BLOCKS_TOO}")


BLOCKS_TOO = "(or in the [[adapter.blocks]] entry that matches the layer)"
