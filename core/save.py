"""Writing files: the one path every output (LoRA, JSON report, PNG) takes.

The rules, for every writer (CLI, nodes, WebUI):
- atomic: the data goes to a temporary file beside the target, then appears
  under its name in one step, so a crash never leaves half a file there;
- no overwrite unless asked, and atomically so: the temporary file is
  hard-linked to the name (fails if it exists), so of two concurrent writers
  of one name exactly one wins;
- temporaries are named ``.NAME.partial-XXXXXXXX`` (hidden, no model
  extension), so no host lists them as LoRAs; stale ones are removed;
- the ordinary mode, 0666 minus the umask (0644 usually);
- never outside the folder a name was given for (``safe_output_path``), never
  onto an input or another output of the same run (``check_outputs``);
- never a non-finite value, nor one the chosen dtype cannot hold.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import struct
import time

import torch

from .errors import LoraError
from .lora import LoraFile

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

TEMP_MARK = ".partial-"
STALE_AFTER_S = 3600          # older temporaries are left-overs of a killed writer
NAME_MAX = 255                # bytes per path component on every common file system
_TEMP_STEM = 120              # temporary names keep this many characters of the target's
_BAD_CHARS = set('<>:"|?*')   # not allowed in Windows names; a ':' is also a drive letter
_COUNTER = re.compile(r"_(\d{5,})$")


# ------------------------------------------------------------------ names

def _name_problem(part: str) -> str | None:
    if any(ord(c) < 32 or ord(c) == 127 for c in part):
        return "holds a control character (NUL, newline, tab …)"
    if len(part.encode("utf-8", "surrogatepass")) > NAME_MAX:
        return f"is too long (more than {NAME_MAX} bytes)"
    return None


def clean_relative_name(filename: str) -> str:
    """A user-typed file name inside an output folder, normalised to
    'sub/name.ext', or a LoraError saying why it cannot be one. Backslashes
    count as separators on every system; absolute paths, drive letters, '~',
    '..' and names with control or Windows-reserved characters are refused."""
    if not isinstance(filename, str):
        raise LoraError(f"file name must be text, got {type(filename).__name__}")
    name = filename.strip()
    problem = _name_problem(name)
    if problem:
        raise LoraError(f"file name {filename!r} {problem}")
    if not name:
        raise LoraError("empty file name")
    path = name.replace("\\", "/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise LoraError(f"file name {filename!r} is an absolute path; give a name inside the output folder")
    if path.startswith("~"):
        raise LoraError(f"file name {filename!r} points into a home folder; give a name inside the output folder")
    if path.endswith("/"):
        raise LoraError(f"file name {filename!r} names a folder, not a file")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise LoraError(f"file name {filename!r} has no file name in it")
    for part in parts:
        if part == "..":
            raise LoraError(f"file name {filename!r} climbs out of the output folder ('..')")
        if _BAD_CHARS & set(part):
            raise LoraError(f"file name {filename!r} holds a character not allowed in file names "
                            f"({''.join(sorted(_BAD_CHARS & set(part)))})")
        if part != part.strip() or part.endswith("."):
            raise LoraError(f"file name {filename!r}: a folder or file name ends with a space or dot")
        problem = _name_problem(part)
        if problem:
            raise LoraError(f"file name {filename!r}: part {part[:40]!r}… {problem}")
    return "/".join(parts)


def safe_output_path(folder: str, filename: str) -> str:
    """Join folder and a user-given file name, refusing anything that would
    land outside ``folder`` (absolute paths, '..', symlinked escapes)."""
    rel = clean_relative_name(filename)
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, *rel.split("/")))
    if os.path.commonpath([root, target]) != root or target == root:
        raise LoraError(f"output path {filename!r} escapes the output folder {root}")
    return target


def numbered_name(folder: str, stem: str, ext: str) -> str:
    """The next free 'stem_00001.ext' in ``folder``, as ComfyUI's SaveImage
    counts: one more than the highest counter already there for this stem."""
    highest = 0
    try:
        entries = os.listdir(folder)
    except OSError:
        entries = []
    for entry in entries:
        base, dot, tail = entry.rpartition(".")
        if dot and "." + tail == ext and base.startswith(stem + "_"):
            found = _COUNTER.fullmatch("_" + base[len(stem) + 1:])
            if found:
                highest = max(highest, int(found.group(1)))
    return f"{stem}_{highest + 1:05d}{ext}"


# ------------------------------------------------------------------ checks before any work

def _same(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str, overwrite: bool = False, suffixes: tuple[str, ...] = (),
                 make_dirs: bool = False) -> str:
    """The checks one output path must pass before any work is done: a file
    name (not a folder), an expected extension, an existing folder (unless
    ``make_dirs``), a name the system accepts, and no existing file unless
    ``overwrite``. Returns the absolute path."""
    if not path or path.endswith(("/", os.sep)):
        raise LoraError("output must be a file name, not a folder", path or "''")
    problem = _name_problem(os.path.basename(path))
    if problem:
        raise LoraError(f"output file name {problem}", repr(path))
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise LoraError("output is a folder; give a file name", path)
    if suffixes and not path.lower().endswith(suffixes):
        stem = os.path.splitext(path)[0]
        raise LoraError(f"this output is written as {suffixes[0]}; name it {stem}{suffixes[0]}", path)
    folder = os.path.dirname(full)
    if not os.path.isdir(folder) and not make_dirs:
        what = "is not a folder" if os.path.exists(folder) else "does not exist; create it first"
        raise LoraError(f"output folder {folder} {what}", path)
    if os.path.lexists(full) and not overwrite:
        raise LoraError("file exists; pass --overwrite to replace it", path)
    return full


def check_outputs(outputs: dict[str, str | None], inputs: list[str] = (), overwrite: bool = False,
                  suffixes: dict[str, tuple[str, ...]] | None = None) -> None:
    """``check_output`` for each named output (None = not asked), and no
    output onto an input or onto another output of the same run."""
    given = {label: p for label, p in outputs.items() if p}
    for label, path in given.items():
        check_output(path, overwrite, (suffixes or {}).get(label, ()))
        for src in inputs:
            if _same(path, src):
                raise LoraError(f"output is the input file ({label} would replace it); write to a new file",
                               path)
    labels = list(given)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if _same(given[a], given[b]):
                raise LoraError(f"{a} and {b} are the same file; give them different names", given[a])


# ------------------------------------------------------------------ writing

def _clean_stale(folder: str) -> None:
    """Remove temporaries a killed writer left behind (only old ones: a young
    one may belong to a writer still running)."""
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if entry.startswith(".") and TEMP_MARK in entry:
            path = os.path.join(folder, entry)
            try:
                if now - os.lstat(path).st_mtime > STALE_AFTER_S:
                    os.unlink(path)
            except OSError:
                pass


def _os_error(exc: OSError, path: str) -> LoraError:
    reasons = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENAMETOOLONG: "the name is too long",
               errno.EISDIR: "it is a folder", errno.ENOTDIR: "a part of the path is not a folder",
               errno.ENOENT: "the folder does not exist"}
    reason = reasons.get(exc.errno, exc.strerror or type(exc).__name__)
    return LoraError(f"cannot write: {reason}", path)


def _publish(tmp: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)        # fails with EEXIST if the name is taken, atomically
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        # no hard links here (FAT, some network shares): claim the name with
        # O_EXCL, then move the data over the claim
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_write(path: str, write, suffix: str = "", overwrite: bool = False, make_dirs: bool = True) -> str:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then put
    it under ``path`` in one step (see the module rules). ``suffix`` is unused
    and kept for callers; temporaries never carry a model extension."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        raise LoraError("cannot write: it is a folder", path)
    if _name_problem(os.path.basename(path)):
        raise LoraError(f"cannot write: the file name {_name_problem(os.path.basename(path))}", repr(path))
    if not overwrite and os.path.lexists(path):
        raise LoraError("file exists; pass overwrite to replace it", path)
    try:
        if make_dirs:
            os.makedirs(folder, exist_ok=True)
        _clean_stale(folder)
        tmp = os.path.join(folder, f".{os.path.basename(path)[:_TEMP_STEM]}{TEMP_MARK}{secrets.token_hex(4)}")
        # 0o666: the umask gives the ordinary mode (mkstemp would give 0600)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = os.stat(tmp).st_mode & 0o777
    except OSError as exc:
        raise _os_error(exc, path) from None
    try:
        write(tmp)
        os.chmod(tmp, mode)           # in case ``write`` replaced the file
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _publish(tmp, path, overwrite)
    except FileExistsError:
        raise LoraError("file exists (another writer was first); pass overwrite to replace it", path) from None
    except OSError as exc:
        raise _os_error(exc, path) from None
    finally:
        if os.path.lexists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def write_text(path: str, text: str, overwrite: bool = False, make_dirs: bool = True) -> str:
    """A text file (JSON report) by the same rules."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    return atomic_write(path, write, overwrite=overwrite, make_dirs=make_dirs)


def write_numbered(folder: str, stem: str, ext: str, write, make_dirs: bool = True) -> str:
    """Write under the next free 'stem_00001.ext' in ``folder``; a name taken
    between counting and writing (a concurrent run) moves on to the next."""
    for _ in range(1000):
        path = os.path.join(folder, numbered_name(folder, stem, ext))
        try:
            return atomic_write(path, write, overwrite=False, make_dirs=make_dirs)
        except LoraError:
            if not os.path.lexists(path):
                raise
    raise LoraError(f"no free numbered name for {stem}{ext}", folder)


# ------------------------------------------------------------------ LoRA files

def check_storable(tensors: dict[str, torch.Tensor], path: str,
                   sources: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse to write NaN/Inf, or values the written dtype cannot hold
    (``sources``: the same tensors before the cast, for the reason)."""
    for key, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t.float() if t.element_size() < 2 else t)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            continue
        src = (sources or {}).get(key)
        if src is not None and src.numel():
            s_lo, s_hi = torch.aminmax(src)
            if bool(torch.isfinite(s_lo)) and bool(torch.isfinite(s_hi)):
                big = max(abs(float(s_lo)), abs(float(s_hi)))
                raise LoraError(f"refusing to write: a value of {big:.3g} does not fit {str(t.dtype)[6:]} "
                                f"(largest {torch.finfo(t.dtype).max:.5g}); save as fp32 or lower the weights",
                                path, key)
        raise LoraError("refusing to write: the result holds NaN/Inf (non-finite) values", path, key)


def kohya_tensors(lora: LoraFile, dtype: torch.dtype | None = None, checked_for: str | None = None,
                  key_names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Plain kohya LoRA/LoCon tensors: '<name>.lora_down.weight', '.lora_up.weight', '.alpha'.

    Any module kind is written as its exact factors (LoHa/LoKr at their
    factored rank), with alpha = scale·R so ComfyUI's alpha/R gives back scale.
    ``checked_for``: the path about to be written; values that are non-finite
    or out of range for the written dtype are refused. ``key_names``: canonical
    name -> the stem to write (a merge keeps its first source's spelling).
    """
    from .arch import written_name

    out: dict[str, torch.Tensor] = {}
    for canonical, m in lora.modules.items():
        name = written_name(lora.family, canonical)  # DiT families: what ComfyUI maps
        dt = dtype or m.dtype
        r = m.factor_rank
        down, up = m.down, m.up
        if m.is_conv:
            d_out, c_in, kh, kw = m.weight_shape
            down = down.reshape(r, c_in, kh, kw)
            up = up.reshape(d_out, r, 1, 1)
        stem = (key_names or {}).get(name, name)
        pairs = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        cast = {k: v.to(dt).cpu() for k, v in pairs.items()}
        cast[f"{stem}.alpha"] = torch.tensor(float(m.scale) * r, dtype=torch.float32)
        if checked_for is not None:
            check_storable(cast, checked_for, pairs)
        out.update(cast)
    return out


def kohya_metadata(lora: LoraFile, extra: dict | None = None) -> dict[str, str]:
    ranks = sorted({m.factor_rank for m in lora.modules.values()})
    has_conv = any(m.is_conv for m in lora.modules.values())
    base_version = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(lora.family, lora.family)
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2",
            "sdxl": "stable-diffusion-xl-v1-base"}.get(lora.family, lora.family)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks[-1] if ranks else 0),
        "ss_network_alpha": str(ranks[-1] if ranks else 0),
        "ss_base_model_version": base_version,
        "ss_v2": str(lora.family == "sd2"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
        "modelspec.title": os.path.splitext(lora.name)[0],
        "grassmann_lora.family": lora.family,
    }
    if has_conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(ranks[-1] if ranks else 0)})
    if extra:
        meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra.items()})
    return meta


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_writer(tensors: dict[str, torch.Tensor], metadata: dict | None):
    """``write(tmp)`` for atomic_write: a safetensors file, streamed tensor by
    tensor into the file it is given (safetensors' own save_file makes its own
    0600 temporary and renames it, which would undo both rules)."""
    def write(tmp: str) -> None:
        header: dict = {}
        offset = 0
        for key, t in tensors.items():
            size = t.numel() * t.element_size()
            header[key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for t in tensors.values():   # little-endian, as every host torch runs on
                fh.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return write


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None,
                overwrite: bool = False) -> str:
    """Write a safetensors file by the module rules (raw tensors; LoRAs go through save_kohya)."""
    return atomic_write(path, safetensors_writer(tensors, metadata), overwrite=overwrite)


def save_kohya(lora: LoraFile, path: str, dtype: torch.dtype | None = None, overwrite: bool = False,
               extra_metadata: dict | None = None, key_names: dict[str, str] | None = None,
               numbered: bool = False) -> str:
    """THE path that writes a LoRA file (convert, merge, the Save nodes).
    ``numbered``: ``path`` is a pattern; write 'stem_00001.safetensors', the
    next free number, beside it (the Save node's default). Returns the path."""
    if not lora.modules:
        raise LoraError("nothing to save: the LoRA has no modules", path)
    tensors = kohya_tensors(lora, dtype, checked_for=path, key_names=key_names)
    write = safetensors_writer(tensors, kohya_metadata(lora, extra_metadata))
    if numbered:
        stem, ext = os.path.splitext(os.path.abspath(path))
        return write_numbered(os.path.dirname(stem), os.path.basename(stem), ext, write)
    return atomic_write(path, write, overwrite=overwrite)
