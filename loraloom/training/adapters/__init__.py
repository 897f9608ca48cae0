"""Adapter algorithms by name: the only list. Each is one module implementing :class:`.base.Adapter`.

The list names modules rather than importing them: peft and lycoris-lora take seconds to import, and the config
(which validates ``adapter.algorithm`` against this list) must stay quick to load.
"""

from __future__ import annotations

import importlib

import torch

from ..errors import ConfigError

# adapter.algorithm -> "module:class" under this package.
ALGORITHMS = {
    "lora": "lora:Lora",
    "full": "full:Full",
}
# The algorithms whose class says ``whole_model`` (they train the model's own weights), known without importing
# them: the config refuses float8 / 4-bit bases for them. tests/test_full.py checks it against the classes.
WHOLE_MODEL = frozenset({"full"})


def algorithm(name: str) -> type:
    """The :class:`.base.Adapter` class called ``name``."""
    if name not in ALGORITHMS:
        raise ConfigError(f"adapter.algorithm = {name!r} is not one of {sorted(ALGORITHMS)}")
    module, cls = ALGORITHMS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def attach(components: dict[str, torch.nn.Module], patterns: dict[str, str], settings, seed: int):
    """Wrap the modules of ``components`` that ``patterns`` (and ``settings.blocks``) select with the algorithm
    of ``settings``; returns the :class:`.base.Adapter`."""
    from .base import select_targets

    cls = algorithm(settings.algorithm)
    return cls(components, select_targets(components, patterns, settings, cls.layers), settings, seed)
