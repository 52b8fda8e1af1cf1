"""ComfyUI node adapters over core/. The only package that imports ComfyUI."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
