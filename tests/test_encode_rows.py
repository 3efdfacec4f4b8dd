"""The tuning step's text-encoder pass (edlora.encode_rows): each distinct id row encoded once, outputs and
gradients the same as encoding every row."""

from __future__ import annotations

import pytest
import torch

from mos.client.tuning.edlora import TuneConfig, encode_rows, make_trainer, token_ids

CAPTIONS = ["a <TOK> on the left", "a <TOK> at the top", "a <TOK> on the left"]  # one caption twice


def grads_of(trainer, ids: torch.Tensor, encode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(hidden states, gradient of every trainable tensor) of a fixed random readout of encode(ids)."""
    trainer.optimizer.zero_grad(set_to_none=True)
    hidden = encode(ids)
    w = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    (hidden * w).sum().backward()
    grads = {k: p.grad.clone() for k, p in trainer.named_parameters().items() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return hidden.detach(), grads


@pytest.mark.parametrize("trigger", ["", "sks doll"], ids=["edlora", "plain-trigger"])
def test_distinct_rows_are_encoded_once_with_the_same_outputs_and_gradients(fresh_base, trigger):
    trainer = make_trainer(fresh_base, "alice", "doll", TuneConfig(steps=10, trigger=trigger))
    with torch.no_grad():  # LoRA B starts at zero: make the text encoder's LoRA matter to the check
        for layer, (A, B) in trainer.lora.items():
            B.normal_(std=0.05)
    te = fresh_base.text_encoder
    ids, _ = token_ids(trainer, CAPTIONS, layerwise=True)
    rows = ids.reshape(-1, ids.shape[-1])
    distinct = len(torch.unique(rows, dim=0))
    # ED-LoRA: every layer its own rows, the repeated caption shares them; a trigger concept: one row per caption
    assert distinct == (2 * trainer.model.n_layers if not trigger else 2)

    seen: list[int] = []
    hook = te.register_forward_hook(lambda m, args, kw_out=None: seen.append(int(args[0].shape[0])))
    try:
        fast, g_fast = grads_of(trainer, rows, lambda x: encode_rows(te, x))
    finally:
        hook.remove()
    assert seen == [distinct]
    full, g_full = grads_of(trainer, rows, lambda x: te(x).last_hidden_state)
    assert torch.allclose(fast, full, atol=1e-5, rtol=1e-5)
    assert sorted(g_fast) == sorted(g_full) and g_full
    for name, g in g_full.items():  # float32 sums in another order: equal to rounding, relative to the largest entry
        assert float((g_fast[name] - g).abs().max()) <= 1e-5 * float(g.abs().max()), name


def test_rows_all_distinct_go_through_unchanged(fresh_base):
    trainer = make_trainer(fresh_base, "alice", "doll", TuneConfig(steps=10))
    ids, _ = token_ids(trainer, CAPTIONS[:2], layerwise=True)
    rows = ids.reshape(-1, ids.shape[-1])
    with torch.no_grad():
        assert torch.equal(encode_rows(fresh_base.text_encoder, rows),
                           fresh_base.text_encoder(rows).last_hidden_state)
