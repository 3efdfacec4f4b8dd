"""How many CPU threads torch uses in the long-running federated processes."""

from __future__ import annotations

import os

import torch

SMALL_UNET = 20_000_000  # parameters; the tiny base has 2.4 M


def limit_threads(base) -> int:
    """One thread for small models on CPU, else torch's default; MOS_TORCH_THREADS overrides.

    A toy UNet gains nothing from a second thread, and when parties share a machine (the one-machine demo,
    the tests) spinning OpenMP threads slow every process down by an order of magnitude.
    """
    env = os.environ.get("MOS_TORCH_THREADS")
    if env:
        n = max(1, int(env))
    elif base.device.type == "cpu" and sum(p.numel() for p in base.unet.parameters()) < SMALL_UNET:
        n = 1
    else:
        return torch.get_num_threads()
    torch.set_num_threads(n)
    return n
