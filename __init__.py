"""ComfyUI entry point of the Grassmann LoRA node pack.

Import stays cheap (node modules import torch-heavy code lazily) and never
takes ComfyUI down: if the nodes fail to import, the error is logged and the
pack registers nothing.
"""
import logging

WEB_DIRECTORY = "./web"

try:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except Exception:  # noqa: BLE001 - a broken pack must not break ComfyUI
    logging.getLogger(__name__).exception("Grassmann LoRA: nodes failed to import; pack disabled")
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
