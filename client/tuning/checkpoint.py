"""Tuning checkpoints: one safetensors file, replaced atomically, so an interrupted run leaves the last good one.

Tensors: `param/<name>` (embedding and raw LoRA A/B), `adam/<name>/exp_avg`, `adam/<name>/exp_avg_sq`.
The header's `mos-checkpoint` metadata (JSON) holds the step, Adam's step counts, the frozen flag, the grad
scaler, the loss history and the run's key (config, data digest, base fingerprint). The learning rate follows from
the step and data order and noise from (seed, step), so this is the whole state of a run. No pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mos.client.tuning.edlora import Trainer
from mos.shared.files import save_tensors

FILENAME = "checkpoint.safetensors"
FORMAT = "mos-tune-checkpoint/1"


def save(trainer: Trainer, step: int, path: Path, key: dict[str, Any]) -> None:
    named = trainer.named_parameters()
    tensors, adam_steps = {}, {}
    for name, p in named.items():
        tensors[f"param/{name}"] = p.detach().float().cpu().contiguous()
        st = trainer.optimizer.state.get(p)
        if st:
            tensors[f"adam/{name}/exp_avg"] = st["exp_avg"].detach().float().cpu().contiguous()
            tensors[f"adam/{name}/exp_avg_sq"] = st["exp_avg_sq"].detach().float().cpu().contiguous()
            adam_steps[name] = float(st["step"])
    meta = {"format": FORMAT, "step": step, "key": key, "adam_steps": adam_steps,
            "embedding_frozen_at": trainer.embedding_frozen_at if trainer.embedding_frozen else None,
            "losses": trainer.losses[:step],
            "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None}
    save_tensors(tensors, path, {"mos-checkpoint": json.dumps(meta)})


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mos-checkpoint", "null") or "null")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to start over") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tuning checkpoint of this version; delete it to start over")
    return tensors, meta


def restore(trainer: Trainer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    """Put a checkpoint's state into a freshly made trainer; returns the step to continue from."""
    named = trainer.named_parameters()
    missing = [n for n in named if f"param/{n}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) this model tunes (e.g. {missing[0]}); "
                         "it was made with another base or rank")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[f"param/{name}"])
    state_dict = trainer.optimizer.state_dict()
    order = [p for grp in trainer.optimizer.param_groups for p in grp["params"]]
    index = {id(p): i for i, p in enumerate(order)}
    state = {}
    for name, p in named.items():
        if name in meta["adam_steps"]:
            state[index[id(p)]] = {"step": torch.tensor(meta["adam_steps"][name]),
                                   "exp_avg": tensors[f"adam/{name}/exp_avg"],
                                   "exp_avg_sq": tensors[f"adam/{name}/exp_avg_sq"]}
    state_dict["state"] = state
    trainer.optimizer.load_state_dict(state_dict)
    if meta.get("scaler") and trainer.scaler.is_enabled():
        trainer.scaler.load_state_dict(meta["scaler"])
    if meta["embedding_frozen_at"] is not None:
        trainer.freeze_embedding(int(meta["embedding_frozen_at"]))
    trainer.losses = list(meta["losses"])
    return int(meta["step"])
