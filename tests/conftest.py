"""Shared fixtures. Tests import the installed `mos` package (never the source folders by path)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from mos.shared.runtime import setup_environment

# One cache of built bases for the whole run (the tiny base takes seconds to build); subprocesses inherit it.
os.environ.setdefault("MOS_HOME", tempfile.mkdtemp(prefix="mos-test-home-"))
setup_environment()
# Tiny models gain nothing from a second thread, and servers + clients started by tests share 2 cores:
# oversubscribed threads made them 20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)  # tiny models: 1 thread is as fast, and far faster when the machine is busy

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def run_cli(*args: str, check: bool = True, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an installed console script (mos, mos-server, mos-client) as a user would."""
    exe = Path(sys.executable).parent / args[0]
    proc = subprocess.run([str(exe), *args[1:]], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_base():
    """A loaded tiny base. Tests that mutate it (LoRA, processors) must use `fresh_base` instead."""
    from mos.shared.sd.base import load_base

    return load_base("tiny")


@pytest.fixture
def fresh_base():
    from mos.shared.sd.base import load_base

    return load_base("tiny")


def random_adapter(base, name: str, class_word: str, seed: int, scale: float = 0.1, rank: int = 4,
                   placement: str = "attention"):
    """A concept adapter with random LoRA on every target layer of `placement` and perturbed class-word
    embeddings."""
    import copy

    from mos.shared.formats.adapter import Adapter
    from mos.shared.sd.concepts import Concept
    from mos.shared.sd.model import ConceptModel
    from mos.shared.sd.sites import input_sites

    g = torch.Generator().manual_seed(seed)
    model = ConceptModel(copy.deepcopy(base))
    emb = model.prompts.init_embeddings(class_word, g)
    emb = emb + 0.05 * torch.randn(emb.shape, generator=g)
    lora = {}
    for site in input_sites(base.text_encoder, base.unet, placement):
        for layer, out_dim in zip(site.layers, site.out_dims):
            lora[layer] = (scale * torch.randn(out_dim, rank, generator=g),
                           torch.randn(rank, site.dim, generator=g) / site.dim ** 0.5)
    return Adapter(base.fingerprint, [Concept(name, class_word, emb)], lora)
