"""Caption processor nodes and the metadata-file dataset node, without ComfyUI: only ``host.input_dir`` is
replaced; the previews are the engine's own (``describe_dataset``)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from loraloom.loaders.captions import CaptionSettings
from loraloom.nodes import NODE_CLASS_MAPPINGS, host
from loraloom.nodes.captions import CaptionAffixes, CaptionFormat, CaptionShuffle, CaptionTags
from loraloom.nodes.settings import DatasetFolder, DatasetMetadata
from loraloom.training.config import ConfigError


@pytest.fixture
def input_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "input"
    folder.mkdir()
    monkeypatch.setattr(host, "input_dir", lambda: folder)
    return folder


def caption_lines(preview: str) -> list[str]:
    return [line for line in preview.splitlines() if line.startswith("  epoch ")]


def test_chained_caption_nodes_combine_their_fields():
    (tags,) = CaptionTags().build(True, 3, False, True, "cat = dog\n\nbad=\n", "ugly, , blurry ")
    (both,) = CaptionShuffle().build(True, 2, 0.1, 0.05, False, captions=tags)
    (named,) = CaptionAffixes().build("masterpiece", "best quality", captions=both)
    (final,) = CaptionFormat().build("tags", captions=named)
    assert final == CaptionSettings(
        format="tags", underscores=True, keep_underscore_length=3, dedupe=True, replace=(("cat", "dog"), ("bad", "")),
        blacklist=("ugly", "blurry"), shuffle=True, keep_first=2, tag_dropout=0.1, caption_dropout=0.05,
        prefix="masterpiece", suffix="best quality")
    assert tags.shuffle is False  # upstream settings are never changed: the nodes keep no state
    assert CaptionAffixes().build("p", "")[0] == CaptionSettings(prefix="p")
    with pytest.raises(ConfigError, match="'cat dog'"):
        CaptionTags().build(False, 3, False, False, "cat dog", "")


def test_dataset_folder_previews_captions_after_the_caption_chain(input_dir, shapes_folder):
    folder = input_dir / "tagged"
    folder.mkdir()
    for name, caption in (("0000", "long_tag, ^_^, red"), ("0001", "blue_sky, ^_^")):
        shutil.copy(shapes_folder / f"{name}.png", folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    (chain,) = CaptionAffixes().build("masterpiece", "", captions=CaptionTags().build(True, 3, False, False, "", "")[0])
    data, preview = DatasetFolder().build("tagged", ".txt", "", 64, 0, captions=chain)
    assert data.captions == chain and data.images == str(folder)
    shown = sorted(line.split("] ", 1)[1] for line in caption_lines(preview))
    assert shown == ["0000.png: 'masterpiece, long tag, ^_^, red'", "0001.png: 'masterpiece, blue sky, ^_^'"]

    _, raw = DatasetFolder().build("tagged", ".txt", "", 64, 0)  # no chain: the files' text as it is
    assert sorted(line.split("] ", 1)[1] for line in caption_lines(raw)) == [
        "0000.png: 'long_tag, ^_^, red'", "0001.png: 'blue_sky, ^_^'"]


def test_metadata_file_node_builds_a_one_source_dataset(input_dir, shapes_folder):
    rows = [{"file": f"{i:04d}.png", "caption": f"shape_{i}"} for i in range(3)]
    (input_dir / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (chain,) = CaptionTags().build(True, 3, False, False, "", "")
    data, preview = DatasetMetadata().build("meta.jsonl", "file", "caption", False, str(shapes_folder), 2, "zwx",
                                            64, 0, captions=chain)
    assert data.images == "" and len(data.sources) == 1
    source = data.sources[0]
    assert source.path == str(input_dir / "meta.jsonl") and source.path_column == "file"
    assert source.caption_columns == ("caption",) and source.repeats == 2 and source.captions == chain
    lines = preview.splitlines()
    assert lines[0].startswith("3 images: 3 for training")
    assert f"  {input_dir / 'meta.jsonl'}: 3 images, 6 per epoch with repeats" in lines
    shown = {line.split("] ", 1)[1] for line in caption_lines(preview)}
    assert shown == {f"{i:04d}.png: 'zwx, shape {i}'" for i in range(3)}

    with pytest.raises(ConfigError, match=re.escape(str(input_dir / "missing.jsonl"))):
        DatasetMetadata().build("missing.jsonl", "path", "caption", False, "", 1, "", 64, 0)


def test_new_nodes_are_registered_under_the_pack_prefix():
    for cls in (CaptionTags, CaptionShuffle, CaptionAffixes, CaptionFormat, DatasetMetadata):
        node_id = next(k for k, v in NODE_CLASS_MAPPINGS.items() if v is cls)
        assert node_id.startswith("LoraLoom") and cls.CATEGORY.startswith("LoRA Loom/")
        assert cls.INPUT_TYPES()["optional"]["captions"][0] == "LORALOOM_CAPTIONS"
