"""The attention regulariser of ED-LoRA tuning with masks, and the training-time processor it needs.

Stock attention (SDPA) never materialises the attention probabilities, so while tuning with masks each
cross-attention layer computes attention explicitly and records, for every sample, the maps of the concept's two
token positions. The regulariser then keeps token a's attention inside the concept's mask and token b's inside it
too (`partial`) or equal to it (`full`). The processors are installed for the tuning run only; sampling keeps the fast ones.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from mos.shared.sd.model import LayerwiseAttnProcessor, cross_attention_processors


class AttentionRecorder:
    """Shared by the 16 processors: which positions to record, and the maps of the current forward."""

    def __init__(self):
        self.positions: torch.Tensor | None = None   # long [B, 2]: positions of token a and b per sample
        self.maps: list[torch.Tensor] = []           # per layer, [B, N_queries, 2] (mean over heads)
        self.recording = False

    def start(self, positions: torch.Tensor | None) -> None:
        """Before a forward: record these positions (None: stock attention)."""
        self.positions, self.maps, self.recording = positions, [], positions is not None

    def take(self) -> list[torch.Tensor]:
        """After the forward: the maps. `positions` stays set until the next start, so that gradient
        checkpointing recomputes the same explicit attention in the backward pass (without recording again)."""
        maps, self.maps, self.recording = self.maps, [], False
        return maps


class RecordingAttnProcessor(LayerwiseAttnProcessor):
    """Layer-wise cross-attention computed explicitly, recording the concept tokens' probabilities."""

    def __init__(self, layer: int, recorder: AttentionRecorder):
        super().__init__(layer)
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        rec = self.recorder
        # positions stay set after a recorded forward (take()), so a forward of another batch (the prior's class
        # pictures) goes the stock way unless it is the same size, which then runs explicitly and records nothing
        if rec.positions is None or encoder_hidden_states is None or len(rec.positions) != len(encoder_hidden_states):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if encoder_hidden_states.ndim == 4:
            encoder_hidden_states = encoder_hidden_states[:, self.layer]
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, N, seq]
        self._record(probs.view(batch, attn.heads, probs.shape[1], seq))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _record(self, probs: torch.Tensor) -> None:
        pos = self.recorder.positions.to(probs.device)  # [B, 2]
        idx = pos[:, None, None, :].expand(-1, probs.shape[1], probs.shape[2], -1)
        m = probs.gather(3, idx).float().mean(dim=1)  # [B, N, 2]
        if self.recorder.recording:  # a checkpointed recompute runs the same ops but keeps nothing
            self.recorder.maps.append(m)


@contextmanager
def recording(unet: torch.nn.Module) -> Iterator[AttentionRecorder]:
    """Install recording processors on the cross-attention layers; put the previous ones back afterwards."""
    rec = AttentionRecorder()
    with cross_attention_processors(unet, lambda k: RecordingAttnProcessor(k, rec)):
        yield rec


def attention_loss(maps: list[torch.Tensor], masks: torch.Tensor, has_mask: torch.Tensor, mode: str = "full"
                   ) -> torch.Tensor:
    """The reference's regulariser, summed over map resolutions and averaged over masked samples.

    maps: per layer [B, N, 2] (token a, token b); masks: [B, 1, H, W] in [0, 1] at any resolution with the
    latents' aspect. As the reference does, layers of one resolution are averaged first and each token's map is
    divided by its peak; token a's mean outside the mask is penalised; token b's map should equal the mask
    (`full`, reg_full_identity: true) or, like a, only stay out of the rest (`partial`: a person's clothes and
    background need not light up). Unlike the reference the peak and the means are per sample, not over the
    batch, so a sample's term does not depend on its batch-mates (docs/design.md).
    """
    sel = has_mask.nonzero().flatten()
    if sel.numel() == 0 or mode == "off":
        return masks.new_zeros(())
    terms = []
    H, W = masks.shape[-2:]
    for n, m in by_resolution(maps).items():
        down = (H * W / n) ** 0.5
        h, w = round(H / down), round(W / down)
        if h * w != n or min(h, w) < 2:  # a 1×1 map says nothing about where
            continue
        mk = F.interpolate(masks[sel].float(), size=(h, w), mode="area").flatten(1).to(m.device)  # [b, N]
        peak = m[sel] / m[sel].amax(1, keepdim=True).clamp_min(1e-8)  # [b, N, 2]
        a, b = peak[..., 0], peak[..., 1]
        term = mean_outside(a, mk)
        term = term + (((b - mk) ** 2).mean(1) if mode == "full" else mean_outside(b, mk))
        terms.append(term.mean())
    if not terms:
        return masks.new_zeros(())
    return torch.stack(terms).sum()


def by_resolution(maps: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Layers' maps averaged per number of queries (the reference's 64/32/16/8 groups on SD1.5 at 512)."""
    groups: dict[int, list[torch.Tensor]] = {}
    for m in maps:
        groups.setdefault(m.shape[1], []).append(m)
    return {n: torch.stack(ms).mean(0) for n, ms in groups.items()}


def mean_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of x [b, N] where the mask [b, N] is 0 (soft at its edges); 0 for a mask that fills all."""
    out = 1 - mask
    return (x * out).sum(1) / out.sum(1).clamp_min(1e-8)
