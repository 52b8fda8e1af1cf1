"""Module names and shapes of the networks LoRAs target (the SD UNets here,
DiT families in ``core.arch``).

One table per family maps every adaptable module's canonical kohya name to its
base weight shape, plus aliases (diffusers dotted paths, original-LDM paths,
either with dots or underscores) that different LoRA formats use for the same
layer. Canonical naming follows what kohya sd-scripts writes and ComfyUI maps:
diffusers paths for SD1.x/SD2.x UNets, original LDM paths for the SDXL UNet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .arch import FAMILY_MODULES


@dataclass
class Arch:
    family: str
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # canonical -> weight shape
    aliases: dict[str, str] = field(default_factory=dict)             # any spelling -> canonical
    # canonical module name -> block group label used in reports
    groups: dict[str, str] = field(default_factory=dict)
    order: dict[str, int] = field(default_factory=dict)               # depth order for plots
    variant: str | None = None
    # Split layouts: a module that the original model fuses (Flux img_attn.qkv)
    # and diffusers splits (to_q, to_k, to_v). spelling of a part -> its
    # placements (fused canonical, row_start, row_end, first row of the part).
    splits: dict[str, list[tuple[str, int, int, int]]] = field(default_factory=dict)
    # fused canonical -> [(dotted part alias, row_start, row_end, first part row)]
    split_parts: dict[str, list[tuple[str, int, int, int]]] = field(default_factory=dict)

    def add(self, canonical: str, shape: tuple[int, ...], group: str, *dotted_aliases: str):
        self.order.setdefault(canonical, len(self.order))
        self.shapes[canonical] = shape
        self.groups[canonical] = group
        self.aliases[canonical] = canonical
        for dotted in dotted_aliases:
            self.aliases[dotted] = canonical
            self.aliases[dotted.replace(".", "_")] = canonical

    def add_split(self, canonical: str, shape: tuple[int, ...], group: str,
                  parts: list[tuple], *dotted_aliases: str):
        """A fused module and the split modules other layouts use for it.

        ``parts``: (dotted alias, row_start, row_end[, part_row]) — rows
        row_start:row_end of the fused weight are rows part_row:part_row +
        (row_end - row_start) of the split module (part_row 0 unless one split
        module lands in several places, e.g. a scale/shift swap)."""
        self.add(canonical, shape, group, *dotted_aliases)
        for part in parts:
            alias, start, end, first = (*part, 0) if len(part) == 3 else part
            if not 0 <= start < end <= shape[0]:
                raise ValueError(f"{alias}: rows {start}:{end} outside {canonical} {shape}")
            self.split_parts.setdefault(canonical, []).append((alias, start, end, first))
            for spelling in {alias, alias.replace(".", "_")}:
                self.splits.setdefault(spelling, []).append((canonical, start, end, first))

    def canonical(self, name: str) -> str | None:
        return self.aliases.get(name)

    def split_of(self, name: str) -> tuple[str, tuple[tuple[int, int, int], ...]] | None:
        """(fused canonical, ((row_start, row_end, part_row), …)) for a split part's spelling."""
        hits = self.splits.get(name)
        if not hits:
            return None
        return hits[0][0], tuple((s, e, f) for _, s, e, f in hits)

    def absorb(self, other: "Arch") -> None:
        """Add the modules of ``other`` this table lacks (a union of variants)."""
        for name, shape in other.shapes.items():
            if name in self.shapes:
                continue
            self.order.setdefault(name, len(self.order))
            self.shapes[name] = shape
            self.groups[name] = other.groups[name]
        for spelling, canonical in other.aliases.items():
            self.aliases.setdefault(spelling, canonical)
        for spelling, hits in other.splits.items():
            self.splits.setdefault(spelling, hits)
        for canonical, parts in other.split_parts.items():
            self.split_parts.setdefault(canonical, parts)


def _transformer(arch: Arch, ck: str, dif: str | None, ldm: str | None, c: int, ctx: int,
                 depth: int, linear_proj: bool, group: str, prefix: str):
    """A Transformer2D block: proj_in/out and `depth` basic transformer blocks."""
    proj = (c, c) if linear_proj else (c, c, 1, 1)

    def add(sub: str, shape, g):
        names = [p + "." + sub for p in (dif, ldm) if p]
        arch.add(prefix + (ck + "." + sub).replace(".", "_"), shape, g, *names)

    add("proj_in", proj, group + " proj")
    for t in range(depth):
        tb = f"transformer_blocks.{t}"
        for attn, kv_in in (("attn1", c), ("attn2", ctx)):
            add(f"{tb}.{attn}.to_q", (c, c), f"{group} {attn}")
            add(f"{tb}.{attn}.to_k", (c, kv_in), f"{group} {attn}")
            add(f"{tb}.{attn}.to_v", (c, kv_in), f"{group} {attn}")
            add(f"{tb}.{attn}.to_out.0", (c, c), f"{group} {attn}")
        add(f"{tb}.ff.net.0.proj", (8 * c, c), f"{group} ff")
        add(f"{tb}.ff.net.2", (c, 4 * c), f"{group} ff")
    add("proj_out", proj, group + " proj")


def _resnet(arch: Arch, ck: str, dif: str, ldm: str, c_in: int, c_out: int, group: str,
            prefix: str, temb: int):
    parts = [("conv1", "in_layers.2", (c_out, c_in, 3, 3)),
             ("time_emb_proj", "emb_layers.1", (c_out, temb)),
             ("conv2", "out_layers.3", (c_out, c_out, 3, 3))]
    if c_in != c_out:
        parts.append(("conv_shortcut", "skip_connection", (c_out, c_in, 1, 1)))
    for dname, lname, shape in parts:
        canon_path = f"{ck}.{dname}" if ck == dif else f"{ck}.{lname}"
        arch.add(prefix + canon_path.replace(".", "_"), shape, group + " resnet",
                 f"{dif}.{dname}", f"{ldm}.{lname}")


def _unet(arch: Arch, channels: list[int], attn: list[bool], depth: list[int], ctx: int,
          linear_proj: bool, canonical_ldm: bool):
    """Build UNet tables for SD1/SD2 (4 levels) and SDXL (3 levels).

    LDM numbering: input_blocks.(3b+j+1) for level b, resnet j; downsampler at
    input_blocks.3(b+1).0.op; output_blocks.(3b+j) for up level b;
    upsampler at output_blocks.(3b+2).{1|2}.conv.
    """
    prefix = "lora_unet_"
    temb = channels[0] * 4
    levels = len(channels)
    skips = [channels[0]]
    ch = channels[0]
    for b in range(levels):
        out = channels[b]
        for j in range(2):
            dif, ldm = f"down_blocks.{b}.resnets.{j}", f"input_blocks.{3 * b + j + 1}.0"
            _resnet(arch, ldm if canonical_ldm else dif, dif, ldm, ch, out, f"down{b}", prefix, temb)
            ch = out
            if attn[b]:
                dif_a, ldm_a = f"down_blocks.{b}.attentions.{j}", f"input_blocks.{3 * b + j + 1}.1"
                _transformer(arch, ldm_a if canonical_ldm else dif_a, dif_a, ldm_a, ch, ctx,
                             depth[b], linear_proj, f"down{b}", prefix)
            skips.append(ch)
        if b < levels - 1:
            dif, ldm = f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{3 * (b + 1)}.0.op"
            arch.add(prefix + (ldm if canonical_ldm else dif).replace(".", "_"), (ch, ch, 3, 3),
                     f"down{b} sampler", dif, ldm)
            skips.append(ch)
    # middle
    mid_depth = depth[-1]
    for j, ldm_idx in ((0, 0), (1, 2)):
        dif, ldm = f"mid_block.resnets.{j}", f"middle_block.{ldm_idx}"
        _resnet(arch, ldm if canonical_ldm else dif, dif, ldm, ch, ch, "mid", prefix, temb)
        if j == 0:
            _transformer(arch, "middle_block.1" if canonical_ldm else "mid_block.attentions.0",
                         "mid_block.attentions.0", "middle_block.1", ch, ctx, mid_depth,
                         linear_proj, "mid", prefix)
    # up path: up level u corresponds to down level b = levels-1-u
    for u in range(levels):
        b = levels - 1 - u
        out = channels[b]
        for j in range(3):
            skip = skips.pop()
            dif, ldm = f"up_blocks.{u}.resnets.{j}", f"output_blocks.{3 * u + j}.0"
            _resnet(arch, ldm if canonical_ldm else dif, dif, ldm, ch + skip, out, f"up{u}", prefix, temb)
            ch = out
            if attn[b]:
                dif_a, ldm_a = f"up_blocks.{u}.attentions.{j}", f"output_blocks.{3 * u + j}.1"
                _transformer(arch, ldm_a if canonical_ldm else dif_a, dif_a, ldm_a, ch, ctx,
                             depth[b], linear_proj, f"up{u}", prefix)
        if u < levels - 1:
            dif = f"up_blocks.{u}.upsamplers.0.conv"
            ldm = f"output_blocks.{3 * u + 2}.{2 if attn[b] else 1}.conv"
            arch.add(prefix + (ldm if canonical_ldm else dif).replace(".", "_"), (ch, ch, 3, 3),
                     f"up{u} sampler", dif, ldm)


def _text_encoder(arch: Arch, prefix: str, layers: int, width: int, mlp: int, label: str,
                  comfy_name: str):
    for i in range(layers):
        base = f"text_model.encoder.layers.{i}"
        for sub, shape in (("self_attn.q_proj", (width, width)), ("self_attn.k_proj", (width, width)),
                           ("self_attn.v_proj", (width, width)), ("self_attn.out_proj", (width, width)),
                           ("mlp.fc1", (mlp, width)), ("mlp.fc2", (width, mlp))):
            path = f"{base}.{sub}"
            kind = "attn" if sub.startswith("self_attn") else "mlp"
            arch.add(prefix + path.replace(".", "_"), shape, f"{label} {kind}",
                     path, f"{comfy_name}.transformer.{path}")


def arch_for(family: str, variant: str | None = None) -> Arch:
    """The module table of a family (the union of its variants when ``variant``
    is None). SD1/SD2/SDXL are built here, DiT families in ``core.arch``."""
    if family in DIT_FAMILIES:
        from . import arch
        return arch.build(family, variant)
    return _unet_arch(family)


@lru_cache(maxsize=None)
def _unet_arch(family: str) -> Arch:
    arch = Arch(family)
    if family == "sd1":
        _unet(arch, [320, 640, 1280, 1280], [True, True, True, False], [1, 1, 1, 1], 768,
              linear_proj=False, canonical_ldm=False)
        _text_encoder(arch, "lora_te_", 12, 768, 3072, "te", "clip_l")
    elif family == "sd2":
        _unet(arch, [320, 640, 1280, 1280], [True, True, True, False], [1, 1, 1, 1], 1024,
              linear_proj=True, canonical_ldm=False)
        _text_encoder(arch, "lora_te_", 23, 1024, 4096, "te", "clip_h")
    elif family == "sdxl":
        _unet(arch, [320, 640, 1280], [False, True, True], [0, 2, 10], 2048,
              linear_proj=True, canonical_ldm=True)
        _text_encoder(arch, "lora_te1_", 12, 768, 3072, "te1", "clip_l")
        _text_encoder(arch, "lora_te2_", 32, 1280, 5120, "te2", "clip_g")
    else:
        raise KeyError(f"no architecture table for family '{family}'")
    return arch


DIT_FAMILIES = tuple(FAMILY_MODULES)
TABLE_FAMILIES = ("sd1", "sd2", "sdxl", *DIT_FAMILIES)


def attention_modules(family: str, text_encoder: bool = True) -> list[str]:
    """The modules a standard kohya 'LoRA' (not LoCon) targets, in depth order."""
    arch = arch_for(family)
    names = []
    for name in arch.shapes:
        g = arch.groups[name]
        if name.startswith("lora_unet_"):
            if g.endswith(("attn1", "attn2", "ff", "proj")):
                names.append(name)
        elif text_encoder:
            names.append(name)
    return names
