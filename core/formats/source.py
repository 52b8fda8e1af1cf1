"""Opening a LoRA file by its content: tensor names, shapes and lazy reads.

A ``TensorSource`` hides whether the tensors come from a safetensors file
(read lazily, one tensor at a time), a PyTorch file loaded with
``weights_only=True``, or a cloneofsimo pickled list (keys ``[0]``, ``[1]`` …).
Every failure becomes a one-line ``LoraError`` naming the file and, where one
is to blame, the key.
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import pickle
import re
import struct

import torch

from ..errors import LoraError
from ..lora import check_finite

_ZIP_MAGIC = b"PK\x03\x04"

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
              "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# types a header may name that are never LoRA factors: byte width, for the size check
_ST_OTHER_DTYPES = {"U64": 8, "U32": 4, "U16": 2, "F8_E8M0": 1, "C64": 8}


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "…"


class TensorSource:
    """Names, shapes and tensors of one file. ``kind``: safetensors | torch | list."""

    kind = "torch"

    def __init__(self, path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                 non_tensors: dict[str, str] | None = None, kind: str = "torch"):
        self.path = path
        self._tensors = tensors
        self.metadata = metadata
        self.non_tensors = non_tensors or {}   # key -> description, reported as extras
        self.zero_keys: set[str] = set()       # floating tensors read so far that are all zero
        self.kind = kind

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def _read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, checked for NaN/Inf (floating point only), converted to
        ``dtype`` first when given (the check then runs once, on the numbers
        kept, in a dtype the CPU computes fast)."""
        try:
            t = self._read(key)
        except LoraError:
            raise
        except Exception as exc:  # corrupt data region, I/O error
            raise LoraError(f"cannot read tensor: {_first_line(exc)}", self.path, key) from None
        if t.is_floating_point():
            if dtype is not None:
                t = t.to(dtype)
            elif t.element_size() == 1:  # float8: torch has no isfinite for it
                t = t.float()
            if check_finite(self.path, key, t) == (0.0, 0.0):
                self.zero_keys.add(key)
        return t

    def close(self) -> None:
        pass


# Windows cannot replace or delete a file while any view of it is mapped (a
# cached LoRA would block the user's own overwrite): there each tensor is
# copied out of the map, and the map is closed with the source.
COPY_OUT_OF_MAP = os.name == "nt"


class SafetensorsSource(TensorSource):
    """Tensors as views of one private memory map of the file (what
    safetensors' own loader does, without its per-tensor overhead); the
    header is validated first so that truncated files name the tensor whose
    data is missing."""

    kind = "safetensors"

    def __init__(self, path: str):
        header, self._data_start = _read_safetensors_header(path)
        try:
            with open(path, "rb") as fh:
                # ACCESS_COPY: writable views that never write to the file
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        except (OSError, ValueError) as exc:
            raise LoraError(f"not a readable safetensors file: {_first_line(exc)}", path) from None
        meta = header.pop("__metadata__", None) or {}
        self._header = header
        super().__init__(path, {}, {str(k): str(v) for k, v in meta.items()}, kind="safetensors")

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES.get(self._header[key]["dtype"], torch.float32)

    def _read(self, key: str) -> torch.Tensor:
        info = self._header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise LoraError(f"a {info['dtype']} tensor cannot be a LoRA factor", self.path, key)
        begin, end = info["data_offsets"]
        raw = self._bytes[self._data_start + begin:self._data_start + end]
        if COPY_OUT_OF_MAP or (self._data_start + begin) % dtype.itemsize:
            raw = raw.clone()       # unaligned (old writers): a view would be refused
        return raw.view(dtype).view(info["shape"])

    def close(self) -> None:
        # elsewhere the map lives on in the tensors read (each view holds it) and goes with the last one
        self._bytes = None
        if COPY_OUT_OF_MAP and self._map is not None:
            self._map.close()
            self._map = None


# safetensors' own limit: a longer header is garbage, and reading it would
# cost memory out of all proportion to a LoRA
MAX_HEADER_BYTES = 100_000_000


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed in a safetensors header")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _read_safetensors_header(path: str) -> tuple[dict, int]:
    """The checked header and the byte where the data begins."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise LoraError(f"file too short to be a LoRA ({size} bytes)", path)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise LoraError(f"truncated safetensors file: the header claims {n} bytes but the file "
                            f"has {size} bytes in all", path)
        if n > MAX_HEADER_BYTES:
            raise LoraError(f"corrupt safetensors header: it claims {n} bytes (at most "
                            f"{MAX_HEADER_BYTES} are allowed)", path)
        raw = fh.read(n)
    try:
        # NaN/Infinity are not JSON numbers: no shape or offset may be one
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except RecursionError:
        raise LoraError("corrupt safetensors header (nested too deeply)", path) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoraError(f"corrupt safetensors header ({_first_line(exc, 80)})", path) from None
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            if info is not None and not (isinstance(info, dict)
                                         and all(isinstance(v, str) for v in info.values())):
                raise LoraError("corrupt safetensors header: __metadata__ must map names to strings",
                                path, key)
            continue
        try:
            offsets, shape, dtype = info["data_offsets"], info["shape"], info["dtype"]
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                    and isinstance(shape, list) and all(map(_is_count, shape))):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise LoraError("corrupt safetensors header entry (data_offsets, shape and dtype must be "
                            "whole numbers and a type name)", path, key) from None
        begin, end = offsets
        if dtype not in _ST_DTYPES and dtype not in _ST_OTHER_DTYPES:
            raise LoraError(f"unknown tensor dtype {str(dtype)[:20]!r}", path, key)
        if end > data_size:
            raise LoraError(f"truncated file: this tensor's data ends at byte {8 + n + end} but the "
                            f"file has only {size} bytes", path, key)
        width = _ST_OTHER_DTYPES.get(dtype) or _ST_DTYPES[dtype].itemsize
        if end < begin or end - begin != math.prod(shape) * width:
            raise LoraError(f"corrupt safetensors header entry: shape {shape} of {dtype} needs "
                            f"{math.prod(shape) * width} bytes but data_offsets give {end - begin}",
                            path, key)
    return header, 8 + n


def _looks_like_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


# A LoRA pickle is a flat dict or list, at most wrapped a few times
# ('state_dict', TI files): deeper or larger structures are not LoRAs, and
# walking them unbounded would hang (a DAG of shared lists has 2^depth paths).
MAX_PICKLE_DEPTH = 16
MAX_PICKLE_ENTRIES = 1_000_000


def _flatten(obj, prefix: str, tensors: dict, others: dict, path: str) -> None:
    """Nested dicts of tensors (a ``state_dict`` wrapper, TI files) to dotted
    keys. Iterative and bounded: each container is visited once (a container
    reached twice, e.g. one that holds itself, is refused), at most
    MAX_PICKLE_DEPTH levels and MAX_PICKLE_ENTRIES entries."""
    seen: set[int] = set()
    stack = [(obj, prefix, 0)]
    entries = 0
    while stack:
        item, key, depth = stack.pop()
        entries += 1
        if entries > MAX_PICKLE_ENTRIES:
            raise LoraError(f"the pickle holds more than {MAX_PICKLE_ENTRIES} entries; not a LoRA", path)
        if isinstance(item, torch.Tensor):
            tensors[key] = item.detach()  # cloneofsimo saved nn.Parameters
        elif isinstance(item, dict):
            if id(item) in seen:
                raise LoraError("the pickle refers to one container twice (self-referencing or shared "
                                "structure); not a LoRA", path, key or None)
            if depth >= MAX_PICKLE_DEPTH:
                raise LoraError(f"the pickle is nested more than {MAX_PICKLE_DEPTH} levels deep; not a LoRA",
                                path, key or None)
            seen.add(id(item))
            for k, v in reversed(list(item.items())):
                stack.append((v, f"{key}.{k}" if key else str(k), depth + 1))
        else:
            others[key] = f"non-tensor value ({type(item).__name__})"


def _load_torch(path: str) -> TensorSource:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed|\.?\n|$)", str(exc))
        what = found.group(1).strip() if found else _first_line(exc, 120)
        raise LoraError(f"refusing to unpickle: loading needs Python code beyond plain tensors ({what})",
                        path) from None
    except Exception as exc:  # truncated zip, bad pickle stream …
        raise LoraError(f"cannot read PyTorch file (truncated or corrupt?): {_first_line(exc)}",
                        path) from None
    if isinstance(obj, (list, tuple)):
        tensors, others = {}, {}
        for i, item in enumerate(obj):
            _flatten(item, f"[{i}]", tensors, others, path)
        return TensorSource(path, tensors, {}, others, kind="list")
    if isinstance(obj, dict):
        inner = obj.get("state_dict")
        if isinstance(inner, dict) and all(isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
        tensors, others = {}, {}
        _flatten(obj, "", tensors, others, path)
        return TensorSource(path, tensors, {}, others, kind="torch")
    if isinstance(obj, torch.Tensor):
        raise LoraError("the file holds a single tensor, not a LoRA", path)
    raise LoraError(f"the file holds a {type(obj).__name__}, not a LoRA state dict", path)


@contextlib.contextmanager
def errors_name_the_file(path: str):
    """Last line of defence: an unexpected failure while reading ``path``
    (a case the checks above missed) still reaches the user as one line
    naming the file, never as a traceback."""
    try:
        yield
    except LoraError:
        raise
    except (RecursionError, OverflowError, MemoryError, ValueError, RuntimeError, OSError,
            IndexError, KeyError, TypeError, struct.error) as exc:
        raise LoraError(f"cannot read this file ({type(exc).__name__}: {_first_line(exc, 160)})",
                        str(path)) from None


def open_source(path: str) -> TensorSource:
    """Choose the reader from the file's first bytes, not its extension."""
    path = str(path)
    if not os.path.isfile(path):
        raise LoraError("no such file" if not os.path.exists(path) else "not a regular file", path)
    size = os.path.getsize(path)
    if size == 0:
        raise LoraError("empty file (0 bytes)", path)
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(_ZIP_MAGIC) or _looks_like_pickle(head):
        return _load_torch(path)
    if head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return SafetensorsSource(path)
    raise LoraError("not a LoRA file: neither safetensors nor a PyTorch/pickle file "
                    f"(first bytes {head[:8].hex()})", path)
