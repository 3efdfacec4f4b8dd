"""Regional sampling: the attention rule per layer, its agreement with plain sampling, T2I-Adapter residuals,
region parsing and bad input. CPU, tiny base, random concepts (no tuning)."""

from __future__ import annotations

import json

import pytest
import torch

from mos.shared.sampling.denoise import denoise, initial_latents, seeded_latents
from mos.shared.sampling.layout import LayoutError, Region, cells, check_handles, load_layout, parse_region
from mos.shared.sampling.regional import (RegionalAttnProcessor, batch_plan, denoise_batch, denoise_regional,
                                         grid_size, make_plan)
from mos.shared.sd.concepts import UnknownConceptError
from mos.shared.sd.model import LayerwiseAttnProcessor
from mos.shared.sd.sites import cross_attention_layers

STEPS = 3



def random_concept_adapter(base, names=(("alice", "doll"), ("bob", "robot")), seed=0):
    """A ConceptModel with random layer-wise concepts and a small random LoRA, and its Adapter."""
    from mos.shared.sd import lora as lora_mod
    from mos.shared.sd.concepts import Concept
    from mos.shared.sd.model import ConceptModel
    from mos.shared.sd.sites import lora_target_layers

    g = torch.Generator().manual_seed(seed)
    model = ConceptModel(base)
    for name, cls in names:
        emb = model.prompts.init_embeddings(cls, g)
        model.prompts.add(Concept(name, cls, emb + 0.05 * torch.randn(emb.shape, generator=g)))
    layers = [l for l in lora_target_layers(base.text_encoder, base.unet) if l.startswith("unet.")][:8]
    lora_mod.inject(model.models, {l: 2 for l in layers})
    lora = lora_mod.read(model.models)
    lora_mod.write(model.models, {l: (0.02 * torch.randn(B.shape, generator=g), A) for l, (B, A) in lora.items()})
    return model, model.to_adapter({"note": "random test concepts"})


@pytest.fixture(scope="module")
def model():
    from mos.shared.sd.base import load_base

    m, _ = random_concept_adapter(load_base("tiny"))
    return m


def attn2(model, k):
    unet = model.base.unet
    return unet.get_submodule(cross_attention_layers(unet)[k])


# ---------------------------------------------------------------------------------------------- geometry

def test_cells_and_grid_sizes():
    assert cells((0, 0, 1, 1), 8, 8) == (0, 8, 0, 8)
    assert cells((0, 0, 0.5, 1), 8, 8) == (0, 8, 0, 4)
    assert cells((0, 0, 0.5, 1), 1, 1) == (0, 1, 0, 1)  # misses the only cell's centre: takes the cell under its own
    assert cells((0.6, 0.6, 0.7, 0.7), 2, 2) == (1, 2, 1, 2)  # smaller than a cell: the cell under its centre
    assert grid_size((8, 12), 96) == (8, 12)
    assert grid_size((8, 12), 24) == (4, 6)
    assert grid_size((9, 12), 30) == (5, 6)  # odd sizes halve rounding up, as the UNet's strided convs do
    assert grid_size((9, 12), 9) == (3, 3)
    with pytest.raises(ValueError):
        grid_size((8, 8), 15)


# ---------------------------------------------------------------------------------------------- one layer

def _layer_inputs(model, k, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = attn2(model, k)
    hs = torch.randn(batch, 64, a.to_q.in_features, generator=g)  # an 8x8 layer
    return a, hs


@torch.no_grad()
def test_outside_boxes_see_exactly_the_global_prompt(model):
    k = 1
    a, hs = _layer_inputs(model, k)
    glob = model.encode(["a photo of a dog on grass"])
    regions = [Region("a photo of <alice>", box=(0.0, 0.0, 0.5, 0.5))]
    plan = make_plan(model, regions, "", guidance=1.0, latent_hw=(8, 8))
    plain = LayerwiseAttnProcessor(k)(a, hs, glob)
    out = RegionalAttnProcessor(k, plan)(a, hs, glob)
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[0:4, 0:4] = True
    inside = inside.flatten()
    # outside rows are attended as a subset of the batch: equal up to float rounding of other kernel blockings
    torch.testing.assert_close(out[:, ~inside], plain[:, ~inside], rtol=0, atol=1e-6)
    alone = LayerwiseAttnProcessor(k)(a, hs, model.encode(["a photo of <alice>"]))
    torch.testing.assert_close(out[:, inside], alone[:, inside], rtol=0, atol=1e-6)
    assert (out[:, inside] - plain[:, inside]).abs().max() > 1e-4  # the region prompt really took over


@torch.no_grad()
def test_overlapping_regions_are_averaged(model):
    k = 14  # an up-block layer
    a, hs = _layer_inputs(model, k, seed=1)
    glob = model.encode(["a beach"])
    p1, p2 = "a photo of <alice>", "a photo of <bob>"
    regions = [Region(p1, box=(0.0, 0.0, 0.75, 1.0)), Region(p2, box=(0.25, 0.0, 1.0, 1.0))]
    out = RegionalAttnProcessor(k, make_plan(model, regions, "", 1.0, (8, 8)))(a, hs, glob)
    o1 = LayerwiseAttnProcessor(k)(a, hs, model.encode([p1]))
    o2 = LayerwiseAttnProcessor(k)(a, hs, model.encode([p2]))
    col = torch.arange(64) % 8
    only1, both, only2 = col < 2, (col >= 2) & (col < 6), col >= 6
    torch.testing.assert_close(out[:, only1], o1[:, only1], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, only2], o2[:, only2], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, both], (o1[:, both] + o2[:, both]) / 2, rtol=0, atol=1e-6)


@torch.no_grad()
def test_unconditional_half_uses_region_negative(model):
    k = 0
    a, hs = _layer_inputs(model, k, batch=2, seed=2)
    glob = torch.cat([model.encode(["ugly"]), model.encode(["a dog"])])  # [uncond, cond] as denoise batches it
    regions = [Region("<bob> waving", "blurry <bob>", (0.5, 0.0, 1.0, 1.0))]
    out = RegionalAttnProcessor(k, make_plan(model, regions, "ugly", 7.5, (8, 8)))(a, hs, glob)
    right = torch.arange(64) % 8 >= 4
    neg = LayerwiseAttnProcessor(k)(a, hs[:1], model.encode(["blurry <bob>"]))
    pos = LayerwiseAttnProcessor(k)(a, hs[1:], model.encode(["<bob> waving"]))
    plain = LayerwiseAttnProcessor(k)(a, hs, glob)
    torch.testing.assert_close(out[:1, right], neg[:, right], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:, right], pos[:, right], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, ~right], plain[:, ~right], rtol=0, atol=1e-6)


def test_processors_are_restored_after_sampling(model):
    before = [attn2(model, k).processor for k in range(16)]
    denoise_regional(model, "a dog", regions=[Region("a cat", box=(0, 0, 0.5, 0.5))], steps=1, guidance=1.0,
                     progress=False)
    assert [attn2(model, k).processor for k in range(16)] == before
    assert all(type(p) is LayerwiseAttnProcessor for p in before)


# ---------------------------------------------------------------------------------------------- whole runs

def test_full_cover_region_with_global_prompt_is_plain_sampling(model):
    prompt, neg = "a photo of <alice> on a beach", "blurry"
    lat = initial_latents(model, 1, seed=3)
    plain = denoise(model, model.encode([prompt]), model.encode([neg]), lat, STEPS, 7.5, progress=False)
    full = [Region(prompt, neg, (0.0, 0.0, 1.0, 1.0))]
    reg = denoise_regional(model, prompt, neg, full, lat, steps=STEPS, guidance=7.5, progress=False)
    assert (reg - plain).abs().max() <= 1e-5
    two = [Region("a photo of <bob>", box=(0, 0, 0.5, 1)), Region("a tree", box=(0.5, 0, 1, 1))]
    other = denoise_regional(model, prompt, neg, two, lat, steps=STEPS, guidance=7.5, progress=False)
    assert (other - plain).abs().max() > 1e-3  # regions change the image


def test_a_batch_of_pictures_is_each_picture_sampled_alone(model):
    """Pictures sharing boxes but not prompts, sampled in one batch under guidance: each is what it is alone, to
    float rounding (the per-picture region contexts sit where the denoiser's [uncond, cond] batch expects)."""
    boxes = [(0, 0, 0.5, 1), (0.5, 0, 1, 1)]
    jobs = [("a <alice> and a <bob>", [Region("a <alice>", "", boxes[0]), Region("a <bob>", "blurry", boxes[1])]),
            ("a tree and a <alice>", [Region("a tree", "", boxes[0]), Region("a <alice>", "", boxes[1])]),
            ("a <bob> and a cat", [Region("a <bob>", "", boxes[0]), Region("a cat", "", boxes[1])])]
    lat = seeded_latents(model, range(10, 10 + len(jobs)))
    together = denoise_batch(model, jobs, lat, "ugly", steps=STEPS, guidance=7.5, progress=False)
    for i, (prompt, regions) in enumerate(jobs):
        alone = denoise_regional(model, prompt, "ugly", regions, lat[i:i + 1], steps=STEPS, guidance=7.5,
                                 progress=False)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-4, atol=1e-4)
    assert (together[0] - together[1]).abs().max() > 1e-3  # each picture kept its own prompts
    with pytest.raises(ValueError, match="share their regions' boxes"):
        batch_plan(model, [jobs[0][1], [Region("a cat", "", (0, 0, 1, 1))]], "", 7.5, (8, 8))


def test_same_seed_same_image(model):
    regions = [Region("a photo of <alice>", "", (0, 0, 0.6, 1)), Region("a photo of <bob>", "", (0.4, 0, 1, 1))]
    a = denoise_regional(model, "two toys", "", regions, seed=5, steps=STEPS, progress=False)
    b = denoise_regional(model, "two toys", "", regions, seed=5, steps=STEPS, progress=False)
    c = denoise_regional(model, "two toys", "", regions, seed=6, steps=STEPS, progress=False)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_pixel_boxes_must_be_resolved(model):
    with pytest.raises(ValueError, match="fractions"):
        denoise_regional(model, "x", regions=[Region("y", box=(0, 0, 32, 64), in_pixels=True)], steps=1,
                         progress=False)


# ---------------------------------------------------------------------------------------------- T2I-Adapter

@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory):
    """A random T2IAdapter that fits the tiny UNet: channels = block_out_channels, downscale = VAE factor."""
    from diffusers import T2IAdapter

    folder = tmp_path_factory.mktemp("t2i") / "sketch"
    torch.manual_seed(0)
    T2IAdapter(in_channels=1, channels=[32, 32, 64, 64], num_res_blocks=1, downscale_factor=8).save_pretrained(folder)
    return folder


def _sketch(path, size=(64, 64)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((size[1], size[0])) * 255).astype("uint8")).save(path)
    return path


@torch.no_grad()
def test_t2i_residuals_follow_the_weight_map(model, tiny_t2i, tmp_path):
    from mos.shared.sampling import t2i

    base = model.base
    ad = t2i.load_adapter(tiny_t2i, base.unet, base.vae_scale)
    img = t2i.load_condition(_sketch(tmp_path / "s.png"), (64, 64), ad.config.in_channels, "sketch")
    feats = ad(img)
    regions = [Region("a", box=(0.0, 0.0, 0.5, 1.0), t2i_weight=2.0), Region("b", box=(0.5, 0.0, 1.0, 0.5))]
    res = t2i.residuals([t2i.Condition("sketch", ad, img, weight=0.25)], regions)
    t2i.check_fits(res, base.unet, (8, 8))
    assert [r.shape[-1] for r in res] == [8, 4, 2, 1]
    for f, r in zip(feats, res):
        h, w = f.shape[-2:]
        wmap = torch.full((h, w), 0.25)
        r0, r1, c0, c1 = cells((0.0, 0.0, 0.5, 1.0), h, w)
        wmap[r0:r1, c0:c1] = 2.0  # region b has no weight of its own: the global weight stays there
        torch.testing.assert_close(r, f * wmap, rtol=0, atol=1e-6)
    assert torch.equal(res[0][..., :, :4], feats[0][..., :, :4] * 2.0)

    # the residuals reach the UNet: zero weight changes nothing, a weight changes the prediction
    lat = initial_latents(model, 1, seed=0)
    hooks = len(base.unet._forward_pre_hooks)
    zero = t2i.residuals([t2i.Condition("sketch", ad, img, weight=0.0)])
    plain = denoise_regional(model, "a doll", latents=lat, steps=2, progress=False)
    with t2i.attached(base.unet, zero):
        same = denoise_regional(model, "a doll", latents=lat, steps=2, progress=False)
    with t2i.attached(base.unet, res):
        moved = denoise_regional(model, "a doll", latents=lat, steps=2, progress=False)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-6)
    assert (moved - plain).abs().max() > 1e-4
    assert len(base.unet._forward_pre_hooks) == hooks  # detached again


@torch.no_grad()
def test_t2i_condition_lets_go_of_concept_boxes_after_its_share_of_the_schedule(model, tiny_t2i, tmp_path):
    from mos.shared.sampling import t2i

    base = model.base
    ad = t2i.load_adapter(tiny_t2i, base.unet, base.vae_scale)
    img = t2i.load_condition(_sketch(tmp_path / "s.png"), (64, 64), ad.config.in_channels, "sketch")
    res = t2i.residuals([t2i.Condition("sketch", ad, img)])
    regions = [Region("a <alice>", box=(0.0, 0.0, 0.5, 1.0)), Region("a doll", box=(0.5, 0.0, 1.0, 1.0))]
    assert t2i.concept_boxes(regions) == [(0.0, 0.0, 0.5, 1.0)]
    assert t2i.release_timestep(base, 0.5) == 500 and t2i.release_timestep(base, 1.0) == 0

    seen = []  # (timestep, residuals) of every UNet call, as the UNet receives them

    def record(module, args, kwargs):
        seen.append((float(args[1]), [r[:1].clone() for r in kwargs["down_intrablock_additional_residuals"]]))

    lat = initial_latents(model, 1, seed=0)
    with t2i.attached(base.unet, res, t2i.concept_boxes(regions), t2i.release_timestep(base, 0.5)):
        handle = base.unet.register_forward_pre_hook(record, with_kwargs=True)  # runs after attached's hook
        try:
            denoise_regional(model, "a <alice> and a doll", regions=regions, latents=lat, steps=4, progress=False)
        finally:
            handle.remove()
    assert len(seen) == 4 and any(t >= 500 for t, _ in seen) and any(t < 500 for t, _ in seen)
    for t, got in seen:
        for r, g in zip(res[:-1], got):  # (the 1x1 map's one cell lies in the left box)
            half = r.shape[-1] // 2
            assert torch.equal(g[..., half:], r[..., half:])  # the doll's box: always held
            assert torch.equal(g[..., :half], r[..., :half] if t >= 500 else torch.zeros_like(r[..., :half]))


def test_t2i_bad_inputs(model, tiny_t2i, tmp_path):
    from diffusers import T2IAdapter

    from mos.shared.sampling import t2i

    base = model.base
    with pytest.raises(t2i.T2IError, match="48x48"):
        t2i.load_condition(_sketch(tmp_path / "small.png", (48, 48)), (64, 64), 1, "sketch")
    wrong = tmp_path / "sd15-shaped"
    T2IAdapter(in_channels=3, channels=[64, 64, 64, 64], num_res_blocks=1, downscale_factor=8).save_pretrained(wrong)
    with pytest.raises(t2i.T2IError, match=r"channels \[32, 32, 64, 64\]"):
        t2i.load_adapter(wrong, base.unet, base.vae_scale)
    with pytest.raises(t2i.T2IError, match="config.json"):
        t2i.load_adapter(tmp_path, base.unet, base.vae_scale)


# ---------------------------------------------------------------------------------------------- parsing

def test_region_strings():
    (r,) = parse_region("a photo of <alice>, smiling|blurry|0,0.1,0.5,1")
    assert (r.prompt, r.negative, r.box, r.in_pixels, r.t2i_weight) == ("a photo of <alice>, smiling", "blurry",
                                                                        (0, 0.1, 0.5, 1), False, None)
    (p,) = parse_region("<bob>||32,0,64,48|0.7")
    assert p.in_pixels and p.t2i_weight == 0.7
    assert p.fractions((64, 64)).box == (0.5, 0.0, 1.0, 0.75)
    assert p.pixels((64, 64)) == (32, 0, 64, 48)
    ref = parse_region("[a <alice>, standing]-*-[ugly]-*-[12, 0, 64, 30]|[a <bob>]-*-[]-*-[0,32,64,64]")
    assert [(x.prompt, x.negative) for x in ref] == [("a <alice>, standing", "ugly"), ("a <bob>", "")]
    assert ref[0].box == (0, 12, 30, 64) and ref[0].in_pixels  # top,left,bottom,right -> left,top,right,bottom
    assert ref[1].fractions((64, 64)).box == (0.5, 0.0, 1.0, 1.0)


@pytest.mark.parametrize("text, message", [
    ("a|b", "PROMPT|NEG"),
    ("|x|0,0,1,1", "empty region prompt"),
    ("a||0,0,1", "four"),
    ("a||0,0,one,1", "four numbers"),
    ("a||0,0,1,1|heavy", "not a number"),
    ("[a]-*-[0,0,1,1]", "top,left,bottom,right"),
])
def test_bad_region_strings(text, message):
    with pytest.raises(LayoutError, match=message):
        parse_region(text)


@pytest.mark.parametrize("box, message", [
    ((0, 0, 70, 10), "outside"), ((-0.1, 0, 0.5, 1), "outside"), ((0.5, 0, 0.5, 1), "zero area"),
    ((10, 40, 30, 20), "zero area"),
])
def test_bad_boxes(box, message):
    from mos.shared.sampling.layout import make_box

    vals, px = make_box(box, "test")
    with pytest.raises(LayoutError, match=message):
        Region("a", box=vals, in_pixels=px).fractions((64, 64))


def test_layout_files(tmp_path):
    toml = tmp_path / "l.toml"
    toml.write_text('prompt = "two toys"\nsize = "64x64"\n[[region]]\nprompt = "<alice>"\nbox = [0, 0, 32, 64]\n'
                    't2i_weight = 0.5\n[[region]]\nprompt = "<bob>"\nnegative = "blurry"\nbox = [0.5, 0, 1, 1]\n')
    lay = load_layout(toml)
    assert lay.prompt == "two toys" and lay.size == (64, 64) and len(lay.regions) == 2
    assert lay.regions[0].in_pixels and lay.regions[0].t2i_weight == 0.5 and lay.regions[1].negative == "blurry"
    js = tmp_path / "l.json"
    js.write_text(json.dumps({"prompt": "x", "regions": [{"prompt": "y", "box": [0, 0, 1, 0.5]}]}))
    assert load_layout(js).regions[0].box == (0, 0, 1, 0.5)


@pytest.mark.parametrize("suffix, text, message", [
    (".toml", "prompt = 'x'\n[[region]\n", "not valid TOML"),
    (".json", "{\"prompt\": ", "not valid JSON"),
    (".json", "[1, 2]", "a layout is a table"),
    (".toml", "promt = 'x'\n", "unknown key"),
    (".toml", "[[region]]\nprompt = 'a'\nbox = [0, 0, 1]\n", "four"),
    (".toml", "[[region]]\nprompt = 'a'\nbox = '0,0,1,1'\n", "list of four numbers"),
    (".toml", "[[region]]\nbox = [0, 0, 1, 1]\n", "prompt is missing"),
    (".toml", "[[region]]\nprompt = 'a'\nbox = [0, 0, 1, 1]\ncolour = 'red'\n", "unknown key"),
    (".toml", "size = 'big'\n", "WIDTHxHEIGHT"),
    (".yaml", "prompt: x\n", "toml or .json"),
])
def test_malformed_layouts(tmp_path, suffix, text, message):
    f = tmp_path / f"layout{suffix}"
    f.write_text(text)
    with pytest.raises(LayoutError, match=message):
        load_layout(f)


def test_unknown_concept_lists_known_ones():
    check_handles(["a photo of <alice>", "<bob>"], ["alice", "bob"])
    with pytest.raises(UnknownConceptError, match=r"<carol>.*known: <alice>, <bob>"):
        check_handles(["x", "a photo of <carol>"], ["alice", "bob"])
    with pytest.raises(UnknownConceptError, match="no adapter loaded"):
        check_handles(["<alice>"], [])


def test_layout_discs_fill_their_boxes_up_to_the_largest_object_the_base_draws():
    from types import SimpleNamespace

    import numpy as np

    from mos.shared.sampling.t2i import LARGEST_DISC, disc_box, disc_sketch, largest_disc

    base = SimpleNamespace(resolution=64)
    assert largest_disc(base) == LARGEST_DISC * 64
    # halves of a 64-px picture: 0.8 of the 32-px width, under the cap
    assert disc_box((0, 0, 0.5, 1), (64, 64), largest=largest_disc(base)) == pytest.approx(
        (3.2 / 64, 19.2 / 64, 28.8 / 64, 44.8 / 64))
    # halves of a 128x64 picture are 64-px squares: 0.8 of them (51 px) would be larger than any object the
    # layout adapter saw; the disc stops at the cap, centred in its box
    x0, y0, x1, y1 = disc_box((0.5, 0, 1, 1), (128, 64), largest=largest_disc(base))
    assert ((x1 - x0) * 128, (y1 - y0) * 64) == pytest.approx((LARGEST_DISC * 64,) * 2)
    assert ((x0 + x1) / 2, (y0 + y1) / 2) == pytest.approx((0.75, 0.5))
    sketch = np.asarray(disc_sketch([(0, 0, 0.5, 1), (0.5, 0, 1, 1)], (128, 64), largest_disc(base))) > 0
    uncapped = np.asarray(disc_sketch([(0, 0, 0.5, 1), (0.5, 0, 1, 1)], (128, 64))) > 0
    assert sketch[:, :64].sum() == sketch[:, 64:].sum() < 0.6 * uncapped[:, :64].sum()
    assert not sketch[:, 60:68].any()


# ---------------------------------------------------------------------------------------------- kept apart

def attn1(model, k=0):
    unet = model.base.unet
    return unet.get_submodule(cross_attention_layers(unet)[k][: -len("attn2")] + "attn1")


CORES = [(0.0, 0.0, 0.5, 0.5), (0.5, 0.5, 1.0, 1.0)]  # top-left and bottom-right quarters of an 8×8 latent


def test_apart_is_stock_self_attention_with_fewer_than_two_cores(model):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mos.shared.sampling.apart import ApartAttnProcessor

    attn = attn1(model)
    x = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x)
        for cores in ([], CORES[:1]):
            torch.testing.assert_close(ApartAttnProcessor([cores], (8, 8))(attn, x), stock)


def test_a_query_in_one_core_never_sees_the_other_core(model):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mos.shared.sampling.apart import ApartAttnProcessor

    attn = attn1(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, attn.to_q.in_features, generator=g)
    grid = torch.arange(64).view(8, 8)
    first, second = grid[:4, :4].flatten(), grid[4:, 4:].flatten()
    outside = grid[:4, 4:].flatten()
    y = x.clone()
    y[:, second] += torch.randn(1, len(second), x.shape[-1], generator=g)  # only the second core changes
    apart, stock = ApartAttnProcessor([CORES], (8, 8)), AttnProcessor2_0()
    with torch.no_grad():
        a, b = apart(attn, x), apart(attn, y)
        torch.testing.assert_close(a[:, first], b[:, first])  # the first core does not see the second
        assert not torch.allclose(a[:, outside], b[:, outside])  # the background still sees both
        assert not torch.allclose(stock(attn, x)[:, first], stock(attn, y)[:, first])  # and stock attention would


def test_only_boxes_that_name_a_concept_are_kept_apart(model):
    from mos.shared.sampling.apart import concept_cores

    base = model.base
    left, middle, right = (0, 0, 1 / 3, 1), (1 / 3, 0, 2 / 3, 1), (2 / 3, 0, 1, 1)
    pic = [Region("a <alice>", box=left), Region("a red circle", box=middle), Region("a <bob>", box=right)]
    size = (3 * base.resolution, base.resolution)
    cores = concept_cores(pic, size, base)
    assert len(cores) == 2
    for core, box in zip(cores, (left, right)):
        assert box[0] <= core[0] < core[2] <= box[2] and box[1] <= core[1] < core[3] <= box[3]
    assert concept_cores(pic[:2], size, base) == []  # one concept: nothing to keep apart


def test_each_picture_of_a_batch_keeps_its_own_concepts_apart(model):
    """Under guidance the batch is [uncond, cond] of every picture: picture p's rows take picture p's mask."""
    from mos.shared.sampling.apart import ApartAttnProcessor

    attn = attn1(model)
    x = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(2))
    both = ApartAttnProcessor([CORES, []], (8, 8))  # picture 0 keeps two concepts apart, picture 1 has none
    with torch.no_grad():
        batch = both(attn, torch.cat([x, x]))  # [uncond 0, uncond 1, cond 0, cond 1]
        for row, alone in ((0, [CORES]), (1, [[]]), (2, [CORES]), (3, [[]])):
            one = x[row % 2:row % 2 + 1]
            torch.testing.assert_close(batch[row:row + 1], ApartAttnProcessor(alone, (8, 8))(attn, one))
        with pytest.raises(ValueError, match="whole number"):
            both(attn, x[:1])


def test_regional_sampling_keeps_concepts_apart_unless_asked_not_to(model):
    two = [Region("a <alice>", box=(0, 0, 0.5, 1)), Region("a <bob>", box=(0.5, 0, 1, 1))]
    lat = initial_latents(model, 1, 3)
    run = lambda regions, apart: denoise_regional(model, "a <alice> and a <bob>", "", regions, lat, steps=STEPS,
                                                  progress=False, apart=apart)
    assert not torch.allclose(run(two, True), run(two, False))
    plain = [Region("a doll", box=(0, 0, 0.5, 1)), Region("a robot", box=(0.5, 0, 1, 1))]
    torch.testing.assert_close(run(plain, True), run(plain, False))  # no concept named: nothing changes
    assert all(type(m.processor).__name__ != "ApartAttnProcessor" for m in (attn1(model, k) for k in range(16)))
