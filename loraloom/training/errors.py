"""Errors phrased so the user can act on them, and optional packages named when they are missing."""

from __future__ import annotations

from typing import Any

from .offline import import_offline


class ConfigError(ValueError):
    """A configuration problem, phrased so the user can fix it from the message alone."""


def optional_module(name: str, setting: str, instead: str) -> Any:
    """Import an optional dependency that ``setting`` needs, or say how to install it or what to use instead."""
    try:
        return import_offline(name)
    except ImportError as e:
        raise ConfigError(f"{setting} needs {name}, which is not importable here ({e}). Install it "
                          f"(pip install {name}) or use {instead}.") from None
