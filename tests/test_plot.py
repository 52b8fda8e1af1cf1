import os

import numpy as np
import pytest
from PIL import Image

from core.plot import COLORMAPS, MARK_COLOR, NAN_COLOR, Panel, colorize, heatmap, image_to_png


def cell_pixel(img, i, j):
    x0, y0, cw, ch = img.info["heatmap_cells"]
    return img.getpixel((x0 + j * cw + cw // 2, y0 + i * ch + max(ch // 2 - ch // 3, 0)))


def test_colorize_endpoints_and_interpolation():
    anchors = np.asarray(COLORMAPS["viridis"], dtype=float)
    rgb = colorize(np.array([0.0, 1.0, -5.0, 7.0, np.nan]), 0.0, 1.0)
    assert tuple(rgb[0]) == tuple(anchors[0]) and tuple(rgb[1]) == tuple(anchors[-1])
    assert tuple(rgb[2]) == tuple(anchors[0]) and tuple(rgb[3]) == tuple(anchors[-1])  # clipped
    assert tuple(rgb[4]) == NAN_COLOR
    # halfway between anchors k and k+1 is their mean
    n = len(anchors) - 1
    mid = colorize(np.array([2.5 / n]), 0.0, 1.0)[0]
    assert np.allclose(mid, (anchors[2] + anchors[3]) / 2, atol=0.51)
    with pytest.raises(ValueError):
        colorize(np.zeros(2), 0, 1, cmap="nope")


def test_cells_carry_their_colour_and_nan_is_grey():
    rng = np.random.default_rng(0)
    v = rng.random((6, 4))
    v[2, 1] = np.nan
    img = heatmap(v, [f"row{i}" for i in range(6)], [f"c{j}" for j in range(4)], title="t",
                  vmin=0.0, vmax=1.0, colorbar_label="phi", annotate=False)
    expected = colorize(v, 0.0, 1.0)
    for i in range(6):
        for j in range(4):
            assert cell_pixel(img, i, j) == tuple(expected[i, j]), (i, j)
    assert cell_pixel(img, 2, 1) == NAN_COLOR


def test_default_range_is_the_finite_data_range():
    v = np.array([[2.0, 4.0], [np.inf, np.nan]])
    img = heatmap(v, ["a", "b"], ["x", "y"], annotate=False)
    assert cell_pixel(img, 0, 0) == tuple(COLORMAPS["viridis"][0])
    assert cell_pixel(img, 0, 1) == tuple(COLORMAPS["viridis"][-1])
    assert cell_pixel(img, 1, 0) == tuple(COLORMAPS["viridis"][-1])   # +inf clipped to the top


@pytest.mark.parametrize("n_rows,n_cols", [(10, 9), (300, 9), (1000, 9), (1000, 1000), (64, 64)])
def test_sizes_stay_sensible(n_rows, n_cols):
    v = np.random.default_rng(1).random((n_rows, n_cols))
    img = heatmap(v, [f"lora_unet_module_{i}" for i in range(n_rows)],
                  [f"measure{j}" for j in range(n_cols)], title="many")
    x0, y0, cw, ch = img.info["heatmap_cells"]
    assert cw >= 1 and ch >= 1
    assert img.width <= 2000 and img.height <= 2000
    assert x0 + n_cols * cw <= img.width and y0 + n_rows * ch <= img.height
    # label column is as wide as the longest shown label, not a fixed guess
    assert x0 > 60


def test_labels_are_drawn_and_thinned():
    # Ink left of the cells (the row labels) exists; with 1000 rows only some are drawn,
    # so the label strip has far fewer dark rows than 1000 labels would need.
    v = np.zeros((1000, 3))
    img = heatmap(v, [f"m{i}" for i in range(1000)], ["a", "b", "c"], vmin=0, vmax=1)
    x0, y0, cw, ch = img.info["heatmap_cells"]
    strip = np.asarray(img.crop((0, y0, x0 - 2, y0 + 1000 * ch)).convert("L"))
    inked_rows = (strip < 128).any(axis=1)
    assert inked_rows.any()
    # Runs of inked pixel rows = drawn labels; each label needs ~10+ px, so at most ~1/10 rows.
    runs = int(np.sum(inked_rows[1:] & ~inked_rows[:-1])) + int(inked_rows[0])
    assert 10 < runs < 1000 * ch / 8


def test_panels_have_their_own_scale_and_marks():
    v = np.array([[0.01, 0.5, 0.2], [0.02, 1.0, 0.0]])
    img = heatmap(v, ["a", "b"], ["phi", "d1", "d2"], annotate=False,
                  panels=[Panel(1, 0.0, 0.02, "phi", marks=((0.01, "chance"),)),
                          Panel(2, 0.0, 1.0, "distance", "magma")])
    _, y0, cw, ch = img.info["heatmap_cells"]
    (x_a, first_a, n_a), (x_b, first_b, n_b) = img.info["heatmap_panels"]
    assert (first_a, n_a, first_b, n_b) == (0, 1, 1, 2) and x_b > x_a + cw     # a gap between panels
    px = lambda x, i: img.getpixel((x + cw // 2, y0 + i * ch + ch // 3))
    # φ = 0.02 is the top of its own scale, though it is near the bottom of the distances'
    assert px(x_a, 1) == tuple(COLORMAPS["viridis"][-1])
    assert px(x_a, 0) == tuple(colorize(np.array([0.01]), 0.0, 0.02)[0])
    assert px(x_b, 0) == tuple(colorize(np.array([0.5]), 0.0, 1.0, "magma")[0])
    assert px(x_b + cw, 1) == tuple(COLORMAPS["magma"][0])
    # the chance mark is drawn in its colour on the first colour bar
    assert (np.asarray(img) == MARK_COLOR).all(axis=-1).sum() > 20
    with pytest.raises(ValueError, match="panels cover"):
        heatmap(v, ["a", "b"], ["x", "y", "z"], panels=[Panel(2)])


def test_thinned_labels_are_said_on_the_image():
    few = heatmap(np.zeros((10, 3)), [f"m{i}" for i in range(10)], ["a", "b", "c"], vmin=0, vmax=1)
    assert few.info["heatmap_notes"] == []
    many = heatmap(np.zeros((1000, 3)), [f"m{i}" for i in range(1000)], ["a", "b", "c"], vmin=0, vmax=1)
    (note,) = many.info["heatmap_notes"]
    assert note.startswith("row labels shown for every ") and note.endswith("of 1000 rows")
    # the note is drawn below the cells: ink there that the 10-row image has no counterpart of
    x0, y0, cw, ch = many.info["heatmap_cells"]
    below = np.asarray(many.crop((0, y0 + 1000 * ch + 2, many.width, many.height)).convert("L"))
    assert (below < 128).any()


def test_bad_input_raises():
    with pytest.raises(ValueError):
        heatmap(np.zeros((2, 2)), ["a"], ["x", "y"])
    with pytest.raises(ValueError):
        heatmap(np.zeros(3), ["a"], ["x"])


def test_image_to_png_is_atomic_and_round_trips(tmp_path):
    v = np.arange(12, dtype=float).reshape(3, 4)
    img = heatmap(v, ["a", "b", "c"], list("wxyz"), title="round trip")
    path = image_to_png(img, str(tmp_path / "sub" / "h.png"))
    assert os.listdir(tmp_path / "sub") == ["h.png"]          # no temporary left behind
    back = Image.open(path)
    assert back.size == img.size
    assert np.array_equal(np.asarray(back.convert("RGB")), np.asarray(img))
    from core.errors import LoraError
    with pytest.raises(LoraError):
        image_to_png(img, path, overwrite=False)


def test_text_is_spelled_in_glyphs_the_default_font_has():
    from core.plot import drawable
    assert drawable("φ(i, j) × 2 ÷ ‖ΔW‖") == "phi(i, j) x 2 / ||dW||"
    assert drawable("naïve").isascii()
    # the default font draws 'phi' with real glyphs: the label ink differs from a box's
    a = heatmap(np.zeros((1, 1)), ["φ"], ["x"], vmin=0, vmax=1)
    b = heatmap(np.zeros((1, 1)), ["phi"], ["x"], vmin=0, vmax=1)
    assert np.array_equal(np.asarray(a), np.asarray(b))
