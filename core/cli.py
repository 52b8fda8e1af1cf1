"""`python -m core <command>`: one sub-module per command under core/commands.

Each command module defines HELP, add_arguments(parser) and run(args) -> int.
User errors (LoraError) print one line and exit 2; no tracebacks.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import LoraError

COMMANDS = ("inspect", "convert", "similarity", "kernel", "merge", "demo")


def _prog() -> str:
    """'grassmann-lora' when run as the installed command, else 'python -m core'."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name and name not in ("__main__.py", "-c") else "python -m core"


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog=_prog(),
                                     description="Grassmann LoRA: inspect, compare and merge LoRAs "
                                                 "on the Grassmann manifold.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"{__package__}.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(f"commands.{name}"):
                continue  # command not built yet
            raise
        modules[name] = mod
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except LoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
