"""One exception type for every problem a user can cause.

The CLI prints ``str(err)`` on one line and exits non-zero; the nodes turn it
into a ComfyUI error. Messages always name the file and, where known, the key.
"""
from __future__ import annotations


class LoraError(Exception):
    """A user-facing error about a LoRA file or request."""

    def __init__(self, message: str, path: str | None = None, key: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.key = key
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = []
        if self.path:
            where.append(self.path)
        if self.key:
            where.append(f"key '{self.key}'")
        return f"{': '.join(where)}: {self.message}" if where else self.message
