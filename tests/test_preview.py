"""Comparison sheets show each input unaltered (only enlarged) in its column; loss charts draw their lines."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from loraloom.training import preview
from loraloom.training.preview import loss_chart, side_by_side, upscale_for_view


def _noise(seed: int, size: int = 64) -> Image.Image:
    """Random colours: an exact match of such a patch in the sheet can only be the pasted image."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _find(sheet: np.ndarray, patch: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where ``patch`` occurs exactly in ``sheet``."""
    ph, pw = patch.shape[:2]
    ys, xs = np.nonzero((sheet == patch[0, 0]).all(-1))
    return [(int(y), int(x)) for y, x in zip(ys, xs)
            if y + ph <= sheet.shape[0] and x + pw <= sheet.shape[1]
            and np.array_equal(sheet[y:y + ph, x:x + pw], patch)]


def test_upscale_uses_whole_factors_and_nearest():
    img = _noise(0, 64)
    big = upscale_for_view(img)
    assert big.size == (192, 192)
    assert np.array_equal(np.asarray(big)[::3, ::3], np.asarray(img))
    assert upscale_for_view(_noise(1, 256)).size == (256, 256)  # large images are left alone
    assert upscale_for_view(_noise(2, 50)).size == (200, 200)


def test_each_column_holds_its_enlarged_images_in_row_order():
    columns = {"base model": [_noise(0), _noise(1)], "with LoRA": [_noise(2), _noise(3)]}
    sheet = side_by_side(columns, row_labels=["seed 0", "seed 1"], title="demo")
    arr = np.asarray(sheet)
    assert sheet.mode == "RGB"
    found = {}
    for name, imgs in columns.items():
        for row, img in enumerate(imgs):
            hits = _find(arr, np.asarray(upscale_for_view(img)))
            assert len(hits) == 1, (name, row, hits)
            found[name, row] = hits[0]
    # Columns left to right in dict order, rows top to bottom, cells aligned on a grid.
    assert found["base model", 0][1] < found["with LoRA", 0][1]
    assert found["base model", 0][0] < found["base model", 1][0]
    assert found["base model", 0][0] == found["with LoRA", 0][0]
    assert found["base model", 1][1] == found["base model", 0][1]
    # Labels, row labels and title are drawn: the space above and left of the images is not blank.
    top, left = found["base model", 0]
    assert (arr[:top] != preview.BACKGROUND).any()
    assert (arr[:, :left] != preview.BACKGROUND).any()


def test_sheet_grows_with_columns_rows_and_labels():
    one = side_by_side({"a": [_noise(0)]})
    two_cols = side_by_side({"a": [_noise(0)], "b": [_noise(1)]})
    two_rows = side_by_side({"a": [_noise(0), _noise(1)]})
    labelled = side_by_side({"a": [_noise(0)]}, row_labels=["seed 0"], title="title")
    assert one.width >= 192 and one.height >= 192
    assert two_cols.width > one.width and two_cols.height == one.height
    assert two_rows.height > one.height and two_rows.width == one.width
    assert labelled.width > one.width and labelled.height > one.height


def test_side_by_side_rejects_bad_input():
    with pytest.raises(ValueError):
        side_by_side({})
    with pytest.raises(ValueError, match="row labels"):
        side_by_side({"a": [_noise(0)]}, row_labels=["seed 0", "seed 1"])


def _has_colour(img: Image.Image, colour: tuple[int, int, int], at_least: int = 20,
                left_half: bool = False) -> bool:
    """Whether ``colour`` covers ``at_least`` pixels; ``left_half`` looks only where the legend is not."""
    arr = np.asarray(img)
    if left_half:
        arr = arr[:, : img.width // 2]
    return int((arr == colour).all(-1).sum()) >= at_least


def test_loss_chart_draws_train_and_validation_lines():
    steps = list(range(1, 101))
    losses = [1.0 / s + 0.05 * ((s * 7919) % 13) / 13 for s in steps]
    chart = loss_chart(steps, losses, [25, 50, 75, 100], [0.5, 0.3, 0.25, 0.2], size=(500, 300))
    assert chart.size == (500, 300) and chart.mode == "RGB"
    # Left half: the plotted lines themselves, not just their legend swatches (top right).
    assert _has_colour(chart, preview.TRAIN, left_half=True) and _has_colour(chart, preview.VAL, left_half=True)
    assert not _has_colour(chart, preview.TRAIN_RAW, at_least=1)


def test_loss_chart_smoothing_draws_raw_and_smoothed_lines():
    steps = list(range(50))
    losses = [1.0 - s / 60 + (0.2 if s % 2 else 0.0) for s in steps]
    chart = loss_chart(steps, losses, smoothing=0.8)
    assert chart.size == (640, 360)
    assert _has_colour(chart, preview.TRAIN_RAW, left_half=True) and _has_colour(chart, preview.TRAIN, left_half=True)
    assert not _has_colour(chart, preview.VAL, at_least=1)


def test_loss_chart_copes_with_empty_single_and_non_finite_input():
    assert loss_chart([], []).size == (640, 360)
    assert _has_colour(loss_chart([3], [0.5]), preview.TRAIN, at_least=1)
    chart = loss_chart([1, 2, 3], [0.5, float("nan"), 0.4])
    assert _has_colour(chart, preview.TRAIN, left_half=True)
    with pytest.raises(ValueError):
        loss_chart([1, 2], [0.5])
