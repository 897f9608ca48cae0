"""Caption processor nodes: each sets a group of :class:`CaptionSettings` fields on the upstream settings.

They chain (normalise -> shuffle/dropout -> prefix/suffix -> format, in any order); the engine applies the
processors in its own fixed order whatever the wiring, so the order of the nodes does not matter. Nodes keep
no state: each returns a new frozen ``CaptionSettings``.
"""

from __future__ import annotations

import dataclasses

from ..loaders.captions import CaptionSettings, split_tags
from ..training.config import ConfigError
from .widgets import CATEGORY, field_doc, widget

SOCKET = "LORALOOM_CAPTIONS"
_UPSTREAM = {"captions": (SOCKET, {"tooltip": "Caption settings from another caption node; their fields are "
                                   "kept and this node's fields are set on top."})}


def _updated(captions: CaptionSettings | None, **fields) -> tuple[CaptionSettings]:
    return (dataclasses.replace(captions or CaptionSettings(), **fields),)


def parse_replacements(text: str) -> tuple[tuple[str, str], ...]:
    """``old=new`` per line (``old=`` removes the tag); blank lines are ignored."""
    pairs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        old, sep, new = line.partition("=")
        if not sep or not old.strip():
            raise ConfigError(f"caption replace: {line!r} is not 'old=new' (one replacement per line; 'old=' "
                              "removes the tag)")
        pairs.append((old.strip(), new.strip()))
    return tuple(pairs)


class _CaptionNode:
    CATEGORY = f"{CATEGORY}/captions"
    RETURN_TYPES = (SOCKET,)
    RETURN_NAMES = ("captions",)
    FUNCTION = "build"


class CaptionTags(_CaptionNode):
    DESCRIPTION = ("Clean up tags: replace or remove tags, underscores to spaces, escape parentheses, remove "
                   "repeated tags.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "underscores": widget(CaptionSettings, "underscores"),
            "keep_underscore_length": widget(CaptionSettings, "keep_underscore_length", min=0, max=64),
            "escape_parentheses": widget(CaptionSettings, "escape_parentheses"),
            "dedupe": widget(CaptionSettings, "dedupe"),
            "replace": ("STRING", {"default": "", "multiline": True,
                                   "tooltip": f"{field_doc(CaptionSettings, 'replace')} Here: one 'old=new' per "
                                              "line."}),
            "blacklist": ("STRING", {"default": "",
                                     "tooltip": f"{field_doc(CaptionSettings, 'blacklist')} Comma-separated."}),
        }, "optional": dict(_UPSTREAM)}

    def build(self, underscores: bool, keep_underscore_length: int, escape_parentheses: bool, dedupe: bool,
              replace: str, blacklist: str, captions: CaptionSettings | None = None) -> tuple[CaptionSettings]:
        return _updated(captions, underscores=underscores, keep_underscore_length=keep_underscore_length,
                        escape_parentheses=escape_parentheses, dedupe=dedupe, replace=parse_replacements(replace),
                        blacklist=split_tags(blacklist))


class CaptionShuffle(_CaptionNode):
    DESCRIPTION = ("Vary the caption every step: shuffle the middle tags, drop tags or the whole caption, pick "
                   "one of several captions per image.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "shuffle": widget(CaptionSettings, "shuffle"),
            "keep_first": widget(CaptionSettings, "keep_first", min=0, max=255),
            "tag_dropout": widget(CaptionSettings, "tag_dropout", min=0.0, max=1.0),
            "caption_dropout": widget(CaptionSettings, "caption_dropout", min=0.0, max=1.0),
            "choose": widget(CaptionSettings, "choose"),
        }, "optional": dict(_UPSTREAM)}

    def build(self, shuffle: bool, keep_first: int, tag_dropout: float, caption_dropout: float, choose: bool,
              captions: CaptionSettings | None = None) -> tuple[CaptionSettings]:
        return _updated(captions, shuffle=shuffle, keep_first=keep_first, tag_dropout=tag_dropout,
                        caption_dropout=caption_dropout, choose=choose)


class CaptionAffixes(_CaptionNode):
    DESCRIPTION = ("Text put in front of and after every caption, e.g. quality tags; the prefix goes before "
                   "the dataset's trigger.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "prefix": widget(CaptionSettings, "prefix"),
            "suffix": widget(CaptionSettings, "suffix"),
        }, "optional": dict(_UPSTREAM)}

    def build(self, prefix: str, suffix: str, captions: CaptionSettings | None = None) -> tuple[CaptionSettings]:
        return _updated(captions, prefix=prefix, suffix=suffix)


class CaptionFormat(_CaptionNode):
    DESCRIPTION = "Whether captions are comma-separated tags or natural-language text."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"format": widget(CaptionSettings, "format")}, "optional": dict(_UPSTREAM)}

    def build(self, format: str, captions: CaptionSettings | None = None) -> tuple[CaptionSettings]:
        return _updated(captions, format=format)
