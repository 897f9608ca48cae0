"""Caption processors and booru captions: exact outputs under a fixed seed."""

from __future__ import annotations

import random
import re

import pytest

from loraloom.loaders import captions as cp
from loraloom.loaders.booru import BooruSettings, created_year, kohaku_captions, quality_levels, rating_name, year_tag

TEXT = ("1girl, hatsune_miku ||| smile, long_hair, ^_^, looking_at_viewer, smile, name_(series) "
        "||| masterpiece, newest")


def render(processor: cp.Processor, text: str = TEXT, seed: int = 0) -> str:
    return processor.apply(cp.parse_caption(text), random.Random(seed)).render()


def test_parse_splits_sections_lines_and_keeps_natural_text_whole():
    c = cp.parse_caption(TEXT)
    assert c.head == ("1girl", "hatsune_miku") and c.tail == ("masterpiece", "newest")
    assert c.body[0] == "smile" and len(c.body) == 6
    assert cp.parse_caption("a, b").body == ("a", "b") and cp.parse_caption("a, b").head == ()
    assert cp.parse_caption("x ||| y").head == ("x",) and cp.parse_caption("x ||| y").body == ("y",)
    two = cp.parse_caption("a, b\n\nc, d\n")
    assert two.body == ("a", "b") and two.alternatives[0].body == ("c", "d")
    natural = cp.parse_caption("A woman, smiling (at dawn), with_underscores.", natural=True)
    assert natural.body == ("A woman, smiling (at dawn), with_underscores.",)
    with pytest.raises(ValueError, match="at most two"):
        cp.parse_caption("a ||| b ||| c ||| d")


@pytest.mark.parametrize("processor, expected", [
    (cp.KeepFirst(2), "1girl, hatsune_miku, smile, long_hair, ^_^, looking_at_viewer, smile, name_(series), "
                      "masterpiece, newest"),
    (cp.Replace((("smile", "grin"), ("name_(series)", ""))),
     "1girl, hatsune_miku, grin, long_hair, ^_^, looking_at_viewer, grin, masterpiece, newest"),
    (cp.Blacklist(("smile", "newest")),
     "1girl, hatsune_miku, long_hair, ^_^, looking_at_viewer, name_(series), masterpiece"),
    (cp.Underscores(3), "1girl, hatsune miku, smile, long hair, ^_^, looking at viewer, smile, name (series), "
                        "masterpiece, newest"),
    (cp.Underscores(0), "1girl, hatsune miku, smile, long hair, ^ ^, looking at viewer, smile, name (series), "
                        "masterpiece, newest"),
    (cp.EscapeParentheses(), "1girl, hatsune_miku, smile, long_hair, ^_^, looking_at_viewer, smile, "
                             "name_\\(series\\), masterpiece, newest"),
    (cp.Dedupe(), "1girl, hatsune_miku, smile, long_hair, ^_^, looking_at_viewer, name_(series), masterpiece, "
                  "newest"),
    (cp.Prefix("zwx"), "zwx, 1girl, hatsune_miku, smile, long_hair, ^_^, looking_at_viewer, smile, "
                       "name_(series), masterpiece, newest"),
    (cp.Prefix("smile"), "1girl, hatsune_miku, smile, long_hair, ^_^, looking_at_viewer, smile, name_(series), "
                         "masterpiece, newest"),
    (cp.Suffix("end"), "1girl, hatsune_miku, smile, long_hair, ^_^, looking_at_viewer, smile, name_(series), "
                       "masterpiece, newest, end"),
    (cp.Shuffle(), "1girl, hatsune_miku, looking_at_viewer, name_(series), ^_^, smile, long_hair, smile, "
                   "masterpiece, newest"),
    (cp.TagDropout(0.5), "1girl, hatsune_miku, smile, long_hair, smile, masterpiece, newest"),
    (cp.CaptionDropout(0.9), ""),
    (cp.CaptionDropout(0.5), TEXT.replace(" |||", ",")),
])
def test_each_processor_gives_the_exact_output_under_seed_0(processor, expected):
    assert render(processor) == expected


def test_every_registered_processor_is_tested_and_declares_whether_it_varies():
    assert set(cp.PROCESSORS) == {"choose", "keep_first", "replace", "blacklist", "underscores",
                                  "escape_parentheses", "dedupe", "prefix", "suffix", "shuffle", "tag_dropout",
                                  "caption_dropout"}
    per_step = {name for name, cls in cp.PROCESSORS.items() if cls.PER_STEP}
    assert per_step == {"choose", "shuffle", "tag_dropout", "caption_dropout"}


def test_choose_picks_among_the_lines_and_depends_only_on_the_rng():
    text = "a, b\nc, d\ne"
    picks = {render(cp.Choose(), text, seed) for seed in range(20)}
    assert picks == {"a, b", "c, d", "e"}
    assert render(cp.Choose(), text, 5) == render(cp.Choose(), text, 5)


def test_natural_language_passes_the_tag_processors_untouched():
    text = "A photo of a_cat, (sitting) on a mat, a photo."
    chain = cp.CaptionSettings(underscores=True, escape_parentheses=True, dedupe=True, shuffle=True,
                               tag_dropout=0.9, blacklist=("a photo.",)).chain()
    assert cp.process(text, chain, random.Random(0), natural=True) == text
    assert cp.process(text, cp.CaptionSettings(prefix="zwx").chain(), random.Random(0), natural=True) == \
        f"zwx, {text}"


def test_the_kohaku_chain_keeps_sections_and_varies_only_the_middle():
    settings = cp.CaptionSettings(underscores=True, escape_parentheses=True, dedupe=True, shuffle=True,
                                  tag_dropout=0.15)
    chain = settings.chain()
    fixed, per_step = cp.split_chain(chain)
    assert [p.NAME for p in fixed] == ["underscores", "escape_parentheses", "dedupe"]
    assert [p.NAME for p in per_step] == ["shuffle", "tag_dropout"]
    outputs = {cp.process(TEXT, chain, random.Random(seed)) for seed in range(10)}
    assert len(outputs) > 5
    for out in outputs:
        tags = out.split(", ")
        assert tags[:2] == ["1girl", "hatsune miku"] and tags[-2:] == ["masterpiece", "newest"]
        assert "^_^" in tags or "^_^" not in out  # the emoticon keeps its underscore when it survives dropout
    assert cp.process(TEXT, chain, random.Random(3)) == cp.process(TEXT, chain, random.Random(3))


def random_caption(rng: random.Random) -> str:
    """Booru-like caption text: sections, several lines, underscores, parentheses, repeats, stray spaces."""
    vocab = ["1girl", "solo", "smile", "long_hair", "^_^", "name_(series)", "a_(b)_c", "x", "looking_at_viewer",
             "masterpiece", "(paren)", "esc\\(aped\\)", "blue_eyes", "tag_with_many_underscores"]

    def tags(low: int, high: int) -> str:
        return (" ," if rng.random() < 0.2 else ", ").join(rng.choice(vocab) for _ in range(rng.randint(low, high)))
    lines = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        form = rng.randrange(3)
        lines.append(tags(0, 20) if form == 0 else f"{tags(0, 3)} ||| {tags(0, 25)}" if form == 1 else
                     f"{tags(0, 3)} ||| {tags(0, 25)} ||| {tags(0, 4)}")
    return "\n".join(lines)


SETTINGS = [
    cp.CaptionSettings(underscores=True, escape_parentheses=True, dedupe=True, shuffle=True, tag_dropout=0.15),
    cp.CaptionSettings(choose=True, keep_first=2, underscores=True, dedupe=True, shuffle=True, tag_dropout=0.3,
                       caption_dropout=0.1),
    cp.CaptionSettings(keep_first=1, replace=(("smile", "grin"), ("x", ""), ("solo", "a, b")), blacklist=("^_^",),
                       underscores=True, keep_underscore_length=0, escape_parentheses=True, dedupe=True,
                       prefix="pre", suffix="suf", shuffle=True, tag_dropout=0.5, caption_dropout=0.2),
    cp.CaptionSettings(underscores=True, escape_parentheses=True, prefix="fixed only"),
    cp.CaptionSettings(choose=True),
    cp.CaptionSettings(format="text", choose=True, shuffle=True, tag_dropout=0.5, caption_dropout=0.3),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_prepared_captions_give_exactly_the_output_of_the_whole_chain(settings):
    """The dataset runs the fixed processors once (packed into the index) and the per-step ones each step."""
    rng = random.Random(1)
    natural = settings.format == "text"
    chain = settings.chain(trigger="trig")
    split = cp.split_chain(chain)
    texts = [random_caption(rng) for _ in range(300)] + ["", "a", "\n\n", "||| a |||", "a, a ||| a ||| a"]
    for text, packed in zip(texts, cp.prepare_captions(texts, natural, split)):
        assert packed is not None
        for seed in range(3):
            whole = cp.process(text, chain, random.Random(seed), natural)
            assert cp.run_chain(cp.unpack(packed, natural), split.per_step, random.Random(seed)).render() == whole
        first = cp.fixed_part(text, natural, split, random.Random(0))
        assert cp.render_packed(packed) == first.render() == \
            cp.run_chain(cp.parse_caption(text, natural), split.fixed, random.Random(0)).render()


@pytest.mark.parametrize("keep_length", [0, 1, 3, 5])
def test_fast_rewrites_equal_their_one_tag_at_a_time_definitions(keep_length):
    """Underscores, escaping and dedupe take shortcuts over all tags at once; on tags that defeat them (short
    tags with underscores, a NUL inside a tag, repeats across sections) they must still give the plain answer."""
    rng = random.Random(keep_length)
    vocab = ["^_^", "_", "a_", "ab_c", "o_o_o", "long_tag_name", "x", "(p)", "q\\(r\\)", "nul\0_in", "", "old", "1girl"]
    for _ in range(2000):
        head, body, tail = (tuple(rng.choice(vocab) for _ in range(rng.randint(0, n))) for n in (3, 12, 3))
        caption = cp.Caption(head, body, tail)
        spaced = cp.Underscores(keep_length).apply(caption, rng)
        assert spaced == caption.map_tags(lambda tags: tuple(
            t if len(t) <= keep_length else t.replace("_", " ") for t in tags))
        escaped = cp.EscapeParentheses().apply(caption, rng)
        assert escaped == caption.map_tags(lambda tags: tuple(
            re.sub(r"(?<!\\)([()])", r"\\\1", t) for t in tags))
        seen: set[str] = set()
        firsts = [tuple(t for t in section if not (t in seen or seen.add(t))) for section in (head, body, tail)]
        assert cp.Dedupe().apply(caption, rng) == cp.Caption(*firsts)


def test_a_caption_holding_a_separator_character_is_not_packed():
    split = cp.split_chain(cp.CaptionSettings(shuffle=True).chain())
    texts = ["a\x1fb, c", "a ||| b\x1fc", "a, b"]  # (\x1d and \x1e end a line, like \n)
    assert [p is None for p in cp.prepare_captions(texts, False, split)] == [True, True, False]
    assert cp.prepare_captions(["odd\x1fnatural text"], True, split) == [None]
    with pytest.raises(ValueError, match="choose must be the first"):
        cp.split_chain((cp.Shuffle(), cp.Choose()))


def test_quality_levels_rank_within_each_rating_by_hand():
    # general: 1..10. numpy linear percentiles: p90 9.1, p75 7.75, p60 6.4, p45 5.05, p30 3.7, p10 1.9.
    # explicit: 0, 0, 5, 100 -> p90 71.5, p75 28.75, p60 3, p45 0.75, p30 0, p10 0.
    levels = quality_levels(["general"] * 10 + ["explicit"] * 4, [*range(1, 11), 0, 0, 5, 100])
    assert levels.tolist() == [6, 5, 5, 4, 4, 3, 2, 1, 1, 0, 4, 4, 2, 0]


def columns(records: list[dict]) -> dict[str, list]:
    return {k: [r.get(k) for r in records] for k in {k for r in records for k in r}}


def test_ratings_years_and_the_kohaku_template():
    assert rating_name("e") == "explicit" and rating_name("General") == "general"
    assert [year_tag(y) for y in (2005, 2012, 2016, 2019, 2024, 2031)] == \
        ["old", "early", "mid", "recent", "newest", "newest"]
    assert year_tag(2012, ((2000, 2015, "then"),)) == "then" and year_tag(2020, ((2000, 2015, "then"),)) == ""
    assert created_year("2023-01-02T00:00:00.000-05:00") == 2023 and created_year(1_700_000_000) == 2023
    assert created_year(None) == 0
    records = [
        dict(tag_string_general="solo 1girl smile long_hair", tag_string_character="hatsune_miku",
             tag_string_copyright="vocaloid", tag_string_artist="some_artist", tag_string_meta="highres",
             rating="e", fav_count=50, created_at="2022-05-01"),
        dict(tag_string_general="no_humans scenery", rating="g", fav_count=1, created_at="2009-01-01"),
        dict(tag_string_general="2boys", rating="g", fav_count=9, created_at="2016-01-01"),
    ]
    assert kohaku_captions(columns(records), 3) == [
        "1girl, hatsune_miku, vocaloid, some_artist ||| solo, smile, long_hair ||| masterpiece, newest, highres, "
        "nsfw, explicit",
        "no_humans ||| scenery ||| worst quality, old, safe",
        "2boys |||  ||| masterpiece, mid, safe",
    ]
    no_meta = kohaku_captions(columns(records[:1]), 1, BooruSettings(meta_tags=False))[0]
    assert no_meta.endswith("||| masterpiece, newest, nsfw, explicit")
    chain = cp.CaptionSettings(underscores=True).chain()
    assert cp.process(kohaku_captions(columns(records), 3)[1], chain, random.Random(0)) == \
        "no humans, scenery, worst quality, old, safe"
