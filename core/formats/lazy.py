"""A LoRA whose modules are read from the open file when asked for, not kept.

``load_lora(path, lazy=True)`` gives a ``LoraFile`` whose ``modules`` is this
mapping over a reader that stays open (safetensors are memory-mapped): code that
walks modules one at a time (merges, comparisons) then holds about one module
per source instead of whole files — what four 0.2–2 GB Flux LoRAs need.
Each access reads the module again; callers keep what they need.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator

from ..lora import LoraModule


class LazyModules(Mapping):
    def __init__(self, reader):
        self._reader = reader
        self._names = reader.names
        self._known = set(self._names)

    def __getitem__(self, name: str) -> LoraModule:
        if name not in self._known:
            raise KeyError(name)
        return self._reader.read(name)

    def __contains__(self, name) -> bool:
        return name in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def flat_shape(self, name: str) -> tuple[int, int]:
        """(d_out, d_in) without reading the tensors."""
        plan = self._reader.plan(name)
        return plan.d_out, plan.d_in
