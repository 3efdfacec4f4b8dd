"""`mos`: every capability on one machine, without a server.

Subcommands are found through the `mos.commands` entry points (pyproject.toml), so this dispatcher knows no
package above it: each command module has `HELP` (one line) and `register(subparsers)`, which adds its parser and
sets `run`. Only the chosen command's module is imported, so `mos --help` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from mos.shared.runtime import setup_environment


def commands() -> dict[str, str]:
    """Subcommand name -> module, from the installed package's entry points."""
    return {ep.name: ep.value for ep in sorted(entry_points(group="mos.commands"), key=lambda e: e.name)}


def main(argv: list[str] | None = None) -> int:
    setup_environment()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mos", description="Mix-of-Show: ED-LoRA concepts, gradient fusion, "
                                     "regional sampling. The federated service is mos-server / mos-client.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in commands().items():
        if argv and argv[0] == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=getattr(importlib.import_module(module), "HELP", None), add_help=False)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"mos {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
