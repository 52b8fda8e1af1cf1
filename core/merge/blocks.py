"""Block weights in a merge: per source, a factor per block, applied to that
source's weight in every module of the block (exact: module scaling), so
"take these blocks from A, those from B" is A at 1 where B is at 0 and back.

A source's spec is one of
- an LBW preset name (sd-webui-lora-block-weight's defaults: NONE, ALL, INS,
  IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5 — 17 values);
- comma-separated values in LBW's block order: SD1.x/SD2.x 17 or 26 values,
  SDXL 12 or 20 (kohya's --lbws uses the same lists);
- label=value pairs, for any family: LBW block IDs (BASE, IN00…, M00, OUT00…)
  or the block-group labels of the family's table (core.arch / core.sdarch
  Arch.groups, e.g. "down1 attn1"); modules not named keep 1.
Blocks follow LBW: BASE = the text encoders, INnn/M00/OUTnn = the UNet's
input/middle/output blocks (diffusers names map as kohya converts them:
down_blocks_i.{attentions,resnets}_j -> IN(3i+j+1), downsamplers -> IN(3i+3),
up_blocks_i.*_j -> OUT(3i+j), upsamplers -> OUT(3i+2), conv_in -> IN00);
modules in none of them (time embedding, conv_out) keep 1, as in LBW.
"""
from __future__ import annotations

import math
import re

from ..errors import LoraError

BLOCKID26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
BLOCKID17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
             "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
BLOCKID12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
BLOCKID20 = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
LISTS = {"sd1": (BLOCKID17, BLOCKID26), "sd2": (BLOCKID17, BLOCKID26), "sdxl": (BLOCKID12, BLOCKID20)}
PRESETS = {     # sd-webui-lora-block-weight's default lbwpresets (17 values)
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
SPEC_HELP = (f"an LBW preset ({', '.join(PRESETS)}), LBW values in block order (SD1/SD2 17 or 26, SDXL 12 or "
             "20) or label=value pairs (IN04=0,M00=0.5, or the family's block groups); scales that LoRA's weight "
             "per block, blocks not named keep 1")
_DIFFUSERS = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)(?:_(\d+))?")
_LDM = re.compile(r"lora_unet_(input|output)_blocks_(\d+)_")


def spec_lines(text: str, n: int) -> list[str | None] | None:
    """Block weights typed one line per LoRA (the node's and the WebUI tab's box) as merge()
    takes them; an empty or '-' line: none for that LoRA; all empty: None."""
    lines = [line.strip() for line in (text or "").rstrip().splitlines()]    # a leading empty line counts
    if not any(lines):
        return None
    lines += [""] * max(0, n - len(lines))
    return [None if x in ("", "-") else x for x in lines]


def lbw_block(name: str) -> str | None:
    """The LBW block ID of a kohya module name, or None when it is in no block."""
    if name.startswith("lora_te"):
        return "BASE"
    if name.startswith(("lora_unet_mid_block", "lora_unet_middle_block")):
        return "M00"
    if name.startswith("lora_unet_conv_in"):
        return "IN00"
    m = _LDM.match(name)
    if m:
        return f"{'IN' if m[1] == 'input' else 'OUT'}{int(m[2]):02d}"
    m = _DIFFUSERS.match(name)
    if not m:
        return None
    i = int(m[2])
    if m[3] == "downsamplers":
        return f"IN{3 * i + 3:02d}"
    if m[3] == "upsamplers":
        return f"OUT{3 * i + 2:02d}"
    j = int(m[4])
    return f"IN{3 * i + j + 1:02d}" if m[1] == "down" else f"OUT{3 * i + j:02d}"


def _number(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoraError(f"block weight '{text}' in '{spec}' is not a number") from None
    if not math.isfinite(value):
        raise LoraError(f"block weight '{text}' in '{spec}' is not a finite number")
    return value


def parse_spec(spec: str, family: str, groups: dict[str, str]) -> dict[str, float]:
    """One source's spec -> {LBW block ID or group label: factor}; see the module docstring."""
    text = spec.strip()
    text = PRESETS.get(text.upper(), text)
    if "=" in text:
        known = set(BLOCKID26) | set(groups.values())
        out = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            key = key.strip()
            if key.upper() in BLOCKID26:
                key = key.upper()
            elif key not in known:
                raise LoraError(f"unknown block '{key}' in block weights '{spec}' (LBW IDs such as IN04, M00, "
                                f"OUT03, or this family's groups: {', '.join(sorted(set(groups.values()))) or '-'})")
            if key in out:
                raise LoraError(f"block {key} is given twice in block weights '{spec}'")
            out[key] = _number(value.strip(), spec)
        return out
    if "," not in text and not re.fullmatch(r"[-+0-9.eE]+", text):
        raise LoraError(f"unknown block-weight preset '{spec}' (presets: {', '.join(PRESETS)})")
    values = [_number(v.strip(), spec) for v in text.split(",")]
    lists = LISTS.get(family)
    if lists is None:
        raise LoraError(f"block weights for {family} take label=value pairs over its block groups, not a list "
                        f"of {len(values)} values (or an unknown preset '{spec}')")
    for ids in lists:
        if len(values) == len(ids):
            return dict(zip(ids, values))
    sizes = " or ".join(str(len(x)) for x in lists)
    raise LoraError(f"block weights '{spec}' have {len(values)} values; LBW takes {sizes} for {family}")


def block_factors(specs: list[str | None], names, family: str, groups: dict[str, str]
                  ) -> list[dict[str, float]]:
    """Per source {module name: factor ≠ 1} for the modules the specs touch (a missing spec: all 1)."""
    out = []
    for spec in specs:
        factors: dict[str, float] = {}
        if spec is not None and spec.strip():
            table = parse_spec(spec, family, groups)
            used = set()
            for name in names:
                key = lbw_block(name)
                key = key if key in table else groups.get(name, "")
                if key in table:
                    used.add(key)
                    if table[key] != 1:
                        factors[name] = table[key]
            unused = [key for key in table if key not in used]
            if unused and "=" in spec:      # named by hand (a list or preset covers every block)
                raise LoraError(f"block '{unused[0]}' in block weights '{spec}' matches no module of these "
                                f"LoRAs ({len(unused)} such); their blocks and groups: "
                                f"{', '.join(sorted(_present(names, groups))) or '-'}")
        out.append(factors)
    return out


def _present(names, groups: dict[str, str]) -> set[str]:
    """The LBW blocks and family groups the modules `names` fall in."""
    return {x for name in names for x in (lbw_block(name), groups.get(name)) if x}
