"""ComfyUI widget specs built from the engine's config fields, so tooltips and defaults cannot drift."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

CATEGORY = "LoRA Loom"


def _field(cls: type, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def field_doc(cls: type, name: str) -> str:
    """The documentation of config field ``cls.name``."""
    return _field(cls, name).metadata["doc"]


def widget(cls: type, name: str, **options: Any) -> tuple:
    """The ComfyUI input spec of config field ``cls.name``: its type, default and doc as the tooltip."""
    f = _field(cls, name)
    tp = typing.get_type_hints(cls)[name]
    spec: dict[str, Any] = {"tooltip": f.metadata["doc"]}
    if f.default is not dataclasses.MISSING:
        spec["default"] = f.default
    spec.update(options)
    if typing.get_origin(tp) is typing.Literal:
        return (list(typing.get_args(tp)), spec)
    kind = {bool: "BOOLEAN", int: "INT", float: "FLOAT", str: "STRING"}[tp]
    if kind == "FLOAT":
        spec.setdefault("step", 0.01)
    return (kind, spec)
