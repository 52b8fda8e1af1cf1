"""Reading any supported LoRA file into a ``LoraFile`` (or module by module).

``open_lora`` looks at names, shapes and metadata only: it groups keys into
modules, checks every factor shape, detects the family and gives each module
its canonical name. Tensors are read when a module is asked for, so large
safetensors files can be streamed one module at a time.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Iterator

import torch

from ..device import linalg_threads
from ..errors import LoraError
from ..family import dit_candidates, explain_family, family_from_metadata
from ..lora import FAMILY_LABELS, LoraFile, LoraModule, is_all_zero, scale_from_alpha
from ..sdarch import DIT_FAMILIES, TABLE_FAMILIES, arch_for
from . import cloneofsimo
from .adapters import ModulePlan, build_factors, plan_module
from .fit import best_table, part_rows
from .fused import fuse
from .names import classify_extra, parse_key, resolve_module
from .source import errors_name_the_file

# Everything LoraFile.format can be.
FORMATS = ("kohya", "lycoris-loha", "lycoris-lokr", "lycoris", "diffusers-processor", "diffusers",
           "peft", "comfyui", "cloneofsimo", "cloneofsimo-pt")

_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
_COMFY_PREFIXES = ("diffusion_model.", "model.diffusion_model.", "text_encoders.")
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                        "conditioner.", "diffusion_model.", "model.", "vae.", "text_encoders.")
_LIST_SHOWN = 4
# factor dtypes a plain LoRA keeps when read (float8 and integers become float32)
_KEPT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_SHOWN])
    return shown + (f" … (+{len(items) - _LIST_SHOWN} more)" if len(items) > _LIST_SHOWN else "")


class LoraReader:
    """A LoRA file opened for reading. ``names`` are canonical module names in
    depth order (file order for families without a table); ``read(name)``
    materialises one module; ``load()`` all."""

    def __init__(self, path: str):
        from .source import open_source

        self.path = str(path)
        self.source = open_source(self.path)
        self.metadata: dict[str, str] = dict(self.source.metadata)
        self.extras: dict[str, str] = dict(self.source.non_tensors)
        self.warnings: list[str] = []
        groups, namings = self._group_keys()
        self._plans: dict[str, ModulePlan] = {}
        self._alphas: dict[str, str] = {}      # module key -> alpha key
        self._dora: set[str] = set()
        # fused canonical name -> its split parts (plan, placements in the fused rows)
        self._fused: dict[str, list[tuple[ModulePlan, tuple]]] = {}
        plans = self._plan(groups, namings)
        self.family, self.family_reason = explain_family(
            [p.module_key for p in plans], {p.module_key: p.weight_shape for p in plans}, self.metadata)
        claimed = family_from_metadata(self.metadata)
        self.variant: str | None = None
        self._fit_dit(plans, claimed)
        if claimed and claimed != self.family:
            self.warnings.append(f"metadata says {FAMILY_LABELS[claimed]} but the modules say "
                                 f"{FAMILY_LABELS[self.family]} ({self.family_reason}); using the modules")
        self._name_modules(plans, groups)
        self.format = self._format()
        self._peft = _peft_configs(self.metadata, self.path)
        self._summarise_extras()

    # -- grouping and planning (names and shapes only) --------------------

    def _group_keys(self) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
        src = self.source
        if src.kind == "list":
            if self.extras:
                key = next(iter(self.extras))
                raise LoraError("cloneofsimo list holds something that is not a tensor", self.path, key)
            keys = src.keys()
            layout = cloneofsimo.list_layout([src.shape(k) for k in keys], self.path)
            groups = {mk: {role: keys[i] for role, i in roles.items()} for mk, roles in layout.items()}
            return groups, {mk: "cloneofsimo-pt" for mk in groups}
        groups: dict[str, dict[str, str]] = {}
        namings: dict[str, str] = {}
        for key in src.keys():
            parsed = parse_key(key)
            if parsed is None:
                embed = self.metadata.get(key) == "<embed>"
                self.extras[key] = ("Textual-Inversion embedding (not a LoRA weight)" if embed
                                    else classify_extra(key)[0])
                continue
            mk, role, naming = parsed
            roles = groups.setdefault(mk, {})
            if role in roles:
                raise LoraError(f"two tensors give the {role} of one module ({roles[role]!r} and "
                                f"{key!r})", self.path, key)
            roles[role] = key
            if naming:
                namings[mk] = "comfyui" if naming == "kohya" and mk.startswith(_COMFY_PREFIXES) else naming
        return self._place_cloneofsimo(groups, namings), namings

    def _place_cloneofsimo(self, groups: dict[str, dict[str, str]],
                           namings: dict[str, str]) -> dict[str, dict[str, str]]:
        """'unet:7' → the dotted module path at position 7."""
        out = {mk: roles for mk, roles in groups.items() if ":" not in mk}
        for part in ("unet", "text_encoder"):
            found = {int(mk.split(":")[1]): roles for mk, roles in groups.items()
                     if mk.startswith(part + ":")}
            if not found:
                continue
            if sorted(found) != list(range(len(found))):
                missing = sorted(set(range(max(found) + 1)) - set(found))
                raise LoraError(f"cloneofsimo {part} positions are not contiguous (missing "
                                f"{missing[:5]})", self.path, f"{part}:{missing[0]}:up")
            paths = cloneofsimo.module_paths(part, len(found), self.metadata, self.path)
            for i, path in enumerate(paths):
                out[path] = found[i]
                namings[path] = "cloneofsimo"
        return out

    def _plan(self, groups: dict[str, dict[str, str]], namings: dict[str, str]) -> list[ModulePlan]:
        plans = []
        for mk, roles in groups.items():
            plan = plan_module(mk, roles, self.source.shape, self.path, namings.get(mk, "kohya"))
            if plan is None:
                for key in roles.values():
                    self.extras[key] = "alpha/DoRA scale without LoRA factors"
                continue
            plans.append(plan)
        if not plans:
            self._no_modules()
        return plans

    def _no_modules(self):
        keys = self.source.keys()
        if not keys:
            raise LoraError("the file holds no tensors", self.path)
        unsupported = [k for k in keys if classify_extra(k)[1]]
        if unsupported:
            reason = classify_extra(unsupported[0])[0]
            raise LoraError(f"unsupported adapter: {reason}; this file has no LoRA/LoHa/LoKr "
                            "modules to read", self.path, unsupported[0])
        plain = [k for k in keys if k.endswith((".weight", ".bias"))]
        if plain and (len(plain) * 2 >= len(keys) or any(k.startswith(_CHECKPOINT_PREFIXES) for k in plain)):
            example = next((k for k in plain if k.endswith(".weight")), plain[0])
            raise LoraError(f"this looks like a full model checkpoint, not a LoRA ({len(plain)} plain "
                            "weight/bias tensors, no LoRA factors)", self.path, example)
        if all("embed" in self.extras.get(k, "") for k in keys):
            raise LoraError("this looks like a Textual-Inversion embedding, not a LoRA", self.path, keys[0])
        raise LoraError("no LoRA weights found (no lora_up/lora_down, lora_A/lora_B, hada_* or lokr_* "
                        "tensors)", self.path, keys[0])

    def _fit_dit(self, plans: list[ModulePlan], claimed: str | None) -> None:
        """Family and variant of a DiT file by fitting its modules to the tables."""
        if self.family in ("hunyuan_video", "ltx"):  # decided by names no table family has
            return
        candidates = dit_candidates([p.module_key for p in plans], self.metadata)
        if self.family in DIT_FAMILIES and self.family not in candidates:
            candidates.append(self.family)
        if not candidates:
            return
        best = best_table(plans, candidates, claimed)
        if best is None:
            return
        family, self.variant, good, bad = best
        if family != self.family or not self.family_reason.startswith("module"):
            self.family_reason = f"modules fit the {FAMILY_LABELS[family]} ({self.variant}) table"
        self.family = family

    def _name_modules(self, plans: list[ModulePlan], groups: dict[str, dict[str, str]]) -> None:
        table = arch_for(self.family, self.variant) if self.family in TABLE_FAMILIES else None
        outside = []
        owner: dict[str, str] = {}
        for plan in plans:
            name, known, rows = resolve_module(plan.module_key, self.family, self.variant)
            roles = groups[plan.module_key]
            if "alpha" in roles:
                self._alphas[plan.module_key] = roles["alpha"]
            if rows is not None:
                self._add_part(name, plan, rows, table, owner)
                continue
            if name in owner:
                raise LoraError(f"two modules map to the same layer {name} ({owner[name]!r} and "
                                f"{plan.module_key!r})", self.path, plan.first_key)
            owner[name] = plan.module_key
            if table is not None and known:
                expected = table.shapes[name]
                flat = (expected[0], int(math.prod(expected[1:])))
                if (plan.d_out, plan.d_in) != flat or (len(plan.weight_shape) == 4 and len(expected) == 4
                                                      and plan.weight_shape != expected):
                    raise LoraError(f"module shape {plan.weight_shape} contradicts the "
                                    f"{FAMILY_LABELS[self.family]} shape {expected} of {name} "
                                    f"(family from {self.family_reason})", self.path, plan.first_key)
                plan.weight_shape = expected
            elif table is not None:
                outside.append(name)
            if "dora_scale" in roles:
                self._dora.add(name)
                self.extras[roles["dora_scale"]] = ("DoRA magnitude: ΔW here is the low-rank direction "
                                                    "only, not the weight-decomposed update")
            self._plans[name] = plan
        self._plan_fused(table)
        if table is not None:  # depth order, modules outside the table last
            order = sorted(self._plans, key=lambda n: table.order.get(n, len(table.order)))
            self._plans = {n: self._plans[n] for n in order}
        if outside:
            self.warnings.append(f"{len(outside)} module(s) are not in the {FAMILY_LABELS[self.family]} "
                                 f"table; kept under kohya-style names without a shape check: "
                                 f"{_listing(outside)}")

    def _add_part(self, name: str, plan: ModulePlan, rows: tuple, table, owner: dict[str, str]) -> None:
        """A split module (diffusers to_q of a fused qkv): checked against its
        rows and kept for assembling the fused module."""
        shape = table.shapes[name]
        want = (part_rows(rows), int(math.prod(shape[1:])))
        if (plan.d_out, plan.d_in) != want or len(plan.weight_shape) != 2:
            raise LoraError(f"module shape {plan.weight_shape} contradicts the {FAMILY_LABELS[self.family]} "
                            f"shape {want} of this slice of {name} (family from {self.family_reason})",
                            self.path, plan.first_key)
        if name in owner:
            raise LoraError(f"{plan.module_key!r} is a slice of {name}, which {owner[name]!r} already "
                            "gives whole", self.path, plan.first_key)
        for other, other_rows in self._fused.get(name, []):
            if any(s < e2 and s2 < e for s, e, _ in rows for s2, e2, _ in other_rows):
                raise LoraError(f"two modules give the same rows of {name} ({other.module_key!r} and "
                                f"{plan.module_key!r})", self.path, plan.first_key)
        if "dora_scale" in plan.keys:
            raise LoraError("DoRA on a split module is not supported", self.path, plan.keys["dora_scale"])
        self._fused.setdefault(name, []).append((plan, rows))

    def _plan_fused(self, table) -> None:
        """One plan per fused module: rank = the parts' ranks summed."""
        for name, parts in self._fused.items():
            if name in self._plans:
                raise LoraError(f"{name} is given both whole and as slices", self.path,
                                parts[0][0].first_key)
            shape = table.shapes[name]
            plans = [p for p, _ in parts]
            kinds = {p.kind for p in plans}
            keys = {f"{i}.{role}": key for i, p in enumerate(plans) for role, key in p.keys.items()}
            self._plans[name] = ModulePlan(
                " + ".join(p.module_key for p in plans), kinds.pop() if len(kinds) == 1 else "lora", keys,
                shape[0], int(math.prod(shape[1:])), tuple(shape), sum(p.rank for p in plans), None,
                plans[0].naming)

    def _format(self) -> str:
        kinds = {p.kind for p in self._plans.values()}
        if "loha" in kinds and "lokr" in kinds:
            return "lycoris"
        if "loha" in kinds or "lokr" in kinds:
            return "lycoris-loha" if "loha" in kinds else "lycoris-lokr"
        counts = Counter(p.naming for p in self._plans.values())
        fmt, _ = counts.most_common(1)[0]
        if len(counts) > 1:
            self.warnings.append("the file mixes naming schemes: " + ", ".join(
                f"{n} ({c})" for n, c in counts.most_common()))
        return fmt

    def _summarise_extras(self) -> None:
        if self._dora:
            self.warnings.append(f"{len(self._dora)} module(s) carry a DoRA magnitude (dora_scale); "
                                 "their ΔW here is the low-rank part only")
        others = [k for k in self.extras if not self.extras[k].startswith("DoRA")]
        if others:
            self.warnings.append(f"{len(others)} tensor(s) are not LoRA weights and were skipped: "
                                 + _listing([f"{k} ({self.extras[k]})" for k in others]))

    # -- reading ------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._plans)

    def plan(self, name: str) -> ModulePlan:
        return self._plans[name]

    def read(self, name: str) -> LoraModule:
        with linalg_threads(1):  # small tensor ops: one thread is far faster on busy CPUs
            return self._read(name)

    def _stored_dtype(self, plan: ModulePlan) -> torch.dtype:
        dtypes = [self.source.dtype(k) for k in plan.keys.values()]
        return max(dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)

    def _plain(self, plan: ModulePlan, name: str) -> bool:
        """A plain LoRA module: its factors are the tensors read, as they are
        (no lora_mid product, no fused parts)."""
        return plan.kind == "lora" and "mid" not in plan.keys and name not in self._fused

    def _as_stored(self, plan: ModulePlan, name: str, stored: torch.dtype) -> bool:
        """A plain LoRA (up, down) is kept as stored: no product is formed while
        reading, and every computation converts to its own dtype (float64 for
        the geometry). Converting 0.5 GB of fp16 to fp32 here took longer than
        reading the file."""
        if not self._plain(plan, name) or stored not in _KEPT:
            return False
        return all(self.source.dtype(k) == stored for k in plan.keys.values())

    def _factors(self, plan: ModulePlan, work: torch.dtype):
        """(up, down, scale, alpha, source keys) of one stored module."""
        get = self.source.get
        up, down = build_factors(plan, get, work)
        alpha = None
        alpha_key = self._alphas.get(plan.module_key)
        if alpha_key is not None:
            value = get(alpha_key)
            if value.numel() != 1:
                raise LoraError(f"alpha must be a single number, got shape {tuple(value.shape)}",
                                self.path, alpha_key)
            alpha = float(value.reshape(()).item())
        scale = scale_from_alpha(alpha, plan.divisor) if plan.divisor else 1.0
        if alpha is None and self._peft:
            found = _peft_alpha(self._peft, plan.module_key, plan.rank)
            if found is not None:
                alpha, scale = found
        return up, down, scale, alpha, tuple(plan.keys.values()) + ((alpha_key,) if alpha_key else ())

    def _read(self, name: str) -> LoraModule:
        plan = self._plans[name]
        stored = self._stored_dtype(plan)
        work = torch.float64 if stored == torch.float64 else torch.float32
        if self._as_stored(plan, name, stored):
            work = stored
        if name in self._fused:
            return self._read_fused(name, plan, stored, work)
        up, down, scale, alpha, keys = self._factors(plan, work)
        return LoraModule(name, up, down, scale, plan.rank, alpha, plan.weight_shape, plan.kind, keys, stored)

    def _read_fused(self, name: str, plan: ModulePlan, stored: torch.dtype, work: torch.dtype) -> LoraModule:
        parts, keys = [], ()
        for part, rows in self._fused[name]:
            up, down, scale, _, part_keys = self._factors(part, work)
            parts.append((up, down, scale, rows))
            keys += part_keys
        up, down, scale = fuse(plan.d_out, parts)
        # alpha/rank = scale keeps kohya's reading of the fused module
        return LoraModule(name, up, down, scale, plan.rank, scale * plan.rank, plan.weight_shape,
                          plan.kind, keys, stored)

    def __iter__(self) -> Iterator[LoraModule]:
        for name in self._plans:
            yield self.read(name)

    def load(self) -> LoraFile:
        lora = LoraFile(self.path, self.format, self.family, {}, dict(self.metadata),
                        dict(self.extras), list(self.warnings))
        dead = []
        with linalg_threads(1):
            for name in self._plans:
                module = lora.modules[name] = self._read(name)
                if self._dead(name, module):
                    dead.append(name)
        if dead:
            lora.warnings.append(f"{len(dead)} module(s) have an all-zero factor (ΔW = 0): {_listing(dead)}")
        return lora

    def _dead(self, name: str, module: LoraModule) -> bool:
        """An all-zero factor. A plain LoRA's factors are the tensors read,
        whose extremes the finite check already saw: no second pass."""
        plan = self._plans[name]
        if self._plain(plan, name):
            return plan.keys["up"] in self.source.zero_keys or plan.keys["down"] in self.source.zero_keys
        return is_all_zero(module.up) or is_all_zero(module.down)

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "LoraReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- PEFT alpha from metadata ------------------------------------------------

def _peft_configs(metadata: dict[str, str], path: str) -> dict[str, dict]:
    """Component ('' = all) -> PEFT LoraConfig fields, from diffusers'
    ``lora_adapter_metadata`` or an ``adapter_config.json`` beside the file."""
    configs: dict[str, dict] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if isinstance(data, dict):
            for key, value in data.items():
                comp, dot, field = key.partition(".")
                if dot and comp in _COMPONENTS:
                    configs.setdefault(comp, {})[field] = value
                else:
                    configs.setdefault("", {})[key] = value
    sidecar = os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json")
    if not configs and os.path.isfile(sidecar):
        try:
            with open(sidecar, encoding="utf-8") as fh:
                data = json.load(fh)
            if isinstance(data, dict):
                configs[""] = data
        except (OSError, ValueError):
            pass
    return configs


def _peft_alpha(configs: dict[str, dict], module_key: str, rank: int) -> tuple[float, float] | None:
    comp = module_key.split(".", 1)[0]
    cfg = configs.get(comp) if comp in _COMPONENTS else None
    cfg = cfg or configs.get("")
    if not cfg:
        return None
    target = module_key.split(".", 1)[1] if comp in _COMPONENTS else module_key
    target = target.removeprefix("base_model.model.")
    alpha = cfg.get("lora_alpha")
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", target):
                alpha = value
                break
        except re.error:
            continue
    if alpha is None:
        return None
    alpha = float(alpha)
    divisor = math.sqrt(rank) if cfg.get("use_rslora") else rank
    return alpha, alpha / divisor


def open_lora(path: str) -> LoraReader:
    """Open a LoRA for module-by-module reading (names and shapes checked now)."""
    with errors_name_the_file(path):
        return LoraReader(path)


def load_lora(path: str, lazy: bool = False) -> LoraFile:
    """Read a whole LoRA file of any supported format (decided by content).
    ``lazy``: names and shapes now, each module's tensors when it is accessed
    (core.formats.lazy), from a file that stays open."""
    if lazy:
        from .lazy import LazyModules
        reader = open_lora(path)
        return LoraFile(reader.path, reader.format, reader.family, LazyModules(reader), dict(reader.metadata),
                        dict(reader.extras), list(reader.warnings))
    with errors_name_the_file(path), open_lora(path) as reader:
        return reader.load()


def require_same_family(loras: list[LoraFile]) -> str:
    """The common family of ``loras``; LoraError naming both files when two
    differ. 'unknown' matches anything (nothing to compare)."""
    first: LoraFile | None = None
    for lora in loras:
        if lora.family == "unknown":
            continue
        if first is None:
            first = lora
        elif lora.family != first.family:
            raise LoraError(f"{first.name} is for {first.family_label} but {lora.name} is for "
                            f"{lora.family_label}; LoRAs of different base models cannot be combined",
                            lora.path)
    return first.family if first is not None else "unknown"


def require_same_base(loras: list[LoraFile]) -> str:
    """require_same_family, plus: every module two LoRAs share has one shape.
    A shape difference gives different bases away even when the family is
    unknown; the LoraError names the file and the module."""
    family = require_same_family(loras)
    seen: dict[str, tuple[LoraFile, tuple[int, int]]] = {}
    for lora in loras:
        for name in lora.modules:
            shape = _flat_shape(lora, name)
            first, first_shape = seen.setdefault(name, (lora, shape))
            if first_shape != shape:
                raise LoraError(f"module has different shapes across the LoRAs ({shape[0]}×{shape[1]} here, "
                                f"{first_shape[0]}×{first_shape[1]} in {first.name}): they are for different "
                                "base models", lora.path, name)
    return family


def _flat_shape(lora: LoraFile, name: str) -> tuple[int, int]:
    """(d_out, d_in) of a module, without reading a lazily loaded one."""
    from .lazy import LazyModules
    if isinstance(lora.modules, LazyModules):
        return lora.modules.flat_shape(name)
    m = lora.modules[name]
    return m.d_out, m.d_in
