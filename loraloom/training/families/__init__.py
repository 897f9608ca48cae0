"""Model families by name: the only list. Each module offers the same functions (see flux.py)."""

from types import ModuleType

from . import flux

FAMILIES: dict[str, ModuleType] = {flux.NAME: flux}
