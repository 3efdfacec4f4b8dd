"""Gradient fusion end to end on the tiny base: statistics capture, the staged driver, validation, `mos fuse`."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import random_adapter, run_cli
from mos.client.tuning.edlora import TuneConfig
from mos.shared.formats import adapter as adapter_io
from mos.shared.fusion import stages
from mos.shared.fusion.config import FusionConfig
from mos.shared.fusion.driver import Fusion, FusionError, run_fusion
from mos.shared.fusion.local import LocalRunner
from mos.shared.fusion.stats import Gram, StatsRecorder, heldout_key
from mos.shared.sampling.denoise import denoise, initial_latents
from mos.shared.sd.model import ConceptModel
from mos.shared.sd.sites import input_sites


@pytest.fixture(scope="module")
def alice(tiny_base):
    return random_adapter(tiny_base, "alice", "doll", seed=1)


@pytest.fixture(scope="module")
def bob(tiny_base):
    return random_adapter(tiny_base, "bob", "robot", seed=2)


def test_recorded_grams_equal_grams_of_explicit_inputs(tiny_base, alice):
    model = ConceptModel.from_adapter(copy.deepcopy(tiny_base), alice)
    sites = [s for s in input_sites(tiny_base.text_encoder, tiny_base.unet)
             if s.name.endswith(("layers.1.self_attn.qkv", "up_blocks.1.attentions.2.transformer_blocks.0.attn1.qkv",
                                 "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"))]
    assert len(sites) == 3
    seen: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    handles = []
    for s in sites:  # record raw inputs of the *last* layer of each site: it must see the same tensor
        comp, _, path = s.layers[-1].partition(".")
        mod = model.models[comp].get_submodule(path)
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=s.name: seen[n].append(a[0].detach().clone())))
    with StatsRecorder(model.models, sites) as rec:
        cond, uncond = model.encode(["a photo of <alice>"]), model.encode([""])
        denoise(model, cond, uncond, initial_latents(model, 1, 0), steps=3, progress=False)
    for h in handles:
        h.remove()
    for s in sites:
        X = torch.cat([x.reshape(-1, s.dim) for x in seen[s.name]]).double()
        g = rec.stats[s.name]
        assert g.rows == X.shape[0] > 0
        torch.testing.assert_close(g.gram, X.T @ X, rtol=1e-10, atol=1e-10)


def test_statistics_prompts_speak_the_bases_caption_language():
    # on world, SD's "a photo of <c>" drew pictures without the concept, and the spatial stage was fitted to them
    import random

    from mos.shared.world import scenes as world

    rng = random.Random(0)
    vocabulary = {w.strip(",") for _ in range(3000) for w in world.random_scene(rng).caption.split()}
    for prompt in stages.prompts_for("alice", "world"):
        words = [w.strip(",") for w in prompt.split() if w != "<alice>"]
        assert words and set(words) <= vocabulary, prompt
    assert stages.prompts_for("alice", "tiny")[0] == "a photo of <alice>"  # real bases (and tiny) keep SD's


def test_stage3_samples_every_world_prompt_three_times_and_the_first_two_on_real_bases(tiny_base, alice, monkeypatch):
    world_prompts = stages.stage3_prompts("alice", "world")
    assert len(world_prompts) == 18 and set(world_prompts) == set(stages.prompts_for("alice", "world"))
    assert stages.stage3_prompts("alice", tiny_base.spec) == stages.prompts_for("alice", tiny_base.spec)[:2]

    config = FusionConfig(sample_steps=2, heldout=False)
    model = ConceptModel.from_adapter(copy.deepcopy(tiny_base), alice)
    two = stages.spatial_stats(model, "alice", config)
    monkeypatch.setitem(stages.STAGE3_SAMPLES, tiny_base.spec, (2, 3))
    six = stages.spatial_stats(model, "alice", config)
    assert two.keys() == six.keys() and two
    for site, g in two.items():  # one trajectory per listed prompt, each its own seed
        assert six[site].rows == 3 * g.rows
        assert not torch.allclose(six[site].gram, 3 * g.gram)


def test_the_held_out_share_is_the_trajectories_of_the_seeds_after_the_fitted_ones(tiny_base, alice, monkeypatch):
    model = ConceptModel.from_adapter(copy.deepcopy(tiny_base), alice)
    monkeypatch.setitem(stages.STAGE3_SAMPLES, tiny_base.spec, (2, 3))
    both = stages.spatial_stats(model, "alice", FusionConfig(sample_steps=2, sample_seed=5, heldout=True))
    fit = stages.spatial_stats(model, "alice", FusionConfig(sample_steps=2, sample_seed=5, heldout=False))
    monkeypatch.setitem(stages.STAGE3_SAMPLES, tiny_base.spec, (2, 1))
    after = stages.spatial_stats(model, "alice", FusionConfig(sample_steps=2, sample_seed=5 + 6, heldout=False))
    assert set(both) == set(fit) | {heldout_key(s) for s in fit} and fit
    for site, g in fit.items():
        assert torch.equal(both[site].gram, g.gram)  # the fit's rows do not change
        held = both[heldout_key(site)]  # the two prompts once each, seeds 11 and 12: none the fit saw
        assert held.rows == after[site].rows == g.rows // 3 and torch.allclose(held.gram, after[site].gram)


def test_kv_statistics_read_concept_tokens_and_end_token_per_layer(tiny_base, alice):
    model = ConceptModel.from_adapter(copy.deepcopy(tiny_base), alice)
    stats = stages.kv_stats(model, "alice")
    n_prompts = len(stages.prompts_for("alice", tiny_base.spec))
    assert len(stats) == 16 and all(g.rows == 3 * n_prompts for g in stats.values())
    # layer-wise embeddings: change layer 3's rows and only layer 3's k/v statistics move
    with torch.no_grad():
        model.prompts.embedding.tables["alice"][3] += 0.5
    moved = stages.kv_stats(model, "alice")
    changed = [k for k in stats if not torch.allclose(stats[k].gram, moved[k].gram)]
    names = sorted(stats, key=list(stats).index)
    assert changed == [names[3]]


def test_single_concept_fusion_reproduces_its_own_model(tiny_base, alice):
    from mos.shared.fusion.solver import DEFAULT_EPS  # the exact (minimum-norm) solve

    fusion = Fusion(tiny_base.fingerprint, input_sites(tiny_base.text_encoder, tiny_base.unet),
                    FusionConfig(eps=DEFAULT_EPS, sample_steps=4, heldout=False))
    result = run_fusion(LocalRunner(tiny_base, [alice], progress=False), fusion)
    res = result.meta["fusion"]["residuals"]["alice"]
    assert len(res) == 88 and max(res.values()) <= 1e-6
    assert {c.name for c in result.concepts} == {"alice"}


def test_two_concepts_staged_and_one_shot(tiny_base, alice, bob):
    sites = input_sites(tiny_base.text_encoder, tiny_base.unet)
    results = {}
    from mos.shared.fusion.solver import DEFAULT_EPS

    for one_shot in (False, True):
        fusion = Fusion(tiny_base.fingerprint, sites, FusionConfig(one_shot=one_shot, eps=DEFAULT_EPS, sample_steps=4,
                                                                   heldout=False))
        results[one_shot] = run_fusion(LocalRunner(tiny_base, [alice, bob], progress=False), fusion)
    for r in results.values():
        assert sorted(c.name for c in r.concepts) == ["alice", "bob"]
        ranks = r.ranks()
        assert len(ranks) == 4 * 4 + 16 * 8 and all(v == 8 for v in ranks.values())  # exact LoRA of rank Σr
        # near the minimum-norm solve, each concept keeps most of its change on its own inputs
        assert all(max(v.values()) < 1.0 for v in r.meta["fusion"]["residuals"].values())
    assert results[False].meta["fusion"]["mode"] == "staged"
    assert results[True].meta["fusion"]["mode"] == "one-shot"


def _stage1_fusion(base, adapters):
    fusion = Fusion(base.fingerprint, input_sites(base.text_encoder, base.unet))
    runner = LocalRunner(base, adapters, progress=False)
    for name, (a, stats) in runner.stage1(FusionConfig()).items():
        fusion.add(a)
        fusion.add_stats(name, stats)
    return fusion, runner


def test_add_then_remove_returns_previous_result(tiny_base, alice, bob):
    fusion, _ = _stage1_fusion(tiny_base, [alice])
    before = fusion.solve(1)
    carol = random_adapter(tiny_base, "carol", "dog", seed=3)
    stats = LocalRunner(tiny_base, [carol], progress=False).stage1(FusionConfig())["carol"][1]
    fusion.add(carol)
    fusion.add_stats("carol", stats)
    assert fusion.solve(1).keys() == before.keys()
    fusion.remove("carol")
    after = fusion.solve(1)
    for layer, (B, A) in before.items():
        torch.testing.assert_close(after[layer][0] @ after[layer][1], B @ A, rtol=1e-5, atol=1e-7)


def test_bad_adapters_and_statistics_are_refused_and_change_nothing(tiny_base, alice, bob):
    fusion, runner = _stage1_fusion(tiny_base, [alice])
    before = fusion.solve(1)
    other = copy.copy(bob)
    other.fingerprint = "0" * 32
    with pytest.raises(FusionError, match=f"made on base {other.fingerprint}"):
        fusion.add(other)
    with pytest.raises(FusionError, match="two concepts are named 'alice'"):
        fusion.add(alice)
    fusion.add(bob)
    good = LocalRunner(tiny_base, [bob], progress=False).stage1(FusionConfig())["bob"][1]
    site = next(iter(good))
    bad_cases = {
        "NaN": {**good, site: Gram(good[site].gram.clone().fill_(float("nan")), good[site].rows)},
        "not symmetric": {**good, site: Gram(good[site].gram + torch.triu(torch.ones_like(good[site].gram), 1),
                                             good[site].rows)},
        "zero rows": {**good, site: Gram(good[site].gram, 0)},
        "unknown site": {**good, "unet.nowhere.qkv": good[site]},
        "expected 32x32": {**good, site: Gram(torch.eye(5, dtype=torch.float64), 10)},
    }
    for message, stats in bad_cases.items():
        with pytest.raises(ValueError, match=message) as e:
            fusion.add_stats("bob", stats)
        assert "bob" in str(e.value)
    assert fusion.stats["bob"] == {}  # nothing half-added
    fusion.remove("bob")
    after = fusion.solve(1)
    for layer, (B, A) in before.items():
        torch.testing.assert_close(after[layer][0] @ after[layer][1], B @ A, rtol=1e-5, atol=1e-7)


def test_wrong_lora_shape_is_refused(tiny_base, bob):
    fusion = Fusion(tiny_base.fingerprint, input_sites(tiny_base.text_encoder, tiny_base.unet))
    broken = copy.copy(bob)
    layer = next(iter(bob.lora))
    broken.lora = {**bob.lora, layer: (torch.zeros(7, 4), torch.zeros(4, 32))}
    with pytest.raises(FusionError, match="does not fit"):
        fusion.add(broken)


def test_mos_fuse_cli_writes_adapter_report_and_pipeline(tiny_base, alice, bob, tmp_path):
    for a in (alice, bob):
        adapter_io.save(a, tmp_path / a.concepts[0].name / adapter_io.FILENAME)
    out = tmp_path / "fused"
    run_cli("mos", "fuse", str(tmp_path / "alice"), str(tmp_path / "bob"), "--out", str(out), "--steps", "3",
            "--pipeline")
    fused = adapter_io.load(out)
    assert sorted(c.name for c in fused.concepts) == ["alice", "bob"]
    report = json.loads((out / "fusion.json").read_text())
    assert report["method"] == "gradient" and set(report["residuals"]) == {"alice", "bob"}
    assert set(report["lambda"]) and all(v > 0 for v in report["lambda"].values())
    assert report["lambda_rule"] == "held out (spatial sites), fixed eps elsewhere"
    assert set(report["eps_per_site"]) == set(report["lambda"])
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    assert "<alice_a>" in pipe.tokenizer.get_vocab()
    handles = json.loads((out / "pipeline" / "concepts.json").read_text())["handles"]
    assert handles == {"<alice>": "<alice_a> <alice_b>", "<bob>": "<bob_a> <bob_b>"}
    # a base mismatch is a clear error before any work
    proc = run_cli("mos", "fuse", str(tmp_path / "alice"), "--out", str(tmp_path / "x"), "--base", "tiny:1",
                   check=False)
    assert proc.returncode == 2 and "made on base" in proc.stderr and not (tmp_path / "x").exists()


def test_lambda_is_chosen_per_site_unless_eps_fixes_it(tiny_base, alice, bob):
    import argparse

    from mos.shared.commands import fuse as fuse_cmd
    from mos.shared.fusion.solver import _GCV_EPS

    sites = input_sites(tiny_base.text_encoder, tiny_base.unet)
    reports = {}
    for eps in (None, 1e-2):
        fusion = Fusion(tiny_base.fingerprint, sites, FusionConfig(one_shot=True, eps=eps, sample_steps=2))
        reports[eps] = run_fusion(LocalRunner(tiny_base, [alice, bob], progress=False), fusion).meta["fusion"]
    chosen = reports[None]
    assert chosen["lambda_rule"] == "gcv" and len(chosen["lambda"]) == len(sites)
    grid = _GCV_EPS.tolist()
    assert all(min(abs(e - g) for g in grid) <= 1e-9 * e for e in chosen["eps_per_site"].values())
    fixed = reports[1e-2]
    assert fixed["lambda_rule"] == "fixed eps" and set(fixed["eps_per_site"].values()) == {1e-2}
    # staged, the default: each spatial site's λ from the held-out rows (on the grid), ε = 1e-2 elsewhere
    fusion = Fusion(tiny_base.fingerprint, sites, FusionConfig(sample_steps=2).resolved(tiny_base.spec))
    held = run_fusion(LocalRunner(tiny_base, [alice, bob], progress=False), fusion).meta["fusion"]
    assert held["lambda_rule"] == "held out (spatial sites), fixed eps elsewhere"
    spatial = {s.name for s in sites if s.stage == 3}
    assert all(min(abs(e - g) for g in grid) <= 1e-9 * e for s, e in held["eps_per_site"].items() if s in spatial)
    assert {e for s, e in held["eps_per_site"].items() if s not in spatial} == {1e-2}
    assert len({e for s, e in held["eps_per_site"].items() if s in spatial}) > 1  # chosen per site, not one value
    # held out by default on the toy bases only (on SD1.5 it would double the spatial upload)
    assert FusionConfig().resolved("world").uses_heldout and FusionConfig().resolved("tiny:3").uses_heldout
    assert not FusionConfig().resolved("sd15-random").uses_heldout
    assert FusionConfig(heldout=True).resolved("sd15-random").uses_heldout
    assert not FusionConfig(one_shot=True).resolved("world").uses_heldout  # one-shot keeps ε (docs/design.md)
    # the CLI: the base's default; "heldout" asks for it; a number fixes ε everywhere; GCV with --eps gcv
    parser = argparse.ArgumentParser()
    fuse_cmd.register(parser.add_subparsers())
    assert parser.parse_args(["fuse", "a", "--out", "o"]).eps == (FusionConfig().eps, None) == (1e-2, None)
    assert parser.parse_args(["fuse", "a", "--out", "o", "--eps", "heldout"]).eps == (1e-2, True)
    assert parser.parse_args(["fuse", "a", "--out", "o", "--eps", "gcv"]).eps == (None, False)
    assert parser.parse_args(["fuse", "a", "--out", "o", "--eps", "1e-4"]).eps == (1e-4, False)


def test_a_site_some_concept_sent_no_held_out_rows_for_keeps_the_fixed_eps(tiny_base, alice, bob):
    """An older client sends no held-out share: its sites are solved at the fixed ε, the others' choice is made
    where every concept sent one; held-out rows for a site that is not spatial are refused."""
    from mos.shared.fusion.stats import heldout_key

    class NoHeldOut(LocalRunner):
        def stage3(self, fused, concepts, config):
            out = super().stage3(fused, concepts, config)
            out["bob"] = {k: v for k, v in out["bob"].items() if not k.endswith("#heldout")}
            return out

    sites = input_sites(tiny_base.text_encoder, tiny_base.unet)
    fusion = Fusion(tiny_base.fingerprint, sites, FusionConfig(sample_steps=2, heldout=True))
    report = run_fusion(NoHeldOut(tiny_base, [alice, bob], progress=False), fusion).meta["fusion"]
    assert set(report["eps_per_site"].values()) == {1e-2} and report["lambda_rule"] == "fixed eps"
    text_site = next(s.name for s in sites if s.stage == 1)
    with pytest.raises(FusionError, match="held-out statistics for .* where none are asked"):
        fusion.check_stats("alice", {heldout_key(text_site): Gram(torch.eye(32, dtype=torch.float64), 4)})


def test_kv_sites_take_their_own_ridge(tiny_base, alice, bob):
    """kv_eps sets the ridge of the stage-2 sites alone: those layers come out as a fusion at that ε everywhere
    would give them, every other layer as the plain ε gives it; world's default is 0.1, elsewhere ε."""
    import argparse

    from mos.shared.commands import fuse as fuse_cmd

    sites = input_sites(tiny_base.text_encoder, tiny_base.unet)
    kv = {layer for s in sites if s.stage == 2 for layer in s.layers}
    assert kv

    def fused(**kw):
        fusion = Fusion(tiny_base.fingerprint, sites, FusionConfig(one_shot=True, sample_steps=2, heldout=False, **kw))
        return run_fusion(LocalRunner(tiny_base, [alice, bob], progress=False), fusion)

    mixed, small, large = fused(eps=1e-2, kv_eps=0.1), fused(eps=1e-2), fused(eps=0.1)
    per_site = mixed.meta["fusion"]["eps_per_site"]
    assert {e for s, e in per_site.items() if s.endswith(".kv")} == {0.1}
    assert {e for s, e in per_site.items() if not s.endswith(".kv")} == {1e-2}
    for layer, (B, A) in mixed.lora.items():
        want = (large if layer in kv else small).lora[layer]
        assert torch.allclose(B @ A, want[0] @ want[1], rtol=1e-4, atol=1e-7), layer
    assert not torch.allclose(*(f.lora[next(iter(kv))][1] for f in (mixed, small)))  # the ridge mattered

    assert FusionConfig().resolved("world").kv_eps == 0.1 and FusionConfig().resolved("world").eps_at(2) == 0.1
    assert FusionConfig().resolved("tiny").eps_at(2) == FusionConfig().eps_at(3) == 1e-2
    assert FusionConfig(kv_eps=0.3).resolved("world").eps_at(2) == 0.3 and FusionConfig(kv_eps=0.3).eps_at(1) == 1e-2
    with pytest.raises(ValueError, match="k/v stage"):
        FusionConfig(kv_eps=-1.0)
    parser = argparse.ArgumentParser()
    fuse_cmd.register(parser.add_subparsers())
    assert parser.parse_args(["fuse", "a", "--out", "o"]).kv_eps is None
    assert parser.parse_args(["fuse", "a", "--out", "o", "--kv-eps", "0.3"]).kv_eps == 0.3


@pytest.mark.slow
def test_tuned_concepts_gradient_beats_weight_and_staged_not_worse_than_one_shot(tiny_base, tmp_path_factory):
    """The paper's claim on the tiny base: gradient fusion keeps each concept better than weight fusion."""
    from conftest import DATA
    from mos.client.evaluation.retention import retention
    from mos.client.tuning.tune import tune

    runs = tmp_path_factory.mktemp("tuned")
    owns = [adapter_io.load(tune(DATA / n, runs / n, TuneConfig(steps=60), progress=False)) for n in ("alice", "bob")]
    errors = {}
    for label, method, one_shot in (("staged", "gradient", False), ("one-shot", "gradient", True),
                                     ("weight", "weight", False)):
        fusion = Fusion(tiny_base.fingerprint, input_sites(tiny_base.text_encoder, tiny_base.unet),
                        FusionConfig(method, one_shot, sample_steps=10))
        fused = run_fusion(LocalRunner(tiny_base, owns, progress=False), fusion)
        errors[label] = retention(tiny_base, fused, owns, steps=6, progress=False)
    print(json.dumps(errors, indent=2))
    for name in ("alice", "bob"):
        assert errors["staged"][name] < errors["weight"][name]
        assert errors["one-shot"][name] < errors["weight"][name]
        assert errors["staged"][name] <= errors["one-shot"][name] * 1.05 + 1e-3


# ------------------------------------------------------------------------------------- wide placement (convolutions)

def test_a_convolution_site_gram_is_over_its_unfolded_patches(tiny_base):
    """A 3×3 convolution is a linear map over patches: its site's Gram is PᵀP of the patches F.unfold cuts, and
    ΔW = B @ A applied to them is what the peft-wrapped convolution adds."""
    import torch.nn.functional as F

    from mos.shared.fusion.stats import StatsRecorder
    from mos.shared.sd.sites import input_sites

    site = next(s for s in input_sites(tiny_base.text_encoder, tiny_base.unet, "wide") if s.conv
                and s.conv.kernel == (3, 3))
    conv = tiny_base.unet.get_submodule(site.layers[0].removeprefix("unet."))
    assert site.dim == conv.in_channels * 9
    x = torch.randn(2, conv.in_channels, 5, 6)
    with StatsRecorder({"unet": tiny_base.unet}, [site]) as rec:
        conv(x)
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, site.dim).double()
    torch.testing.assert_close(rec.stats[site.name].gram, patches.T @ patches)
    assert rec.stats[site.name].rows == 2 * 5 * 6


def test_wide_placement_lora_round_trips_through_peft_and_fuses_exactly(tmp_path):
    """LoRA on feed-forward, projections and convolutions: written into peft's layers and read back unchanged; a
    concept fused alone reproduces its own layers (residual ~0) on every wide site, convolutions included."""
    from conftest import random_adapter
    from mos.shared.fusion.solver import DEFAULT_EPS
    from mos.shared.sd import lora as lora_mod
    from mos.shared.sd.base import load_base
    from mos.shared.sd.model import ConceptModel
    from mos.shared.sd.sites import input_sites

    base = load_base("tiny")
    carol = random_adapter(base, "carol", "dog", 7, placement="wide")
    conv_layers = [l for l in carol.lora if ".resnets." in l]
    assert conv_layers and any("ff.net" in l for l in carol.lora)
    model = ConceptModel.from_adapter(load_base("tiny"), carol)
    back = lora_mod.read(model.models)
    for layer, (B, A) in carol.lora.items():
        torch.testing.assert_close(back[layer][0] @ back[layer][1], B @ A, rtol=1e-5, atol=1e-6)
    sites = input_sites(base.text_encoder, base.unet, "wide")
    fusion = Fusion(base.fingerprint, sites, FusionConfig(eps=DEFAULT_EPS, sample_steps=2, placement="wide",
                                                                   heldout=False))
    result = run_fusion(LocalRunner(base, [carol], progress=False), fusion)
    res = result.meta["fusion"]["residuals"]["carol"]
    assert len(res) == len(sites) and max(res.values()) <= 1e-6
    assert sorted(result.lora) == sorted(carol.lora)
    with pytest.raises(FusionError, match="not a LoRA target"):  # an attention-only fusion refuses wide LoRA
        Fusion(base.fingerprint, input_sites(base.text_encoder, base.unet)).add(carol)


def test_per_concept_lora_scale_before_fusion(tiny_base, alice, bob):
    """`mos fuse runs/alice:0.5 runs/bob`: alice's LoRA enters fusion halved, and fusion.json says so."""
    from mos.shared.fusion.local import fuse

    assert adapter_io.split_scale("runs/alice:0.7") == ("runs/alice", 0.7)
    assert adapter_io.split_scale("runs/alice") == ("runs/alice", 1.0)
    assert adapter_io.split_scale("C:/runs/alice") == ("C:/runs/alice", 1.0)
    half = adapter_io.scaled(alice, 0.5)
    layer = next(iter(alice.lora))
    assert torch.equal(half.lora[layer][0], alice.lora[layer][0] * 0.5) and half.meta["lora_scale"] == 0.5
    assert torch.equal(half.concepts[0].embeddings, alice.concepts[0].embeddings)
    config = FusionConfig("weight")
    plain, halved = (fuse([a, bob], tiny_base, config, progress=False) for a in (alice, half))
    assert halved.meta["fusion"]["lora_scales"] == {"alice": 0.5, "bob": 1.0}
    assert plain.meta["fusion"]["lora_scales"] == {"alice": 1.0, "bob": 1.0}
    delta = {k: B @ A for k, (B, A) in plain.lora.items()}
    assert any(not torch.allclose(B @ A, delta[k]) for k, (B, A) in halved.lora.items())
