"""Grassmann LoRA core library: torch, safetensors and numpy only; never ComfyUI."""
__version__ = "0.1.0"
