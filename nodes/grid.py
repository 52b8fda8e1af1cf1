"""Compare Grid: a batch of images → one labelled side-by-side grid."""
from __future__ import annotations

from .common import CATEGORY, node_result, table


class GrassmannLoRACompareGrid:
    DESCRIPTION = ("Lays a batch of images out side by side with a label under each, plus the mean "
                   "absolute pixel difference and SSIM of every image to a chosen reference image.")
    CATEGORY = CATEGORY
    FUNCTION = "run"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("grid", "differences")
    OUTPUT_TOOLTIPS = ("The labelled grid as one image.",
                       "Tab-separated table: label, mean absolute difference (MAD) and SSIM to the reference.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images to compare, as one batch (e.g. from Batch Images "
                                            "or chained Image Batch nodes); all the same size."}),
            "labels": ("STRING", {"multiline": True, "default": "",
                                  "tooltip": "One label per image, one per line or comma-separated on one "
                                             "line; missing labels show as #k."}),
            "reference": ("INT", {"default": 0, "min": 0, "max": 4096,
                                  "tooltip": "Index (from 0) of the image the others are compared with."}),
            "columns": ("INT", {"default": 0, "min": 0, "max": 64,
                                "tooltip": "Tiles per row; 0 puts every image in one row."}),
            "upscale": ("INT", {"default": 0, "min": 0, "max": 16,
                                "tooltip": "Integer nearest-neighbour enlargement of every tile; 0 picks "
                                           "the smallest factor that makes tiles at least 256 px wide."}),
        }}

    def run(self, images, labels, reference, columns, upscale):
        from ..core.compare_grid import compare_grid, parse_labels
        from ..core.errors import LoraError
        from .common import pil_to_image

        try:
            res = compare_grid(images, parse_labels(labels, int(images.shape[0])), reference, columns, upscale)
        except ValueError as e:
            raise LoraError(f"Compare Grid: {e}") from None
        cols, rows = res.table()
        return node_result((pil_to_image(res.grid), res.summary()),
                           tables=[table("Differences to the reference", cols, rows)],
                           text=res.summary())
