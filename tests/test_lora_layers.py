"""The LoRA layers' merged-weight form (shared/sd/lora_layers.py) against peft's own two-product form."""

import pytest
import torch

from mos.shared.sd import lora as lora_mod
from mos.shared.sd.lora_layers import merges, peft_form


def _layer(kind: str, d: int, rank: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    base = {"linear": lambda: torch.nn.Linear(d, d + 8),
            "conv3": lambda: torch.nn.Conv2d(d, d + 8, 3, padding=1),
            "conv3s2": lambda: torch.nn.Conv2d(d, d + 8, 3, stride=2, padding=1),
            "conv1": lambda: torch.nn.Conv2d(d, d + 8, 1)}[kind]()
    model = torch.nn.Sequential(base)
    lora_mod.inject({"m": model}, {"m.0": rank})
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    with torch.no_grad():
        model[0].lora_B[lora_mod.ADAPTER].weight.normal_(0, 0.1)  # B = 0 would hide a wrong product
    return model


def _input(kind: str, d: int) -> torch.Tensor:
    return torch.randn(3, 40, d) if kind == "linear" else torch.randn(2, d, 12, 12)


def _forward_backward(model, x) -> tuple[torch.Tensor, list[torch.Tensor]]:
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    m = model[0]
    grads = [m.lora_A[lora_mod.ADAPTER].weight.grad.clone(), m.lora_B[lora_mod.ADAPTER].weight.grad.clone()]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("kind", ["linear", "conv3", "conv3s2", "conv1"])
def test_merged_weight_gives_peft_outputs_and_gradients(kind):
    model, x = _layer(kind, 16, 16).double(), _input(kind, 16).double()  # float64: the forms differ by rounding
    merged_calls = []
    model[0].register_forward_pre_hook(lambda m, args: merged_calls.append(
        merges(m, args[0], 10**6, {}) is not None))
    y, grads = _forward_backward(model, x)
    with peft_form():
        y_ref, grads_ref = _forward_backward(model, x)
    assert merged_calls == [True, False]  # the first pass took the merged form, the second peft's
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_ref, rtol=1e-12, atol=1e-12)


def test_the_cheaper_form_is_chosen():
    narrow, wide = _layer("linear", 32, 16)[0], _layer("linear", 320, 4)[0]
    x_narrow, x_wide = torch.randn(1024, 32), torch.randn(1024, 320)
    # tuning: a rank-16 LoRA on a 32-wide layer merges; rank 4 on a 320-wide one (SD1.5's) keeps peft's form
    assert merges(narrow, x_narrow, 1024, {}) is not None
    assert merges(wide, x_wide, 1024, {}) is None
    with torch.no_grad():  # without gradients merging pays once there are more rows than about half the width
        assert merges(wide, x_wide, 1024, {}) is not None
        assert merges(wide, x_wide[:64], 64, {}) is None
    with peft_form():
        assert merges(narrow, x_narrow, 1024, {}) is None


def test_what_the_merged_form_does_not_cover_goes_to_peft():
    m = _layer("linear", 32, 16)[0]
    x = torch.randn(64, 32)
    assert merges(m, x, 64, {"adapter_names": ["default"] * 64}) is None
    assert merges(m, x.double(), 64, {}) is None  # an input in another dtype than the LoRA's: peft casts it
    m.lora_dropout[lora_mod.ADAPTER] = torch.nn.Dropout(0.1)
    assert merges(m, x, 64, {}) is None
    m.lora_dropout[lora_mod.ADAPTER] = torch.nn.Identity()
    m.enable_adapters(False)
    assert merges(m, x, 64, {}) is None
    torch.testing.assert_close(m(x), m.get_base_layer()(x))


def test_disabled_gives_the_base_layer_and_restores_what_was_trainable():
    model = _layer("linear", 32, 16)
    x = torch.randn(5, 32)
    lora_a = model[0].lora_A[lora_mod.ADAPTER].weight
    lora_a.requires_grad_(False)  # one frozen, one trainable: both must come back as they were
    tuned = model(x).detach()
    with lora_mod.disabled({"m": model}):
        torch.testing.assert_close(model(x), model[0].get_base_layer()(x))
    torch.testing.assert_close(model(x), tuned)
    assert not lora_a.requires_grad and model[0].lora_B[lora_mod.ADAPTER].weight.requires_grad
