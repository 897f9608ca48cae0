"""Pictures a person looks at: base-vs-LoRA comparison sheets and loss charts, drawn with Pillow only.

No matplotlib: it is not a dependency, and inside ComfyUI every extra package is one more conflict.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
AXIS = (90, 90, 90)
GRID = (228, 228, 228)
TRAIN_RAW = (160, 190, 230)  # the raw training loss when a smoothed line is drawn over it
TRAIN = (31, 100, 200)
VAL = (220, 80, 20)

MIN_SIDE = 192  # small previews (64 px) are unreadable at 1:1; below this they are enlarged
PAD = 8


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at ``size``; the fixed bitmap font where Pillow was built without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _text_size(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return math.ceil(right - left), math.ceil(bottom - top)


def upscale_for_view(img: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    """``img`` enlarged by the smallest whole factor that makes its shorter side ≥ ``min_side``.

    Whole factors with NEAREST keep every pixel a crisp square: a preview should show what the model made,
    not a resampler's blur.
    """
    factor = max(1, math.ceil(min_side / max(1, min(img.size))))
    img = img.convert("RGB")
    if factor == 1:
        return img
    return img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)


def side_by_side(columns: dict[str, list[Image.Image]], row_labels: list[str] | None = None,
                 title: str | None = None) -> Image.Image:
    """One RGB sheet: a column per key (its label above), row ``i`` holds each column's ``i``-th image.

    Rows are meant to share a seed, so each row compares like with like. Images smaller than 192 px are
    enlarged (see ``upscale_for_view``) and placed at the top-left of equal-sized cells.
    """
    if not columns:
        raise ValueError("side_by_side needs at least one column")
    n_rows = max(len(imgs) for imgs in columns.values())
    if row_labels is not None and len(row_labels) != n_rows:
        raise ValueError(f"{len(row_labels)} row labels for {n_rows} rows")
    scaled = {name: [upscale_for_view(im) for im in imgs] for name, imgs in columns.items()}
    all_imgs = [im for imgs in scaled.values() for im in imgs]
    cell_w = max((im.width for im in all_imgs), default=MIN_SIDE)
    cell_h = max((im.height for im in all_imgs), default=MIN_SIDE)

    label_font, title_font = _font(16), _font(20)
    # The widest label sets the cell width when it is wider than the images, so labels never overlap.
    cell_w = max(cell_w, *(_text_size(label_font, name)[0] for name in columns))
    label_h = _text_size(label_font, "Ag")[1] + PAD
    title_h = _text_size(title_font, title)[1] + 2 * PAD if title else 0
    row_label_w = (max(_text_size(label_font, s)[0] for s in row_labels) + 2 * PAD) if row_labels else 0

    width = PAD + row_label_w + len(columns) * (cell_w + PAD)
    height = PAD + title_h + label_h + n_rows * (cell_h + PAD)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        tw, _ = _text_size(title_font, title)
        draw.text(((width - tw) // 2, PAD), title, fill=TEXT, font=title_font)
    top = PAD + title_h + label_h
    for c, (name, imgs) in enumerate(scaled.items()):
        x = PAD + row_label_w + c * (cell_w + PAD)
        tw, _ = _text_size(label_font, name)
        draw.text((x + (cell_w - tw) // 2, PAD + title_h), name, fill=TEXT, font=label_font)
        for r, im in enumerate(imgs):
            sheet.paste(im, (x, top + r * (cell_h + PAD)))
    for r, label in enumerate(row_labels or []):
        _, th = _text_size(label_font, label)
        draw.text((PAD, top + r * (cell_h + PAD) + (cell_h - th) // 2), label, fill=TEXT, font=label_font)
    return sheet


def _smooth(values: list[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing), so early points are not pulled
    towards zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def loss_chart(steps: list[int], losses: list[float], val_steps: list[int] | None = None,
               val_losses: list[float] | None = None, size: tuple[int, int] = (640, 360), *,
               smoothing: float | None = None, title: str | None = None) -> Image.Image:
    """A line chart of training loss against step (and validation loss, if given), ``size`` pixels, RGB.

    ``smoothing`` in [0, 1) draws an exponential moving average in ``TRAIN`` over the raw line in
    ``TRAIN_RAW``; without it the raw line is drawn in ``TRAIN``. Validation is drawn in ``VAL``, points
    joined by a line. Non-finite losses (a diverged step) are left out rather than wrecking the scale.
    """
    if len(steps) != len(losses):
        raise ValueError(f"{len(steps)} steps for {len(losses)} losses")
    val_steps, val_losses = list(val_steps or []), list(val_losses or [])
    if len(val_steps) != len(val_losses):
        raise ValueError(f"{len(val_steps)} validation steps for {len(val_losses)} validation losses")
    if smoothing is not None and not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    train = [(s, v) for s, v in zip(steps, losses) if math.isfinite(v)]
    val = [(s, v) for s, v in zip(val_steps, val_losses) if math.isfinite(v)]

    width, height = size
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(12)
    _, text_h = _text_size(font, "0.123")
    title_h = text_h + PAD if title else 0
    if title:
        tw, _ = _text_size(font, title)
        draw.text(((width - tw) // 2, PAD // 2), title, fill=TEXT, font=font)

    points = train + val
    if not points:
        msg = "no loss values yet"
        tw, th = _text_size(font, msg)
        draw.text(((width - tw) // 2, (height - th) // 2), msg, fill=AXIS, font=font)
        return img
    x_lo, x_hi = min(s for s, _ in points), max(s for s, _ in points)
    y_lo, y_hi = min(v for _, v in points), max(v for _, v in points)
    first_step, last_step = x_lo, x_hi
    if x_hi == x_lo:  # a single step still gets a drawable range
        x_lo, x_hi = x_lo - 1, x_hi + 1
    data_lo, data_hi = y_lo, y_hi
    # 5 % headroom so the extremes are not drawn on top of the frame.
    pad = (y_hi - y_lo) * 0.05 or abs(y_lo) * 0.1 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad

    y_label_w = max(_text_size(font, _fmt(v))[0] for v in (data_lo, data_hi))
    left, right = PAD + y_label_w + 6, width - PAD
    top, bottom = PAD + title_h, height - PAD - text_h - 6
    if right - left < 10 or bottom - top < 10:
        raise ValueError(f"size {size} is too small for a chart")

    def to_xy(s: float, v: float) -> tuple[float, float]:
        return (left + (s - x_lo) / (x_hi - x_lo) * (right - left),
                bottom - (v - y_lo) / (y_hi - y_lo) * (bottom - top))

    # Light grid at quarters: enough to read a level off without a full tick algorithm.
    for q in (0.25, 0.5, 0.75):
        gy = bottom - q * (bottom - top)
        draw.line([(left, gy), (right, gy)], fill=GRID)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS, width=1)
    # The y labels are the data's own minimum and maximum, each with a tick at its height.
    for v in {data_lo, data_hi}:
        _, vy = to_xy(x_lo, v)
        draw.line([(left - 4, vy), (left, vy)], fill=AXIS)
        draw.text((left - 6 - _text_size(font, _fmt(v))[0], vy - text_h / 2), _fmt(v), fill=TEXT, font=font)
    draw.text((left, bottom + 4), _fmt(first_step), fill=TEXT, font=font)
    x_hi_text = f"step {_fmt(last_step)}"
    draw.text((right - _text_size(font, x_hi_text)[0], bottom + 4), x_hi_text, fill=TEXT, font=font)

    legend: list[tuple[str, tuple[int, int, int]]] = []
    if train:
        xy = [to_xy(s, v) for s, v in train]
        if smoothing is not None:
            if len(xy) > 1:
                draw.line(xy, fill=TRAIN_RAW, width=1)
            xy = [to_xy(s, v) for (s, _), v in zip(train, _smooth([v for _, v in train], smoothing))]
            legend += [("train", TRAIN_RAW), ("train (smoothed)", TRAIN)]
        else:
            legend.append(("train", TRAIN))
        if len(xy) > 1:
            draw.line(xy, fill=TRAIN, width=2, joint="curve")
        else:
            (px, py), = xy
            draw.ellipse((px - 2, py - 2, px + 2, py + 2), fill=TRAIN)
    if val:
        xy = [to_xy(s, v) for s, v in val]
        if len(xy) > 1:
            draw.line(xy, fill=VAL, width=2)
        for px, py in xy:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=VAL)
        legend.append(("validation", VAL))

    # Legend in the top-right corner of the plot, where falling losses leave the most room.
    lx = right - PAD - max(_text_size(font, name)[0] for name, _ in legend) - 22
    ly_end = top + PAD // 2 + len(legend) * (text_h + 6)
    draw.rectangle((lx - 4, top + 1, right - 2, ly_end), fill=BACKGROUND)  # lines pass behind, not through
    for i, (name, colour) in enumerate(legend):
        ly = top + PAD // 2 + i * (text_h + 6)
        draw.line([(lx, ly + text_h // 2 + 1), (lx + 16, ly + text_h // 2 + 1)], fill=colour, width=3)
        draw.text((lx + 22, ly), name, fill=TEXT, font=font)
    return img
