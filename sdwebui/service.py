"""The WebUI's operations on LoRA files, shared by the HTTP routes and the tab.

Requests are plain dicts (the JSON bodies; field names follow the CLI's options
with '-' as '_'); answers are JSON-ready dicts. LoRAs are named as the WebUI
lists them, or by a path inside one of its LoRA folders (nothing else is read,
and saves go into the first folder only). Every user error is a RequestError
with an HTTP status and one line of text.
"""
from __future__ import annotations

import datetime
import os
import threading

from . import host
from ..core.errors import LoraError

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")     # what the WebUI's Lora extension lists
SIDES = ("out", "in", "both")
DEFAULT_PREFIX = "merge"
_LOCK = threading.Lock()      # one heavy job at a time: core pins torch's threads while it runs


class RequestError(Exception):
    """A bad request: ``status`` (4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(" ".join(str(message).split()))
        self.status = status


class Interrupted(Exception):
    """The user pressed Interrupt."""


def _dirs() -> list[str]:
    return [os.path.realpath(d) for d in host.lora_dirs()]


def _inside(path: str, dirs: list[str]) -> bool:
    real = os.path.realpath(path)
    return any(os.path.commonpath([d, real]) == d and real != d for d in dirs)


def list_loras(refresh: bool = False) -> list[dict]:
    """The WebUI's LoRAs: name (as in <lora:name:1>), alias, file relative to its folder."""
    dirs = _dirs()
    out = []
    for name, entry in sorted(host.available(refresh).items(), key=lambda kv: kv[0].lower()):
        path = os.path.realpath(entry.filename)
        folder = next((d for d in dirs if os.path.commonpath([d, path]) == d), None)
        try:
            stat = os.stat(path)
        except OSError:
            continue
        out.append({"name": name, "alias": getattr(entry, "alias", name) or name,
                    "file": os.path.relpath(path, folder) if folder else os.path.basename(path),
                    "size": stat.st_size, "mtime": stat.st_mtime})
    return out


def applied() -> list[dict]:
    """The LoRAs of the last image: modules matched by the WebUI against modules in the file."""
    from ..core.formats import load_lora

    out = []
    for item in host.applied():
        try:
            item["file_modules"] = len(load_lora(item["filename"]).modules) if item["filename"] else None
        except LoraError as err:
            item["file_modules"], item["error"] = None, str(err)
        item["filename"] = os.path.basename(item["filename"] or "")
        out.append(item)
    return out


def resolve(ref) -> str:
    """A LoRA name or a path inside the LoRA folders → its file."""
    if ref is None or (isinstance(ref, str) and not ref.strip()):      # the tab's empty dropdown
        raise RequestError("no LoRA chosen: pick one from the list (or give its name)")
    if not isinstance(ref, str):
        raise RequestError(f"a LoRA must be given by name (a string), got {ref!r}")
    nets = host.available()
    entry = nets.get(ref)
    if entry is None:
        entry = next((e for e in nets.values() if getattr(e, "alias", None) == ref), None)
    if entry is not None:
        return entry.filename
    dirs = _dirs()
    candidates = [ref] if os.path.isabs(ref) else [os.path.join(d, ref) for d in dirs]
    for path in candidates:
        if not _inside(path, dirs):
            raise RequestError(f"{ref}: outside the WebUI's LoRA folders; only those are read", 403)
        if os.path.isfile(path):
            return os.path.realpath(path)
    raise RequestError(f"no LoRA named '{ref}' in the WebUI's LoRA folders (refresh the list?)", 404)


def _load(ref):
    from ..core.formats import load_lora
    return load_lora(resolve(ref))


def _field(body: dict, key: str, kind, default=None, choices=None, low=None):
    value = body.get(key, default)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise RequestError(f"'{key}' must be {kind.__name__}, got {value!r}")
    if choices is not None and value not in choices:
        raise RequestError(f"'{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    if low is not None and value < low:
        raise RequestError(f"'{key}' must be at least {low}; got {value!r}")
    return value


def _refs(body: dict, key: str = "loras", least: int = 2) -> list[str]:
    refs = body.get(key)
    if not isinstance(refs, list) or len(refs) < least:
        raise RequestError(f"'{key}' must list at least {least} LoRA names")
    return refs


def check_body(body, allowed: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return body


def _stopper(progress, stop: threading.Event | None):
    """core's progress(done, total) callback: reports, and stops the work when asked."""
    def step(done: int, total: int) -> None:
        if stop is not None and stop.is_set():
            raise Interrupted("interrupted")
        if progress is not None:
            progress(done, total)
    return step


SIMILARITY_FIELDS = ("a", "b", "side", "top", "module")


def similarity(body: dict, progress=None, stop=None) -> tuple[dict, object]:
    """Answer and the report (for images)."""
    from ..core.similarity import compare, shared_module

    check_body(body, SIMILARITY_FIELDS)
    side = _field(body, "side", str, "out", SIDES)
    top = _field(body, "top", int, None, low=1)
    module = _field(body, "module", str)
    a, b = _load(body.get("a")), _load(body.get("b"))
    with _LOCK:
        report = compare(a, b, side=side, top=top, progress=_stopper(progress, stop))
    answer = {"a": body["a"], "b": body["b"], "side": side, "summary": report.text_summary(),
              "report": report.to_dict()}
    if module:
        name = shared_module(report.a, report.b, module)
        answer["module"] = name
        answer["phi_grid"] = {s: report.phi_grid(name, s).tolist() for s in report.sides
                              if report.module(name, s).live}
    return answer, report


KERNEL_FIELDS = ("loras", "kernel", "beta", "alpha", "side", "module_filter", "top", "clusters", "dbscan",
                 "method", "seed", "force", "no_cluster")


def kernel(body: dict, progress=None, stop=None) -> tuple[dict, object, object]:
    """Answer, kernel matrix and clustering (for the heatmap)."""
    from ..core.kernel_matrix import cluster_as_asked, compute_kernel_matrix
    from ..core.kernels import DEFAULT_KERNEL, KERNELS

    check_body(body, KERNEL_FIELDS)
    refs = _refs(body)
    args = dict(kernel=_field(body, "kernel", str, DEFAULT_KERNEL, tuple(KERNELS)),
                beta=_field(body, "beta", float, 1.0), alpha=_field(body, "alpha", float, 2.0),
                side=_field(body, "side", str, "out", SIDES),
                module_filter=_field(body, "module_filter", str), top=_field(body, "top", int, None, low=1),
                force=_field(body, "force", bool, False))
    clusters = _field(body, "clusters", int, None, low=1)
    dbscan = body.get("dbscan")
    if dbscan is not None and (clusters is not None or not isinstance(dbscan, list) or len(dbscan) != 2):
        raise RequestError("'dbscan' must be [EPS, MIN] and cannot go with 'clusters'")
    method = _field(body, "method", str, "spectral", ("spectral", "kernel-kmeans"))
    seed = _field(body, "seed", int, 0)
    loras = [_load(r) for r in refs]
    with _LOCK:
        km = compute_kernel_matrix(loras, progress=_stopper(progress, stop), **args)
    result, note = (None, None) if _field(body, "no_cluster", bool, False) else \
        cluster_as_asked(km, clusters, dbscan, method, seed, args["force"])
    answer = {"loras": refs, "summary": km.text_summary(result), "result": km.to_dict(result)}
    if note:
        answer["note"] = note
    return answer, km, result


MERGE_FIELDS = ("loras", "method", "weights", "rank", "energy", "block_weights", "normalise", "space", "keep",
                "dtype", "name", "overwrite", "naming", "distance", "max_iter", "ties_density", "dare_drop", "seed")


def merge_methods() -> tuple[str, ...]:
    from ..core import merge as merge_module
    return tuple(merge_module.METHODS)


def _checked_name(name: str) -> str:
    stem = name[:-len(".safetensors")] if name.lower().endswith(".safetensors") else name
    if not stem or stem != stem.strip() or any(c in stem for c in '/\\:*?"<>|') or stem in (".", ".."):
        raise RequestError(f"'{name}' is not a plain file name (no folders, no /\\:*?\"<>|)")
    return stem


def new_name(prefix: str, folder: str) -> str:
    """A name no file in ``folder`` has: <prefix>-<UTC date-time>[-n]."""
    stem = f"{_checked_name(prefix)}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    name, n = stem, 1
    while any(os.path.exists(os.path.join(folder, name + s)) for s in LORA_SUFFIXES):
        n += 1
        name = f"{stem}-{n}"
    return name


def _target(body: dict, default_prefix: str) -> tuple[str, str, bool]:
    """(name, path, overwrite) for a save into the first LoRA folder; a new name by default."""
    from ..core.save import safe_output_path

    folder = host.lora_dirs()[0]
    os.makedirs(folder, exist_ok=True)
    overwrite = _field(body, "overwrite", bool, False)
    name = _field(body, "name", str)
    name = _checked_name(name) if name else new_name(host.option("grassmann_lora_prefix", DEFAULT_PREFIX)
                                                     or default_prefix, folder)
    try:
        path = safe_output_path(folder, name + ".safetensors")
    except LoraError as err:
        raise RequestError(str(err)) from None
    if os.path.exists(path) and not overwrite:
        raise RequestError(f"a LoRA named '{name}' exists; choose another name or set overwrite", 409)
    return name, path, overwrite and os.path.exists(path)


def _saved(name: str, path: str, replaced: bool) -> dict:
    """After a save: the LoRA list rescanned; on overwrite every cached copy dropped."""
    cleared = host.invalidate(name, path) if replaced else []
    host.refresh()
    return {"name": name, "file": os.path.basename(path), "prompt": f"<lora:{name}:1>",
            "overwritten": replaced, "caches_cleared": cleared}


def _per_lora(body: dict, key: str, n: int, ok, what: str) -> list | None:
    """A list with one entry per LoRA (or null)."""
    values = body.get(key)
    if values is not None and (not isinstance(values, list) or len(values) != n or not all(map(ok, values))):
        raise RequestError(f"'{key}' must list {n} {what}, one per LoRA")
    return values


def _param(body: dict, param, kind):
    """A parameter of the method table (core.merge.methods.Param): type here; default, choices, range there."""
    value = _field(body, param.name, kind, param.default, param.choices)
    try:
        return param.check(value)
    except LoraError as err:
        raise RequestError(f"'{param.name}': {err}") from None


def merge(body: dict, progress=None, stop=None) -> tuple[dict, object]:
    """Answer (saved name, prompt tag, fidelity report) and the MergeResult."""
    from ..core import merge as merge_module
    from ..core.karcher import DISTANCES
    from ..core.merge import methods as table
    from ..core.save import DTYPES

    check_body(body, MERGE_FIELDS)
    refs = _refs(body)
    method = _field(body, "method", str, host.option("grassmann_lora_method", "karcher"), merge_methods())
    weights = _per_lora(body, "weights", len(refs), lambda w: isinstance(w, (int, float)) and not isinstance(w, bool),
                        "numbers")
    rank = body.get("rank")
    if rank != "auto":
        if isinstance(rank, str):
            raise RequestError(f"'rank' must be int or 'auto', got {rank!r}")
        rank = _field(body, "rank", int, None, low=1)
    dtype = _field(body, "dtype", str, host.option("grassmann_lora_dtype", "fp16"), tuple(DTYPES))
    kwargs = dict(naming=_field(body, "naming", str, "kohya", merge_module.NAMINGS),
                  distance=_field(body, "distance", str, "geodesic", DISTANCES),
                  max_iter=_field(body, "max_iter", int, None, low=1),
                  block_weights=_per_lora(body, "block_weights", len(refs), lambda x: x is None or isinstance(x, str),
                                          "entries (null or a block-weight spec)"),
                  **{p.name: _param(body, p, kind) for p, kind in (
                      (table.ENERGY, float), (table.NORMALISE, bool), (table.SPACE, str), (table.KEEP, float),
                      (table.TIES_DENSITY, float), (table.DARE_DROP, float), (table.SEED, int))})
    paths = [resolve(r) for r in refs]
    name, path, replaced = _target(body, DEFAULT_PREFIX)
    if any(os.path.exists(path) and os.path.samefile(p, path) for p in paths):
        raise RequestError(f"'{name}' is one of the sources; save the merge under another name")
    from ..core.formats import load_lora
    loras = [load_lora(p) for p in paths]
    with _LOCK:
        result = merge_module.merge(loras, [float(w) for w in weights] if weights else None, method, rank,
                                    dtype=DTYPES[dtype], progress=_stopper(progress, stop), **kwargs)
    result.save(path, overwrite=replaced)
    answer = _saved(name, path, replaced)
    answer.update(method=method, sources=refs, table=result.report.table(), report=result.report.to_dict())
    return answer, result


CONVERT_FIELDS = ("lora", "name", "dtype", "overwrite")


def convert(body: dict) -> dict:
    """Any readable LoRA → a kohya-named copy in the LoRA folder (A1111 needs kohya names)."""
    from ..core.conversion import carried_metadata, kohya_ready
    from ..core.save import DTYPES, save_kohya

    check_body(body, CONVERT_FIELDS)
    src = resolve(body.get("lora"))
    dtype = _field(body, "dtype", str, None, tuple(DTYPES))
    stem = os.path.splitext(os.path.basename(src))[0]
    name, path, replaced = _target({**body, "name": body.get("name") or f"{stem}-kohya"}, stem)
    if os.path.exists(path) and os.path.samefile(src, path):
        raise RequestError(f"'{name}' is the file being converted; choose another name")
    from ..core.formats import load_lora
    lora = load_lora(src)
    save_kohya(kohya_ready(lora, DTYPES[dtype] if dtype else None), path,
               DTYPES[dtype] if dtype else None, replaced, carried_metadata(lora))
    answer = _saved(name, path, replaced)
    answer.update(source=body["lora"], source_format=lora.format, family=lora.family_label,
                  modules=len(lora.modules), warnings=list(lora.warnings))
    return answer
