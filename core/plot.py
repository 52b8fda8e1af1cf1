"""Heatmaps drawn with numpy + Pillow only (ComfyUI must not need matplotlib).

``heatmap`` turns a 2-D array into an image with row/column labels, a colour
bar and grey "n/a" cells for NaN; ``image_to_png`` writes it atomically.
Sizes adapt from a handful of rows to about a thousand: cells shrink to a
pixel or two and labels thin out to every k-th row/column so they never
overlap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchor colours sampled from matplotlib's perceptually uniform maps (and a
# diverging blue-white-red for signed values); interpolated linearly.
COLORMAPS: dict[str, list[tuple[int, int, int]]] = {
    "viridis": [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
                (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)],
    "magma": [(0, 0, 4), (28, 16, 68), (79, 18, 123), (129, 37, 129), (181, 54, 122),
              (229, 80, 100), (251, 135, 97), (254, 194, 135), (252, 253, 191)],
    "coolwarm": [(59, 76, 192), (98, 130, 234), (141, 176, 254), (184, 208, 249),
                 (221, 221, 221), (245, 196, 173), (244, 154, 123), (222, 96, 77), (180, 4, 38)],
    "gray": [(0, 0, 0), (255, 255, 255)],
}
NAN_COLOR = (170, 170, 170)
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)

# Largest plot area (pixels) before cells shrink; cell size limits.
MAX_PLOT_W, MAX_PLOT_H = 1200, 1400
MAX_CELL_W, MAX_CELL_H = 90, 26
MAX_SQUARE_CELL = 60
# Pillow's built-in font has no Greek or maths glyphs (they draw as boxes), so
# drawn text is spelled out in ASCII.
ASCII_TEXT = {"φ": "phi", "θ": "theta", "Φ": "Phi", "δ": "delta", "Δ": "d", "σ": "sigma", "π": "pi",
              "β": "beta", "α": "alpha", "×": "x", "÷": "/", "·": "*", "‖": "||", "√": "sqrt",
              "—": "-", "–": "-", "≈": "~", "≤": "<=", "≥": ">=", "→": "->", "…": "...", "²": "^2",
              "ᵀ": "^T", "−": "-"}
FONT_SIZE = 13


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)   # Pillow ≥ 10.1: scalable font
    except TypeError:
        return ImageFont.load_default()


def drawable(text: str) -> str:
    """``text`` with the glyphs the default font lacks spelled out (φ → phi, × → x)."""
    text = "".join(ASCII_TEXT.get(c, c) for c in str(text))
    return text.encode("ascii", "replace").decode("ascii")


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = font.getbbox(text)
    return right - left, bottom - top


def colorize(values: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis") -> np.ndarray:
    """Map values to uint8 RGB (shape + (3,)); NaN -> NAN_COLOR, out-of-range clipped."""
    if cmap not in COLORMAPS:
        raise ValueError(f"unknown colour map {cmap!r}; choose from {sorted(COLORMAPS)}")
    anchors = np.asarray(COLORMAPS[cmap], dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip((np.where(nan, vmin, v) - vmin) / span, 0.0, 1.0)
    pos = t * (len(anchors) - 1)
    lo = np.minimum(np.floor(pos).astype(int), len(anchors) - 2)
    frac = (pos - lo)[..., None]
    rgb = anchors[lo] * (1.0 - frac) + anchors[lo + 1] * frac
    rgb[nan] = NAN_COLOR
    return np.rint(rgb).astype(np.uint8)


def _value_range(v: np.ndarray, vmin: float | None, vmax: float | None) -> tuple[float, float]:
    finite = v[np.isfinite(v)]
    lo = float(finite.min()) if vmin is None and finite.size else (0.0 if vmin is None else float(vmin))
    hi = float(finite.max()) if vmax is None and finite.size else (1.0 if vmax is None else float(vmax))
    if hi <= lo:  # constant data: give the bar some extent so the colour is defined
        lo, hi = (lo - 0.5, hi + 0.5) if vmin is None and vmax is None else (lo, lo + 1.0)
    return lo, hi


def _cell_sizes(n_rows: int, n_cols: int) -> tuple[int, int]:
    if n_rows == n_cols:  # square matrices (kernels, φ grids) get square cells
        side = max(1, min(MAX_PLOT_W // n_cols, MAX_PLOT_H // n_rows, MAX_SQUARE_CELL))
        return side, side
    cw = max(1, min(MAX_CELL_W, MAX_PLOT_W // n_cols))
    ch = max(1, min(MAX_CELL_H, MAX_PLOT_H // n_rows))
    return cw, ch


def _fmt(x: float) -> str:
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.2e}"


def _label_step(cell: int, needed: int) -> int:
    """Show every k-th label so consecutive labels are at least `needed` px apart."""
    return max(1, math.ceil(needed / max(cell, 1)))


def _rotated_text(text: str, font) -> Image.Image:
    w, h = _text_size(font, text)
    tile = Image.new("RGB", (w + 2, h + 6), BACKGROUND)
    ImageDraw.Draw(tile).text((1 - font.getbbox(text)[0], 1 - font.getbbox(text)[1]), text,
                              fill=TEXT_COLOR, font=font)
    return tile.rotate(90, expand=True)


@dataclass(frozen=True)
class Panel:
    """A run of consecutive columns drawn with its own colour scale and colour bar
    (e.g. φ, where high = similar, beside distances, where high = different)."""

    columns: int
    vmin: float | None = None
    vmax: float | None = None
    label: str = ""                                  # colour bar label
    cmap: str = "viridis"
    marks: tuple[tuple[float, str], ...] = ()        # (value, text) marked on the colour bar


PANEL_GAP = 14          # pixels between panels
MARK_COLOR = (200, 0, 0)


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def heatmap(values: np.ndarray, row_labels: list[str], col_labels: list[str], title: str = "",
            vmin: float | None = None, vmax: float | None = None, colorbar_label: str = "",
            cmap: str = "viridis", annotate: bool | None = None, panels: list[Panel] | None = None,
            nan_label: str = "n/a") -> Image.Image:
    """Draw ``values`` (rows × cols) as a labelled heatmap with a colour bar.

    NaN cells are grey and listed as ``nan_label`` beside the colour bar (and
    written in the cell when it is large enough); ±inf are clipped to the range
    ends. vmin/vmax default to the finite data range. ``annotate`` writes each
    value in its cell; by default only when every cell is large enough to hold
    it. ``panels`` splits the columns into runs with their own scale and colour
    bar (vmin/vmax/cmap/colorbar_label are then ignored). When labels are
    thinned to every k-th row or column, a line under the plot says so.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] == 0 or v.shape[1] == 0:
        raise ValueError(f"heatmap needs a non-empty 2-D array, got shape {v.shape}")
    n_rows, n_cols = v.shape
    if len(row_labels) != n_rows or len(col_labels) != n_cols:
        raise ValueError(f"{len(row_labels)} row / {len(col_labels)} column labels for a "
                         f"{n_rows}×{n_cols} array")
    panels = list(panels) if panels else [Panel(n_cols, vmin, vmax, colorbar_label, cmap)]
    if sum(p.columns for p in panels) != n_cols or any(p.columns < 1 for p in panels):
        raise ValueError(f"panels cover {sum(p.columns for p in panels)} columns of {n_cols}")
    row_labels = [drawable(x) for x in row_labels]
    col_labels = [drawable(x) for x in col_labels]
    title, nan_label = drawable(title), drawable(nan_label)
    font, small = _font(FONT_SIZE), _font(FONT_SIZE - 2)
    title_font = _font(FONT_SIZE + 3)
    line_h = _text_size(font, "Ag")[1] + 4
    cw, ch = _cell_sizes(n_rows, n_cols)
    pad = 10

    # Panels: first column, value range, and the x offset of each column.
    starts = np.cumsum([0] + [p.columns for p in panels])
    ranges = []
    for k, p in enumerate(panels):
        ranges.append(_value_range(v[:, starts[k]:starts[k + 1]], p.vmin, p.vmax))
    panel_of = np.repeat(np.arange(len(panels)), [p.columns for p in panels])
    col_off = np.arange(n_cols) * cw + panel_of * PANEL_GAP

    # Which labels fit without overlapping.
    row_step = _label_step(ch, line_h)
    rows_shown = [i for i in range(n_rows) if i % row_step == 0]
    row_w = max((_text_size(font, str(row_labels[i]))[0] for i in rows_shown), default=0)
    col_widths = [_text_size(font, str(c))[0] for c in col_labels]
    rotate = max(col_widths, default=0) + 6 > cw
    col_step = _label_step(cw, line_h) if rotate else 1
    cols_shown = [j for j in range(n_cols) if j % col_step == 0]
    col_h = (max((col_widths[j] for j in cols_shown), default=0) + 8) if rotate else line_h
    notes = []
    if row_step > 1:
        notes.append(f"row labels shown for every {_ordinal(row_step)} of {n_rows} rows")
    if col_step > 1:
        notes.append(f"column labels shown for every {_ordinal(col_step)} of {n_cols} columns")

    # Colour bar geometry: one bar per panel, side by side.
    plot_w, plot_h = n_cols * cw + (len(panels) - 1) * PANEL_GAP, n_rows * ch
    bar_h = max(120, min(plot_h, 400))
    bar_w = 18
    has_nan = bool(np.isnan(v).any())
    bars = []
    for p, (lo, hi) in zip(panels, ranges):
        ticks = np.linspace(lo, hi, 5)
        tick_w = max(_text_size(small, _fmt(t))[0] for t in ticks)
        mark_w = max((_text_size(small, drawable(t))[0] + 6 for _, t in p.marks), default=0)
        label = drawable(p.label)
        label_w = _text_size(font, label)[1] + 8 if label else 0
        bars.append((ticks, tick_w, mark_w, label, bar_w + 6 + tick_w + 8 + mark_w + label_w))
    nan_w = bar_w + 6 + _text_size(small, nan_label)[0] if has_nan else 0
    bars_w = sum(b[-1] for b in bars) + 16 * (len(bars) - 1)
    bars_w = max(bars_w, nan_w)

    title_h = (_text_size(title_font, title)[1] + 12) if title else 0
    x0 = pad + row_w + 8
    y0 = pad + title_h + col_h
    width = x0 + plot_w + 20 + bars_w + pad
    body_bottom = max(y0 + plot_h, y0 + bar_h + (2 * line_h if has_nan else 0))
    height = body_bottom + (len(notes) * line_h + 4 if notes else 0) + pad
    title_w = _text_size(title_font, title)[0] if title else 0
    width = max(width, title_w + 2 * pad, *(_text_size(font, t)[0] + 2 * pad for t in notes))

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad), title, fill=TEXT_COLOR, font=title_font)

    for k, p in enumerate(panels):
        block = v[:, starts[k]:starts[k + 1]]
        cells = Image.fromarray(colorize(block, *ranges[k], p.cmap), "RGB")
        img.paste(cells.resize((p.columns * cw, plot_h), Image.NEAREST), (x0 + int(col_off[starts[k]]), y0))

    for i in rows_shown:
        text = str(row_labels[i])
        tw, th = _text_size(font, text)
        cy = y0 + i * ch + ch // 2
        draw.text((x0 - 6 - tw, cy - th // 2 - font.getbbox(text)[1]), text, fill=TEXT_COLOR, font=font)
    for j in cols_shown:
        text = str(col_labels[j])
        cx = x0 + int(col_off[j]) + cw // 2
        if rotate:
            tile = _rotated_text(text, font)
            img.paste(tile, (cx - tile.width // 2, y0 - 4 - tile.height))
        else:
            tw, _ = _text_size(font, text)
            draw.text((cx - tw // 2, y0 - line_h), text, fill=TEXT_COLOR, font=font)

    # Values (or n/a) inside large cells.
    fits = all(_text_size(small, _fmt(x))[0] + 4 <= cw for x in v[np.isfinite(v)].ravel()[:2000]) \
        and ch >= line_h
    if annotate is None:
        annotate = fits and n_rows * n_cols <= 900
    for i in range(n_rows) if (annotate or (has_nan and ch >= line_h and cw >= 26)) else ():
        for j in range(n_cols):
            x = v[i, j]
            if not annotate and not math.isnan(x):
                continue
            text = "n/a" if math.isnan(x) else _fmt(x)
            tw, th = _text_size(small, text)
            lo, hi = ranges[panel_of[j]]
            t = 0.0 if math.isnan(x) else min(max((x - lo) / (hi - lo), 0.0), 1.0)
            dark = panels[panel_of[j]].cmap in ("viridis", "magma") and t < 0.55
            draw.text((x0 + int(col_off[j]) + (cw - tw) // 2,
                       y0 + i * ch + (ch - th) // 2 - small.getbbox(text)[1]),
                      text, fill=(255, 255, 255) if dark else TEXT_COLOR, font=small)

    # Colour bars, top = vmax.
    bx, by = x0 + plot_w + 20, y0
    first_bx = bx
    for p, (lo, hi), (ticks, tick_w, mark_w, label, block_w) in zip(panels, ranges, bars):
        ramp = np.linspace(hi, lo, bar_h)[:, None].repeat(bar_w, axis=1)
        img.paste(Image.fromarray(colorize(ramp, lo, hi, p.cmap), "RGB"), (bx, by))
        draw.rectangle([bx - 1, by - 1, bx + bar_w, by + bar_h], outline=TEXT_COLOR)
        for t in ticks:
            ty = by + int(round((hi - t) / (hi - lo) * (bar_h - 1)))
            draw.line([bx + bar_w, ty, bx + bar_w + 4, ty], fill=TEXT_COLOR)
            text = _fmt(float(t))
            th = _text_size(small, text)[1]
            draw.text((bx + bar_w + 6, ty - th // 2 - small.getbbox(text)[1]), text, fill=TEXT_COLOR,
                      font=small)
        for value, text in p.marks:
            text = drawable(text)
            ty = by + int(round((hi - min(max(value, lo), hi)) / (hi - lo) * (bar_h - 1)))
            draw.line([bx - 4, ty, bx + bar_w + 3, ty], fill=MARK_COLOR, width=2)
            th = _text_size(small, text)[1]
            draw.text((bx + bar_w + 6 + tick_w + 6, ty - th // 2 - small.getbbox(text)[1]), text,
                      fill=MARK_COLOR, font=small)
        if label:
            tile = _rotated_text(label, font)
            img.paste(tile, (bx + bar_w + 6 + tick_w + 6 + mark_w, by + max(0, (bar_h - tile.height) // 2)))
        bx += block_w + 16
    if has_nan:
        ny = by + bar_h + line_h // 2
        draw.rectangle([first_bx, ny, first_bx + bar_w, ny + line_h - 4], fill=NAN_COLOR, outline=TEXT_COLOR)
        draw.text((first_bx + bar_w + 6, ny), nan_label, fill=TEXT_COLOR, font=small)
    for k, text in enumerate(notes):
        draw.text((pad, body_bottom + 4 + k * line_h), text, fill=TEXT_COLOR, font=font)
    # Where the cells are (left, top, cell width, cell height) and where each
    # panel's columns start: for callers that overlay marks, and for tests.
    img.info["heatmap_cells"] = (x0, y0, cw, ch)
    img.info["heatmap_panels"] = [(x0 + int(col_off[starts[k]]), int(starts[k]), p.columns)
                                  for k, p in enumerate(panels)]
    img.info["heatmap_notes"] = notes
    return img


def image_to_png(img: Image.Image, path: str, overwrite: bool = False) -> str:
    """Write a PNG by core.save's rules (atomic; replaced only when asked)."""
    from .save import atomic_write
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), overwrite=overwrite)
