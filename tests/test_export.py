"""Meeting users' tools on the tiny base: diffusers / kohya export, and plain LoRAs imported as concepts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_adapter, run_cli
from mos.shared.formats import adapter as adapter_io
from mos.shared.formats import conversions as lora_formats
from mos.shared.fusion.config import FusionConfig
from mos.shared.sampling.denoise import initial_latents
from mos.shared.sd.base import tiny_folder
from mos.shared.sd.lora import delta
from mos.shared.sd.model import ConceptModel


def pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)


@torch.no_grad()
def pipe_eps(pipe, prompt: str, latents: torch.Tensor, t: int) -> torch.Tensor:
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    cond = pipe.text_encoder(ids).last_hidden_state
    return pipe.unet(latents, torch.tensor([t]), encoder_hidden_states=cond).sample


@pytest.fixture(scope="module")
def alice(tiny_base):
    """Mixed ranks (per-layer ranks must survive) and layer-constant embeddings (so the layer average is exact)."""
    a = random_adapter(tiny_base, "alice", "doll", seed=1)
    for i, layer in enumerate(sorted(a.lora)):
        if i % 3 == 0:
            B, A = a.lora[layer]
            a.lora[layer] = (B[:, :2].contiguous(), A[:2].contiguous())
    c = a.concepts[0]
    c.embeddings = c.embeddings.mean(dim=0, keepdim=True).expand_as(c.embeddings).clone()
    return a


@pytest.fixture(scope="module")
def exported(alice, tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    adapter_io.save(alice, d / "alice" / adapter_io.FILENAME)
    run_cli("mos", "export", str(d / "alice"), "--format", "diffusers", "--out", str(d / "pipe"))
    run_cli("mos", "export", str(d / "alice"), "--format", "kohya", "--out", str(d / "kohya" / "alice.safetensors"))
    return d


def test_exported_pipeline_predicts_like_our_sampler(alice, fresh_base, exported):
    model = ConceptModel.from_adapter(fresh_base, alice)
    latents, t = initial_latents(model, 1, seed=3), 500
    with torch.no_grad():
        ours = model.predict(latents, torch.tensor([t]), model.encode(["a photo of <alice> on a beach"]))
    handles = json.loads((exported / "pipe" / "concepts.json").read_text())["handles"]
    assert handles == {"<alice>": "<alice_a> <alice_b>"}
    theirs = pipe_eps(pipeline(exported / "pipe"), "a photo of <alice_a> <alice_b> on a beach", latents, t)
    assert (ours - theirs).abs().max() <= 1e-4
    # the unmerged lora/ folder on the original base gives the same prediction
    base_pipe = pipeline(tiny_folder())
    base_pipe.load_lora_weights(exported / "pipe" / "lora")
    base_pipe.load_textual_inversion(exported / "pipe" / "lora" / "embeddings" / "alice.safetensors", token="<alice>")
    prompt = base_pipe.maybe_convert_prompt("a photo of <alice> on a beach", base_pipe.tokenizer)
    assert (pipe_eps(base_pipe, prompt, latents, t) - ours).abs().max() <= 1e-4


def test_kohya_file_round_trips_through_diffusers_loader_to_the_same_deltas(alice, exported):
    from safetensors import safe_open

    f = exported / "kohya" / "alice.safetensors"
    with safe_open(f, "pt") as st:
        keys = set(st.keys())
        alphas = {st.get_tensor(k).item() for k in st.keys() if k.endswith(".alpha")}
    assert alphas == {4.0}  # one alpha, as kohya's trainer writes; per-layer ranks below
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for k in keys)  # A1111's names
    assert len(keys) == 3 * len(alice.lora)
    assert (exported / "kohya" / "alice_embeddings" / "alice.safetensors").is_file()
    pipe = pipeline(tiny_folder())
    models = {"text_encoder": pipe.text_encoder, "unet": pipe.unet}
    before = {k: models[k.partition(".")[0]].get_submodule(k.partition(".")[2]).weight.detach().clone()
              for k in alice.lora}
    pipe.load_lora_weights(f)
    pipe.fuse_lora(lora_scale=1.0)
    ranks = set()
    for layer, (B, A) in alice.lora.items():
        comp, _, path = layer.partition(".")
        mod = models[comp].get_submodule(path)
        w = getattr(mod, "base_layer", mod).weight
        torch.testing.assert_close(w - before[layer], B @ A, atol=1e-5, rtol=1e-4)
        ranks.add(A.shape[0])
    assert ranks == {2, 4}


def kohya_file(lora, path, alpha_over_rank: float = 0.5, extra: dict | None = None):
    """Write `lora` as a kohya file whose alpha is not its rank: up is scaled so that ΔW stays B @ A."""
    t = {}
    for layer, (B, A) in lora.items():
        k, r = lora_formats.kohya_name(layer), A.shape[0]
        t[f"{k}.lora_down.weight"], t[f"{k}.lora_up.weight"] = A, B / alpha_over_rank
        t[f"{k}.alpha"] = torch.tensor(alpha_over_rank * r)
    save_file(t | (extra or {}), path)
    return path


def test_imported_kohya_lora_fused_alone_reproduces_its_own_outputs(tiny_base, tmp_path):
    from mos.shared.fusion.driver import Fusion, run_fusion
    from mos.shared.fusion.local import LocalRunner
    from mos.shared.fusion.solver import DEFAULT_EPS
    from mos.shared.sd.sites import input_sites

    src = random_adapter(tiny_base, "x", "toy", seed=5, rank=8)
    run_cli("mos", "import-lora", str(kohya_file(src.lora, tmp_path / "sks.safetensors")), "--trigger", "sks toy",
            "--out", str(tmp_path / "sks"))
    imp = adapter_io.load(tmp_path / "sks")
    c = imp.concepts[0]
    assert (c.name, c.trigger, c.tokens, tuple(c.embeddings.shape)) == ("sks_toy", "sks toy", [], (16, 0, 32))
    for layer, (B, A) in src.lora.items():
        torch.testing.assert_close(delta(imp.lora, layer), B @ A, atol=1e-6, rtol=1e-5)
    # the handle stands for the trigger words, in every layer
    model = ConceptModel.from_adapter(copy.deepcopy(tiny_base), imp)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(["a photo of <sks_toy>"]), model.encode(["a photo of sks toy"]))
    fusion = Fusion(tiny_base.fingerprint, input_sites(tiny_base.text_encoder, tiny_base.unet),
                    FusionConfig(eps=DEFAULT_EPS, sample_steps=3, heldout=False))
    fused = run_fusion(LocalRunner(tiny_base, [imp], progress=False), fusion)
    res = fused.meta["fusion"]["residuals"]["sks_toy"]
    assert len(res) == 88 and max(res.values()) <= 1e-6
    assert fused.concepts[0].trigger == "sks toy"
    # a diffusers-keyed file of the same LoRA imports to the same adapter
    save_file(lora_formats.to_diffusers(src.lora), tmp_path / "d.safetensors")
    run_cli("mos", "import-lora", str(tmp_path / "d.safetensors"), "--trigger", "sks toy", "--out", str(tmp_path / "d"))
    again = adapter_io.load(tmp_path / "d").lora
    for layer in src.lora:
        torch.testing.assert_close(delta(again, layer), delta(imp.lora, layer), atol=1e-6, rtol=1e-5)


def test_import_refuses_bad_files_with_clear_errors(tiny_base, tmp_path):
    src = random_adapter(tiny_base, "x", "toy", seed=6, rank=2)
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"

    def imp(path, *extra):
        return run_cli("mos", "import-lora", str(path), "--trigger", "zq", "--out", str(tmp_path / "out"), *extra,
                       check=False)

    B, A = src.lora[layer]
    wrong = kohya_file({layer: (B, torch.randn(2, A.shape[1] + 8))}, tmp_path / "wrong.safetensors")
    p = imp(wrong)
    assert p.returncode == 2 and "does not fit the base" in p.stderr
    unknown = kohya_file({layer: src.lora[layer]}, tmp_path / "unknown.safetensors",
                         extra={"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32)})
    p = imp(unknown)
    assert p.returncode == 2 and "name no LoRA part" in p.stderr and "SDXL" in p.stderr
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95 not safetensors")
    p = imp(tmp_path / "pickle.safetensors")
    assert p.returncode == 2 and "not a readable .safetensors" in p.stderr
    ff = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"
    d_out, d_in = tiny_base.unet.get_submodule(ff.removeprefix("unet.")).weight.shape
    mixed = kohya_file({layer: src.lora[layer], ff: (torch.randn(d_out, 2), torch.randn(2, d_in))},
                       tmp_path / "mixed.safetensors")
    p = imp(mixed)
    assert p.returncode == 2 and "--attention-only" in p.stderr
    assert not (tmp_path / "out").exists()  # nothing written by any refusal
    p = imp(mixed, "--attention-only")
    assert p.returncode == 0 and "dropped 1 non-attention" in p.stdout
    assert set(adapter_io.load(tmp_path / "out").lora) == {layer}


def test_convolution_lora_exports_in_each_tools_shape_and_reads_back(tiny_base, tmp_path):
    """kohya (LoCon) and diffusers hold a convolution's LoRA as a k×k down and a 1×1 up; reading either file back
    gives our matrices, and a merged pipeline carries ΔW in the convolution's own weight shape."""
    from conftest import random_adapter
    from mos.shared.formats import conversions as lora_formats
    from mos.shared.formats.export import merge_lora
    from mos.shared.sd.base import load_base

    src = random_adapter(tiny_base, "carol", "dog", 3, placement="wide")
    models = {"text_encoder": tiny_base.text_encoder, "unet": tiny_base.unet}
    shapes = lora_formats.linear_shapes(models)
    conv = next(l for l in src.lora if l.endswith("conv1"))
    files = {f"{lora_formats.kohya_name(conv)}.lora_down.weight": lora_formats.to_kohya(src.lora, shapes),
             f"{conv}.lora_A.weight": lora_formats.to_diffusers(src.lora, shapes)}
    for down_key, tensors in files.items():
        assert tensors[down_key].ndim == 4 and tensors[down_key].shape[2:] == (3, 3)
        back = lora_formats.read(tensors, models)
        for layer, (B, A) in src.lora.items():
            torch.testing.assert_close(back[layer][0] @ back[layer][1], B @ A, rtol=1e-5, atol=1e-6)
    merged = load_base("tiny")
    w0 = merged.unet.get_submodule(conv.removeprefix("unet.")).weight.clone()
    merge_lora(merged, src)
    B, A = src.lora[conv]
    torch.testing.assert_close(merged.unet.get_submodule(conv.removeprefix("unet.")).weight - w0,
                               (B @ A).reshape(w0.shape), rtol=1e-4, atol=1e-6)
