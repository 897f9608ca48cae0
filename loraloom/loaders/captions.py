"""Caption processors: small composable steps from a caption file (or booru tags) to the text a model reads.

A caption is parsed once into sections: ``head`` (kept in front), ``body`` (shuffled and dropped) and ``tail``
(kept at the end). In a caption file the sections are separated by ``|||``::

    1girl, hatsune miku, vocaloid ||| smile, long hair, twintails ||| masterpiece, newest, safe

Each processor is a frozen settings object registered in :data:`PROCESSORS` whose ``apply(caption, rng)`` is a
pure function of (caption, settings, rng); ``PER_STEP`` says whether its output depends on ``rng`` (then the
text changes between steps and cached text embeddings need variants, see ``data.caption_variants``). The
dataset runs the fixed processors once per record when it indexes (:func:`split_chain`,
:func:`prepare_captions`) and only the per-step ones at each step.
Natural-language captions (``natural=True``) pass through the tag processors untouched.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, NamedTuple

SECTION_SEPARATOR = "|||"


class Caption(NamedTuple):  # a NamedTuple, not a dataclass: built ~7 times per caption, 5x cheaper
    head: tuple[str, ...] = ()
    body: tuple[str, ...] = ()
    tail: tuple[str, ...] = ()
    natural: bool = False  # natural-language text (one string in body), not tags
    alternatives: tuple[Caption, ...] = ()  # further captions of the same image (more lines in the file)

    def render(self) -> str:
        return ", ".join(self.head + self.body + self.tail)

    def with_tags(self, head: tuple[str, ...], body: tuple[str, ...], tail: tuple[str, ...]) -> Caption:
        return Caption(head, body, tail, self.natural, self.alternatives)

    def map_tags(self, fn) -> Caption:
        """Apply ``fn`` (a tuple of tags → tuple of tags) to every section; natural text is left alone."""
        if self.natural:
            return self
        return Caption(fn(self.head), fn(self.body), fn(self.tail), False, self.alternatives)

    def rewrite_tags(self, fn) -> Caption:
        """Apply ``fn`` (a tuple of tags → one new tag for each) to all sections at once; natural text is left
        alone. One call instead of three: most of a tag-wise rewrite's cost is per call, not per tag."""
        if self.natural:
            return self
        head, body = len(self.head), len(self.head) + len(self.body)
        tags = fn(self.head + self.body + self.tail)
        return Caption(tags[:head], tags[head:body], tags[body:], False, self.alternatives)


def split_tags(text: str) -> tuple[str, ...]:
    return tuple(filter(None, map(str.strip, text.split(","))))  # empty tags dropped


def _parse_line(line: str, natural: bool) -> Caption:
    if natural:
        return Caption(body=(line.strip(),), natural=True)
    parts = line.split(SECTION_SEPARATOR)
    if len(parts) > 3:
        raise ValueError(f"at most two '{SECTION_SEPARATOR}' separators (kept ||| shuffled ||| kept), got {line!r}")
    if len(parts) == 1:
        return Caption(body=split_tags(parts[0]))
    return Caption(*(split_tags(p) for p in parts))


def parse_caption(text: str, natural: bool = False) -> Caption:
    """A caption file's text: each non-empty line is one caption (the first one unless ``choose`` is on)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return Caption(natural=natural)
    first, *rest = (_parse_line(line, natural) for line in lines)
    return first._replace(alternatives=tuple(rest)) if rest else first


# ------------------------------------------------------------------ the registry

PROCESSORS: dict[str, type[Processor]] = {}


class Processor:
    """Base of the registered settings classes: ``apply`` must not touch anything but its arguments."""
    NAME: ClassVar[str]
    PER_STEP: ClassVar[bool] = False

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        raise NotImplementedError


def register(name: str, per_step: bool = False):
    def add(cls: type[Processor]) -> type[Processor]:
        cls.NAME, cls.PER_STEP = name, per_step
        PROCESSORS[name] = cls
        return cls
    return add


@register("choose", per_step=True)
@dataclass(frozen=True)
class Choose(Processor):
    """Pick one of the image's captions (lines of its caption file) at random."""

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        if not caption.alternatives:
            return caption
        options = (caption._replace(alternatives=()), *caption.alternatives)
        return options[rng.randrange(len(options))]


@register("keep_first")
@dataclass(frozen=True)
class KeepFirst(Processor):
    """Move the first ``count`` shuffled tags into the kept head (kohya's keep_tokens)."""
    count: int = 1

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        if caption.natural or self.count <= 0:
            return caption
        return caption.with_tags(caption.head + caption.body[:self.count], caption.body[self.count:], caption.tail)


@register("replace")
@dataclass(frozen=True)
class Replace(Processor):
    """Replace whole tags: ``pairs`` of (old, new); an empty new tag removes the old one."""
    pairs: tuple[tuple[str, str], ...] = ()

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        table = dict(self.pairs)
        return caption.map_tags(lambda tags: tuple(n for n in (table.get(t, t) for t in tags) if n))


@register("blacklist")
@dataclass(frozen=True)
class Blacklist(Processor):
    """Remove these tags (compared after stripping, case-sensitive as booru tags are)."""
    tags: tuple[str, ...] = ()

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        banned = frozenset(self.tags)
        return caption.map_tags(lambda tags: tuple(t for t in tags if t not in banned))


@register("underscores")
@dataclass(frozen=True)
class Underscores(Processor):
    """Underscores to spaces, except in tags of at most ``keep_length`` characters (emoticons: ``^_^``)."""
    keep_length: int = 3

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        return caption.rewrite_tags(lambda tags: _underscores(tags, self.keep_length))


def _underscores(tags: tuple[str, ...], keep_length: int) -> tuple[str, ...]:
    joined = "\0".join(tags)
    if "_" not in joined:
        return tags
    # One replace for all tags, unless a short tag holds an underscore (or a tag holds the \0 joining them).
    if joined.count("\0") == len(tags) - 1 and not _short_with_underscore(keep_length).search(f"\0{joined}\0"):
        return tuple(joined.replace("_", " ").split("\0"))
    return tuple([t if len(t) <= keep_length else t.replace("_", " ") for t in tags])


@functools.cache
def _short_with_underscore(keep_length: int) -> re.Pattern:
    """Finds a tag of at most ``keep_length`` characters holding an underscore in NUL-joined tags (with a NUL
    at either end). It starts with a literal NUL, so the regex engine skips from tag start to tag start."""
    return re.compile(f"\0(?=[^\0]{{0,{keep_length}}}\0)[^\0_]*_")


_PAREN = re.compile(r"(?<!\\)([()])")


@register("escape_parentheses")
@dataclass(frozen=True)
class EscapeParentheses(Processor):
    """``name (series)`` → ``name \\(series\\)`` so prompt syntax does not read it as emphasis."""

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        return caption.rewrite_tags(_escape_parentheses)


def _escape_parentheses(tags: tuple[str, ...]) -> tuple[str, ...]:
    joined = "\0".join(tags)  # one regex pass for all tags instead of one per tag
    if "(" not in joined and ")" not in joined:
        return tags
    if joined.count("\0") != len(tags) - 1:  # a tag holds the NUL joining them
        return tuple(_PAREN.sub(r"\\\1", t) for t in tags)
    return tuple(_PAREN.sub(r"\\\1", joined).split("\0"))


@register("dedupe")
@dataclass(frozen=True)
class Dedupe(Processor):
    """Drop repeated tags, keeping the first occurrence (across all sections)."""

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        if caption.natural:
            return caption
        tags = caption.head + caption.body + caption.tail
        if len(frozenset(tags)) == len(tags):  # the common case, found at the cost of one set
            return caption
        # dict.fromkeys keeps each tag's first occurrence, in order; the head and tail are a few tags each.
        head, body = dict.fromkeys(caption.head), dict.fromkeys(caption.body)
        for tag in head:
            body.pop(tag, None)
        tail = tuple([t for t in dict.fromkeys(caption.tail) if t not in head and t not in body])
        return caption.with_tags(tuple(head), tuple(body), tail)


@register("prefix")
@dataclass(frozen=True)
class Prefix(Processor):
    """Put ``text`` (a trigger word, or tags) in front, unless the caption already has it."""
    text: str = ""

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        if not self.text or self.text in caption.head + caption.body + caption.tail:
            return caption
        return caption.with_tags((self.text, *caption.head), caption.body, caption.tail)


@register("suffix")
@dataclass(frozen=True)
class Suffix(Processor):
    """Put ``text`` at the end."""
    text: str = ""

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        return caption.with_tags(caption.head, caption.body, (*caption.tail, self.text)) if self.text else caption


@register("shuffle", per_step=True)
@dataclass(frozen=True)
class Shuffle(Processor):
    """Shuffle the body tags; head and tail keep their place."""

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        if caption.natural or len(caption.body) < 2:
            return caption
        draw = rng.random  # sorting by i.i.d. uniform keys is a uniform shuffle, 3x faster than rng.shuffle
        return caption.with_tags(caption.head, tuple(sorted(caption.body, key=lambda _: draw())), caption.tail)


@register("tag_dropout", per_step=True)
@dataclass(frozen=True)
class TagDropout(Processor):
    """Drop each body tag with ``probability`` (Kohaku: 0.15 of the general tags)."""
    probability: float = 0.15

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        if caption.natural or self.probability <= 0:
            return caption
        p, draw = self.probability, rng.random
        return caption.with_tags(caption.head, tuple([t for t in caption.body if draw() >= p]), caption.tail)


@register("caption_dropout", per_step=True)
@dataclass(frozen=True)
class CaptionDropout(Processor):
    """Replace the whole caption by the empty one with ``probability`` (trains the unconditional branch)."""
    probability: float = 0.05

    def apply(self, caption: Caption, rng: random.Random) -> Caption:
        return Caption(natural=caption.natural) if rng.random() < self.probability else caption


# ------------------------------------------------------------------ settings → chain

@dataclass(frozen=True)
class CaptionSettings:
    """The caption pipeline of one source, applied in a fixed order (the order of the fields below)."""
    format: Literal["auto", "tags", "text"] = field(default="auto", metadata={"doc": (
        "'tags': comma-separated tags ('|||' separates kept-front / shuffled / kept-end sections); 'text': "
        "natural language, passed through the tag processors untouched; 'auto': the model family's own (text for "
        "families whose text encoder is a language model, tags otherwise).")})
    choose: bool = field(default=False, metadata={"doc": (
        "Several captions per image (one per line): pick one at random each step. Off: the first line.")})
    keep_first: int = field(default=0, metadata={"doc": "Keep the first N tags in front when shuffling."})
    replace: tuple[tuple[str, str], ...] = field(default=(), metadata={"doc": (
        "Tag replacements, [[old, new], ...]; an empty new tag removes the old one.")})
    blacklist: tuple[str, ...] = field(default=(), metadata={"doc": "Tags to remove."})
    underscores: bool = field(default=False, metadata={"doc": "Underscores to spaces (booru tags)."})
    keep_underscore_length: int = field(default=3, metadata={"doc": (
        "Tags up to this many characters keep their underscores (emoticons such as ^_^).")})
    escape_parentheses: bool = field(default=False, metadata={"doc": "Escape ( ) for prompt syntax."})
    dedupe: bool = field(default=False, metadata={"doc": "Remove repeated tags."})
    prefix: str = field(default="", metadata={"doc": "Text put in front of every caption (e.g. a trigger)."})
    suffix: str = field(default="", metadata={"doc": "Text put at the end of every caption."})
    shuffle: bool = field(default=False, metadata={"doc": "Shuffle the middle tags every step."})
    tag_dropout: float = field(default=0.0, metadata={"doc": "Drop each middle tag with this probability."})
    caption_dropout: float = field(default=0.0, metadata={"doc": (
        "Train on the empty caption with this probability (for classifier-free guidance).")})

    def chain(self, trigger: str = "") -> tuple[Processor, ...]:
        steps: list[Processor] = []
        if self.choose:
            steps.append(Choose())
        if self.keep_first:
            steps.append(KeepFirst(self.keep_first))
        if self.replace:
            steps.append(Replace(tuple(tuple(p) for p in self.replace)))
        if self.blacklist:
            steps.append(Blacklist(self.blacklist))
        if self.underscores:
            steps.append(Underscores(self.keep_underscore_length))
        if self.escape_parentheses:
            steps.append(EscapeParentheses())
        if self.dedupe:
            steps.append(Dedupe())
        for text in (trigger, self.prefix):
            if text:
                steps.append(Prefix(text))
        if self.suffix:
            steps.append(Suffix(self.suffix))
        if self.shuffle:
            steps.append(Shuffle())
        if self.tag_dropout:
            steps.append(TagDropout(self.tag_dropout))
        if self.caption_dropout:
            steps.append(CaptionDropout(self.caption_dropout))
        return tuple(steps)


def run_chain(caption: Caption, chain: Sequence[Processor], rng: random.Random) -> Caption:
    for step in chain:
        caption = step.apply(caption, rng)
    return caption


class SplitChain(NamedTuple):
    """A chain as the dataset runs it: ``fixed`` once per record (on every line of its caption file when the
    chain starts with choose), ``per_step`` on the result every step. Same output as running the chain."""
    fixed: tuple[Processor, ...]
    per_step: tuple[Processor, ...]

    @property
    def keeps_lines(self) -> bool:
        """Whether choose picks among the lines per step (then every line is prepared, not only the first)."""
        return bool(self.per_step) and isinstance(self.per_step[0], Choose)


def split_chain(chain: Sequence[Processor]) -> SplitChain:
    """(fixed, per_step): the processors up to the first per-step one, the rest after. A leading choose goes
    to the per-step part and the fixed processors after it run on every line, which changes nothing: they
    never read the rng, and choose draws only from the number of lines."""
    chain = tuple(chain)
    if any(isinstance(step, Choose) for step in chain[1:]):
        raise ValueError("choose must be the first processor of a chain (CaptionSettings.chain puts it there)")
    choose, rest = (chain[:1], chain[1:]) if chain and isinstance(chain[0], Choose) else ((), chain)
    for i, step in enumerate(rest):
        if step.PER_STEP:
            return SplitChain(rest[:i], choose + rest[i:])
    return SplitChain(rest, choose)


def process(text: str, chain: Sequence[Processor], rng: random.Random, natural: bool = False) -> str:
    """A caption file's text → the text the model reads."""
    return run_chain(parse_caption(text, natural), chain, rng).render()


# ------------------------------------------------------------------ prepared captions

# A caption after its fixed processors, packed into one string so that a million of them stay in the Arrow
# index (as tuples of Python strings they would take gigabytes): lines joined by LINE, each line the head and
# body tag counts ("2,28"), COUNTS, then all its tags joined by TAG. Control characters no caption should
# hold (a caption file's \x1d and \x1e even end a line); a caption that does is not packed (None) and is
# processed from its text instead.
LINE, COUNTS, TAG = "\x1e", "\x1d", "\x1f"


def fixed_part(text: str, natural: bool, split: SplitChain, rng: random.Random) -> Caption:
    """A caption file's text after the fixed processors; its further lines too if choose needs them."""
    caption = parse_caption(text, natural)
    if not split.keeps_lines:
        return run_chain(caption._replace(alternatives=()), split.fixed, rng)
    first, *rest = (run_chain(line, split.fixed, rng) for line in (caption._replace(alternatives=()),
                                                                    *caption.alternatives))
    return first._replace(alternatives=tuple(rest))


def prepare_captions(texts: Sequence[str], natural: bool, split: SplitChain) -> list[str | None]:
    """:func:`fixed_part` of each text, packed (None where a tag holds one of the separator characters)."""
    rng = random.Random(0)  # fixed processors do not draw from it
    return [_pack(fixed_part(text, natural, split, rng)) for text in texts]


def _pack(caption: Caption) -> str | None:
    lines = (caption, *caption.alternatives)
    tags = [c.head + c.body + c.tail for c in lines]
    packed = LINE.join(f"{len(c.head)},{len(c.body)}{COUNTS}{TAG.join(t)}" for c, t in zip(lines, tags))
    # Every separator where the layout puts it (else a tag, prefix or replacement holds one), and no line whose
    # only tag is "" (it would read back as no tag; no processor makes one, a custom one might).
    expected = (sum(max(len(t) - 1, 0) for t in tags), len(lines), len(lines) - 1)
    if (packed.count(TAG), packed.count(COUNTS), packed.count(LINE)) != expected or ("",) in tags:
        return None
    return packed


def unpack(packed: str, natural: bool) -> Caption:
    """The :class:`Caption` of a packed one, its further lines as alternatives. On every step: kept lean."""
    if LINE in packed:
        first, *rest = (unpack(line, natural) for line in packed.split(LINE))
        return first._replace(alternatives=tuple(rest))
    counts, _, joined = packed.partition(COUNTS)
    head, body = counts.split(",")
    head, end = int(head), int(head) + int(body)
    tags = tuple(joined.split(TAG)) if joined else ()
    return Caption(tags[:head], tags[head:end], tags[end:], natural)


def render_packed(packed: str) -> str:
    """``unpack(packed).render()`` without building the caption: the first line's tags joined."""
    return packed.split(LINE, 1)[0].partition(COUNTS)[2].replace(TAG, ", ")
