"""`mos`: every capability on one machine, without a server.

Each subcommand lives beside the code it drives and registers itself here through `register(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> module that implements it (imported only when that subcommand runs, so `mos --help` is quick)
COMMANDS = {
    "base": ("mos.shared.cli_base", "inspect base models: info, tokenize"),
    "tune": ("mos.client.cli_tune", "tune one concept's ED-LoRA"),
    "sample": ("mos.shared.cli_sample", "draw images with concepts (and regions)"),
    "fuse": ("mos.server.cli_fuse", "fuse concepts' adapters on one machine"),
    "eval": ("mos.client.cli_eval", "measure fused models"),
    "export": ("mos.shared.cli_export", "export a fused adapter for diffusers, A1111, ComfyUI"),
    "import-lora": ("mos.client.import_lora", "turn a plain (kohya / diffusers) LoRA into a concept for fusion"),
}


def setup_environment() -> None:
    """No network, no telemetry, no library chatter: set before torch/transformers/flwr import."""
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                 "DIFFUSERS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                 "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def main(argv: list[str] | None = None) -> int:
    setup_environment()
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mos", description="Mix-of-Show: ED-LoRA concepts, gradient fusion, "
                                     "regional sampling. The federated service is mos-server / mos-client.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if argv and argv[0] == name:
            try:
                importlib.import_module(module).register(sub)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
                parser.error(f"`mos {name}` is not available in this build")
        else:
            sub.add_parser(name, help=help_text, add_help=False)
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
