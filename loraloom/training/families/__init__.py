"""Model families by name: the only list. Each is one module implementing :class:`.base.Family`."""

from __future__ import annotations

from ..errors import ConfigError
from .base import Family
from .flux import Flux
from .lumina2 import Lumina2
from .sdxl import Sdxl

FAMILIES: dict[str, Family] = {family.name: family for family in (Flux(), Lumina2(), Sdxl())}
DEFAULT_FAMILY = "flux"  # model.family when a config leaves it out


def family(name: str) -> Family:
    """The family called ``name``; a ConfigError listing the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.family = {name!r} is not one of {sorted(FAMILIES)}") from None
