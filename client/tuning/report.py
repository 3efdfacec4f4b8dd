"""What a tuning run leaves for a person to look at: the loss curve and before/after samples."""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path
from typing import Iterator

import matplotlib

matplotlib.use("Agg")  # files only; never a window (and no display on servers)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mos.client.tuning.edlora import Trainer  # noqa: E402
from mos.shared.files import atomic_path  # noqa: E402
from mos.shared.sampling.denoise import sample  # noqa: E402


def save_figure(fig, path: Path) -> None:
    try:
        with atomic_path(path, 0o644) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def plot_loss(losses: list[float], path: Path, frozen_at: int | None = None) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(1, len(losses) + 1)
    ax.plot(x, losses, lw=0.6, alpha=0.35, label="step")
    window = max(1, len(losses) // 20)
    if len(losses) >= 2 * window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(x[window - 1:], smooth, lw=1.6, label=f"mean of {window}")
    if frozen_at is not None:
        ax.axvline(frozen_at, color="grey", ls="--", lw=1, label="embeddings frozen")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


@contextlib.contextmanager
def initial_state(trainer: Trainer) -> Iterator[None]:
    """The model as tuning started it (initial embeddings, LoRA B = 0) while inside; the tuned one after."""
    saved = {n: p.detach().clone() for n, p in trainer.named_parameters().items()}
    with torch.no_grad():
        trainer.embedding.copy_(trainer.concept.embeddings)
        for _, B in trainer.lora.values():
            B.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in trainer.named_parameters().items():
                p.copy_(saved[n])


def draw(trainer: Trainer, prompts: list[str], seed: int, steps: int) -> list:
    with torch.no_grad(), trainer.autocast():
        return sample(trainer.model, prompts, seed=seed, steps=steps, progress=False)


def sample_grid(trainer: Trainer, prompts: list[str], path: Path, seed: int = 0, steps: int = 20) -> None:
    """Rows: before tuning, after tuning; columns: prompts (same seeds in both rows)."""
    with initial_state(trainer):
        before = draw(trainer, prompts, seed, steps)
    after = draw(trainer, prompts, seed, steps)
    n = len(prompts)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.8), squeeze=False)
    for j, prompt in enumerate(prompts):
        for i, (row, img) in enumerate((("before", before[j]), ("after", after[j]))):
            ax = axes[i][j]
            ax.imshow(np.asarray(img), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(row)
            if i == 0:
                ax.set_title("\n".join(textwrap.wrap(prompt, 28)), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
