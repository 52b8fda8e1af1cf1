"""`python -m core convert IN OUT`: any readable LoRA → kohya-named safetensors."""
from __future__ import annotations

from ..conversion import carried_metadata, kohya_ready
from ..save import DTYPES, check_outputs, save_kohya
from ..sdarch import TABLE_FAMILIES

HELP = ("Write any readable LoRA (kohya, diffusers, PEFT, ComfyUI, cloneofsimo, LyCORIS LoHa/LoKr) "
        "as a kohya-named .safetensors that ComfyUI's LoraLoader applies as is.")


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="LoRA file in any supported format")
    parser.add_argument("output", metavar="OUT", help="kohya .safetensors to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                        help="factor dtype (default: as stored; LoHa/LoKr products as fp32)")


def run(args) -> int:
    from ..formats import load_lora

    check_outputs({"OUT": args.output}, [args.input], args.overwrite, {"OUT": (".safetensors",)})
    lora = load_lora(args.input)
    dtype = DTYPES[args.dtype] if args.dtype else None
    path = save_kohya(kohya_ready(lora, dtype), args.output, dtype, args.overwrite, carried_metadata(lora))
    parts = ", ".join(f"{k} {v}" for k, v in lora.parts().items())
    print(f"wrote {path}: {len(lora.modules)} modules ({parts}), {lora.family_label}, from {lora.format}")
    if lora.family not in TABLE_FAMILIES:
        print(f"note: {lora.family_label} has no module table here; names were written kohya-style "
              "as found and are not checked against the model")
    for warning in lora.warnings:
        print(f"note: {warning}")
    if lora.extras:
        print(f"note: {len(lora.extras)} non-LoRA tensor(s) were not written (see `inspect`)")
    return 0
