"""ComfyUI node adapters over core/. The only package that imports ComfyUI
(and only inside functions, so importing the node classes needs no ComfyUI)."""
from .analysis import GrassmannLoRAKernelMatrix, GrassmannLoRASimilarity
from .fidelity import GrassmannLoRAMergeFidelity
from .grid import GrassmannLoRACompareGrid
from .lora_io import GrassmannLoRAApply, GrassmannLoRALoad, GrassmannLoRASave
from .merge import GrassmannLoRAKarcherMerge

NODE_CLASS_MAPPINGS = {
    "GrassmannLoRALoad": GrassmannLoRALoad,
    "GrassmannLoRASimilarity": GrassmannLoRASimilarity,
    "GrassmannLoRAKernelMatrix": GrassmannLoRAKernelMatrix,
    "GrassmannLoRAKarcherMerge": GrassmannLoRAKarcherMerge,
    "GrassmannLoRAApply": GrassmannLoRAApply,
    "GrassmannLoRASave": GrassmannLoRASave,
    "GrassmannLoRACompareGrid": GrassmannLoRACompareGrid,
    "GrassmannLoRAMergeFidelity": GrassmannLoRAMergeFidelity,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "GrassmannLoRALoad": "Load LoRA (Grassmann)",
    "GrassmannLoRASimilarity": "LoRA Subspace Similarity",
    "GrassmannLoRAKernelMatrix": "Grassmann Kernel Matrix",
    "GrassmannLoRAKarcherMerge": "Karcher Merge LoRA",
    "GrassmannLoRAApply": "Apply LoRA (Grassmann)",
    "GrassmannLoRASave": "Save LoRA (Grassmann)",
    "GrassmannLoRACompareGrid": "Compare Grid (Grassmann)",
    "GrassmannLoRAMergeFidelity": "LoRA Merge Fidelity (Grassmann)",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
