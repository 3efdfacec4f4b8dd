"""How the project's processes run: offline, quiet, on few CPU threads, with time-stamped progress lines."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

SMALL_UNET = 20_000_000  # parameters; the tiny base has 2.4 M

# Nothing is fetched at run time and nothing phones home: every process (and every Flower subprocess) gets these.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "DIFFUSERS_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


def setup_environment() -> None:
    """Set OFFLINE_ENV (where the user has not) before torch, transformers or flwr are imported."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def say(msg: str, stream: TextIO | None = None) -> None:
    """One progress line, time-stamped, flushed at once (logs of parties that share a terminal interleave)."""
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=stream or sys.stdout, flush=True)


def limit_threads(base) -> int:
    """One thread for small models on CPU, else torch's default; MOS_TORCH_THREADS overrides.

    A toy UNet gains nothing from a second thread, and when parties share a machine (the one-machine demo,
    the tests) spinning OpenMP threads slow every process down by an order of magnitude.
    """
    import torch

    env = os.environ.get("MOS_TORCH_THREADS")
    if env:
        n = max(1, int(env))
    elif base.device.type == "cpu" and sum(p.numel() for p in base.unet.parameters()) < SMALL_UNET:
        n = 1
    else:
        return torch.get_num_threads()
    torch.set_num_threads(n)
    return n


def lazy_exports(package: str, exports: dict[str, str]):
    """(__getattr__, __all__) for a package's __init__: each public name is imported from its module on first
    use, so `import mos.shared.runtime` (what every CLI does first) does not load torch. A value "module:attr"
    exports `attr` of `module` under the key's name."""
    import importlib

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = exports[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)

    return __getattr__, sorted(exports)
