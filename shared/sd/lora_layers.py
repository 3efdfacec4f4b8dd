"""peft's LoRA layers, applying W0 + s·B@A as one weight where that costs fewer multiply-adds.

peft applies a LoRA as W0·x + s·B(A·x): two extra products over the layer's n input rows. On a layer only a few
times wider than the rank (the toy bases' 32-64-wide layers at rank 16; any layer of a full-rank fused adapter) it
is cheaper to form W = W0 + s·B@A once per call (peft's own `get_delta_weight` for a linear layer, one product
over unfolded patches for a convolution) and apply that. Per call, with h = d_in·d_out / (d_in + d_out):

- no gradient: the two products cost n·r·(d_in + d_out), forming W costs r·d_in·d_out: merge when h < n;
- tuning: the products and their backward cost 3·n·r·(d_in + d_out); merging adds the weight's gradient
  (n·d_in·d_out) and the chain back to A and B (3·r·d_in·d_out): merge when h < 3·n·r / (n + 3·r).

The two forms are the same function (to float rounding) with the same gradients for A and B. Measured on the
world base (`bench/lora_forward.py`, one core), the merged form makes an ED-LoRA step about 15 % cheaper and a
denoiser call about 12 %; on SD1.5 at rank 4 (h ≥ 160 against 3r = 12) tuning keeps peft's form. Anything peft's plain form does not cover (dropout,
DoRA and other variants, several active adapters, merged or disabled adapters, mixed-adapter batches, a weight in
another dtype than the LoRA's) goes to peft's own forward.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as peft_lora


_MERGE = [True]


@contextlib.contextmanager
def peft_form() -> Iterator[None]:
    """Every layer in peft's own two-product form while inside (benchmarks and tests compare the two)."""
    _MERGE[0] = False
    try:
        yield
    finally:
        _MERGE[0] = True


def merges(layer: peft_lora.LoraLayer, x: torch.Tensor, rows: int, kwargs: dict) -> str | None:
    """The adapter whose merged weight this call should use, or None for peft's own forward."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not _MERGE[0] or layer.disable_adapters or layer.merged or kwargs or len(active) != 1:
        return None
    a = active[0]
    A, base = layer.lora_A[a].weight, layer.get_base_layer().weight
    if (a in layer.lora_variant or not isinstance(layer.lora_dropout[a], torch.nn.Identity)
            or base.dtype != A.dtype or x.dtype != A.dtype):
        return None
    d_out, d_in, r = base.shape[0], base[0].numel(), A.shape[0]
    h = d_in * d_out / (d_in + d_out)
    tuning = torch.is_grad_enabled() and A.requires_grad
    return a if h < (3 * rows * r / (rows + 3 * r) if tuning else rows) else None


class Linear(peft_lora.Linear):
    def rows(self, x: torch.Tensor) -> int:
        return x.numel() // max(1, x.shape[-1])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        a = merges(self, x, self.rows(x), kwargs)
        if a is None or args:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        return F.linear(x, base.weight + self.get_delta_weight(a), base.bias)


class Conv2d(peft_lora.Conv2d):
    def rows(self, x: torch.Tensor) -> int:
        stride = self.get_base_layer().stride
        return x.shape[0] * (x.shape[-2] // stride[0]) * (x.shape[-1] // stride[1])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        a = merges(self, x, self.rows(x), kwargs)
        if a is None or args or base.groups != 1:
            return super().forward(x, *args, **kwargs)
        # ΔW as one product over unfolded patches (lora.py): peft's get_delta_weight convolves A with B, several
        # times dearer on a CPU for the same numbers
        A, B = self.lora_A[a].weight, self.lora_B[a].weight
        delta = (B.flatten(1) @ A.flatten(1)).view_as(base.weight) * self.scaling[a]
        return base._conv_forward(x, base.weight + delta, base.bias)


CUSTOM = {torch.nn.Linear: Linear, torch.nn.Conv2d: Conv2d}
