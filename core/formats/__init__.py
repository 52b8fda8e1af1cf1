"""Reading LoRA files of every common format into ``LoraFile``.

Public API: ``load_lora(path)``, ``open_lora(path)`` (module-by-module
reading), ``require_same_family(loras)``, ``require_same_base(loras)``, ``canonical_name(key, family)``
and ``FORMATS`` (every value ``LoraFile.format`` can take).
"""
from .names import canonical_name
from .reader import FORMATS, LoraReader, load_lora, open_lora, require_same_base, require_same_family

__all__ = ["FORMATS", "LoraReader", "canonical_name", "load_lora", "open_lora", "require_same_base", "require_same_family"]
