"""Side-by-side comparison grids of images with per-image difference numbers.

Used by the Compare Grid node: a batch of images (B×H×W×C floats in [0, 1],
ComfyUI's IMAGE layout) becomes one labelled grid; under each tile its label
and, against a chosen reference image, the mean absolute pixel difference
(MAD, on the [0, 1] scale) and SSIM (Wang, Bovik, Sheikh & Simoncelli 2004:
11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03, dynamic range 1,
"valid" windows only, averaged over the SSIM map and the colour channels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from .plot import BACKGROUND, TEXT_COLOR, _font, _text_size, drawable

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
MIN_TILE = 256          # auto upscaling makes tiles at least this wide, so captions fit
PAD = 8
FONT_SIZE = 14


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian weights (the 2-D window is their outer product)."""
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _window_for(h: int, w: int) -> int:
    """The standard 11 px window, shrunk (kept odd) for images smaller than it."""
    size = min(SSIM_WINDOW, h, w)
    return size if size % 2 == 1 else size - 1


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of image pairs. x, y: (H, W, C) or (B, H, W, C); returns () or (B,).

    Computed in float64 with a separable Gaussian filter; channels are scored
    separately and averaged.
    """
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    single = x.dim() == 3
    if single:
        x, y = x[None], y[None]
    b, h, w, c = x.shape
    size = _window_for(h, w)
    g = gaussian_window(size, SSIM_SIGMA)
    # (B·C, 1, H, W) so each channel is filtered on its own
    a = x.to(torch.float64).permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    bb = y.to(torch.float64).permute(0, 3, 1, 2).reshape(b * c, 1, h, w)
    kh, kw = g.view(1, 1, size, 1), g.view(1, 1, 1, size)

    def filt(t):
        return torch.nn.functional.conv2d(torch.nn.functional.conv2d(t, kh), kw)

    mu_a, mu_b = filt(a), filt(bb)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(bb * bb) - mu_b ** 2
    cov = filt(a * bb) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    per_image = smap.reshape(b, c, -1).mean(dim=2).mean(dim=1)
    return per_image[0] if single else per_image


def mean_abs_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean |x − y| per image over pixels and channels; () or (B,) like ``ssim``."""
    d = (x.to(torch.float64) - y.to(torch.float64)).abs()
    return d.mean() if d.dim() == 3 else d.flatten(1).mean(dim=1)


def parse_labels(text: str, n: int) -> list[str]:
    """One label per line, or comma-separated on one line; missing ones become '#k'."""
    text = (text or "").strip()
    if "\n" in text:
        parts = [p.strip() for p in text.splitlines()]
    else:
        parts = [p.strip() for p in text.split(",")] if text else []
    return [parts[i] if i < len(parts) and parts[i] else f"#{i + 1}" for i in range(n)]


@dataclass
class GridGeometry:
    rows: int
    cols: int
    scale: int          # integer nearest-neighbour upscaling of every tile
    tile_w: int
    tile_h: int
    caption_h: int
    width: int
    height: int

    def tile_origin(self, k: int) -> tuple[int, int]:
        """Top-left pixel (x, y) of tile k's image."""
        r, c = divmod(k, self.cols)
        return PAD + c * (self.tile_w + PAD), PAD + r * (self.tile_h + self.caption_h + PAD)


def caption_height(font_size: int = FONT_SIZE) -> int:
    line_h = _text_size(_font(font_size), "Ag")[1] + 6
    return 2 * line_h + 6


def grid_geometry(n: int, h: int, w: int, columns: int = 0, upscale: int = 0) -> GridGeometry:
    """Layout of n tiles of h×w: ``columns`` 0 puts all in one row; ``upscale`` 0
    picks the smallest integer factor making tiles at least MIN_TILE wide."""
    if n < 1:
        raise ValueError("a comparison grid needs at least one image")
    cols = n if columns <= 0 else min(columns, n)
    rows = math.ceil(n / cols)
    scale = upscale if upscale > 0 else max(1, math.ceil(MIN_TILE / max(w, 1)))
    tw, th = w * scale, h * scale
    cap = caption_height()
    return GridGeometry(rows, cols, scale, tw, th, cap,
                        width=cols * tw + (cols + 1) * PAD,
                        height=rows * (th + cap) + (rows + 1) * PAD)


def _fit(text: str, font, width: int) -> str:
    """Shorten text with an ellipsis until it fits ``width`` pixels. Spelled in ASCII
    (core.plot.drawable): Pillow < 10.1's built-in bitmap font cannot encode "…"
    or other non-Latin-1 text and raises (the WebUIs pin Pillow 9.5)."""
    text = drawable(text)
    if _text_size(font, text)[0] <= width:
        return text
    while text and _text_size(font, text + "...")[0] > width:
        text = text[:-1]
    return text + "..."


@dataclass
class CompareResult:
    grid: Image.Image
    geometry: GridGeometry
    labels: list[str]
    mad: list[float]
    ssim: list[float]
    reference: int

    def table(self) -> tuple[list[str], list[list[str]]]:
        """(columns, rows) for a text table of the numbers."""
        rows = []
        for k, label in enumerate(self.labels):
            ref = " (reference)" if k == self.reference else ""
            rows.append([label + ref, f"{self.mad[k]:.4f}", f"{self.ssim[k]:.4f}"])
        return ["image", "MAD to reference", "SSIM to reference"], rows

    def summary(self) -> str:
        cols, rows = self.table()
        return "\n".join(["\t".join(cols)] + ["\t".join(r) for r in rows])


def compare_grid(images: torch.Tensor, labels: list[str], reference: int = 0, columns: int = 0,
                 upscale: int = 0) -> CompareResult:
    """Draw the grid. images: (B, H, W, C) floats in [0, 1] (C = 1, 3 or 4)."""
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError(f"expected an image batch (B, H, W, C), got shape {tuple(images.shape)}")
    b, h, w, c = images.shape
    if not 0 <= reference < b:
        raise ValueError(f"reference index {reference} is outside the batch of {b} image(s)")
    rgb = images[..., :3] if c >= 3 else images[..., :1].expand(b, h, w, 3)
    rgb = rgb.detach().to("cpu", torch.float32).clamp(0, 1)
    ref = rgb[reference:reference + 1].expand(b, h, w, 3)
    mad = mean_abs_diff(rgb, ref).tolist()
    sim = ssim(rgb, ref).tolist()

    geo = grid_geometry(b, h, w, columns, upscale)
    font = _font(FONT_SIZE)
    line_h = _text_size(font, "Ag")[1] + 6
    canvas = Image.new("RGB", (geo.width, geo.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    pixels = (rgb.numpy() * 255.0 + 0.5).astype(np.uint8)
    for k in range(b):
        x, y = geo.tile_origin(k)
        tile = Image.fromarray(pixels[k], "RGB")
        if geo.scale != 1:
            tile = tile.resize((geo.tile_w, geo.tile_h), Image.NEAREST)
        canvas.paste(tile, (x, y))
        line1 = _fit(labels[k] if k < len(labels) else f"#{k + 1}", font, geo.tile_w)
        line2 = "reference" if k == reference else f"MAD {mad[k]:.4f}  SSIM {sim[k]:.3f}"
        ty = y + geo.tile_h + 4 - font.getbbox("Ag")[1]   # one baseline for every caption
        for i, text in enumerate((line1, _fit(line2, font, geo.tile_w))):
            draw.text((x, ty + i * line_h), text, fill=TEXT_COLOR, font=font)
    return CompareResult(canvas, geo, [labels[k] if k < len(labels) else f"#{k + 1}" for k in range(b)],
                         mad, sim, reference)
