"""`mos sample` as a user runs it: regions, T2I-Adapter, outputs, reproduction from the record, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli

STEPS = "3"



@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An adapter with two random concepts (alice, bob) and a small random LoRA, a tiny T2I-Adapter, a sketch."""
    from diffusers import T2IAdapter

    from mos.shared.formats import adapter as adapter_mod
    from mos.shared.sd import lora as lora_mod
    from mos.shared.sd.base import load_base
    from mos.shared.sd.concepts import Concept
    from mos.shared.sd.model import ConceptModel
    from mos.shared.sd.sites import lora_target_layers

    d = tmp_path_factory.mktemp("sample")
    base = load_base("tiny")
    g = torch.Generator().manual_seed(0)
    model = ConceptModel(base)
    for name, cls in (("alice", "doll"), ("bob", "robot")):
        emb = model.prompts.init_embeddings(cls, g)
        model.prompts.add(Concept(name, cls, emb + 0.05 * torch.randn(emb.shape, generator=g)))
    layers = lora_target_layers(base.text_encoder, base.unet)[:6]
    lora_mod.inject(model.models, {l: 2 for l in layers})
    lora = {l: (0.02 * torch.randn(B.shape, generator=g), A) for l, (B, A) in lora_mod.read(model.models).items()}
    lora_mod.write(model.models, lora)
    adapter_mod.save(model.to_adapter(), d / "fused")
    torch.manual_seed(0)
    T2IAdapter(in_channels=1, channels=[32, 32, 64, 64], num_res_blocks=1, downscale_factor=8).save_pretrained(
        d / "t2i-sketch")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 64)) * 255).astype("uint8")).save(d / "sketch.png")
    Image.fromarray((rng.random((48, 48)) * 255).astype("uint8")).save(d / "sketch48.png")
    return d


def test_sample_end_to_end_and_reproduce(workdir):
    from mos.shared.commands.mos import main

    out = workdir / "run" / "duo.png"
    run_cli("mos", "sample", "--adapter", str(workdir / "fused"), "--prompt", "a photo of <alice> and <bob>",
            "--negative", "blurry", "--region", "a photo of <alice>, a doll||0,0,0.5,1|0.5",
            "--region", "[a photo of <bob>]-*-[ugly <bob>]-*-[0,32,64,64]", "--t2i-adapter",
            str(workdir / "t2i-sketch"), "--sketch", str(workdir / "sketch.png"), "--t2i-weight", "0.8",
            "--steps", STEPS, "--seed", "7", "--out", str(out), "--quiet",
            env={"OMP_NUM_THREADS": "1"})
    img = Image.open(out)
    assert img.size == (64, 64)
    preview = Image.open(out.with_name("duo_layout.png"))
    assert preview.width >= 512 and preview.height > preview.width  # scaled up, prompts listed below
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["sampler"] == {"seed": 7, "steps": 3, "guidance": 7.5, "scheduler": "dpm++", "apart": True}
    assert rec["layout"]["prompt"] == "a photo of <alice> and <bob>" and rec["layout"]["negative"] == "blurry"
    r1, r2 = rec["layout"]["regions"]
    assert (r1["box"], r1["t2i_weight"], r2["box"], r2["negative"]) == ([0, 0, 0.5, 1], 0.5, [0.5, 0, 1, 1],
                                                                         "ugly <bob>")
    assert [c["handle"] for c in rec["adapter"]["concepts"]] == ["<alice>", "<bob>"]
    assert rec["t2i"]["weight"] == 0.8 and "sketch" in rec["t2i"]["conditions"]
    assert rec["base"]["fingerprint"] and rec["adapter"]["sha256"]

    # the record alone (plus the same flags) redraws the image
    again = workdir / "run" / "again.png"
    code = main(["sample", "--adapter", str(workdir / "fused"), "--layout", str(out.with_suffix(".json")),
                 "--t2i-adapter", str(workdir / "t2i-sketch"), "--sketch", str(workdir / "sketch.png"),
                 "--t2i-weight", "0.8", "--steps", STEPS, "--seed", "7", "--out", str(again), "--quiet"])
    assert code == 0
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (out, again))
    assert np.abs(a - b).max() <= 1  # same seed -> same image (across processes: allow one rounding step)


def test_plain_sampling_without_adapter(workdir):
    from mos.shared.commands.mos import main

    out = workdir / "plain" / "dog.png"
    assert main(["sample", "--prompt", "a photo of a dog", "--steps", "2", "--size", "64x48", "--out", str(out),
                 "--scheduler", "euler", "--quiet"]) == 0
    assert Image.open(out).size == (64, 48)
    assert not out.with_name("dog_layout.png").exists()  # no regions: no layout preview
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["adapter"] is None and rec["layout"]["regions"] == [] and rec["layout"]["size"] == [64, 48]


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "<alice> with <carol>"], r"unknown concept handle <carol>.*known: <alice>, <bob>"),
    (["--prompt", "x", "--region", "<dave>||0,0,1,1"], r"<dave>.*known: <alice>, <bob>"),
    (["--prompt", "x", "--region", "<alice>||0,0,70,64"], "outside the 64x64 image"),
    (["--prompt", "x", "--region", "<alice>||0.2,0,0.2,1"], "zero area"),
    (["--prompt", "x", "--region", "<alice>|0,0,1,1"], "PROMPT|NEG"),
    (["--prompt", "x", "--layout", "LAYOUT"], "not valid TOML"),
    (["--prompt", "x", "--sketch", "SKETCH48", "--t2i-adapter", "T2I"], "48x48"),
    (["--prompt", "x", "--sketch", "SKETCH48"], "needs --t2i-adapter"),
    (["--region", "a||0,0,1,1"], "no prompt"),
    (["--prompt", "x", "--out", "x.txt"], "image name"),
    (["--prompt", "x", "--size", "60x64"], "multiple of 8"),
    (["--prompt", "x", "--fill-boxes"], "give --region"),
    (["--prompt", "x", "--t2i-until", "1.5"], "from 0 to 1"),
    (["--prompt", "x", "--region", "<alice>||0,0,1,1", "--fill-boxes"], "base tiny ships no layout adapter"),
    (["--prompt", "x", "--region", "<alice>||0,0,1,1", "--fill-boxes", "--sketch", "SKETCH48"], "drop --sketch"),
])
def test_bad_input_is_one_clear_line(workdir, capsys, extra, message):
    from mos.shared.commands.mos import main

    (workdir / "bad.toml").write_text("prompt = 'x'\n[[region]\n")
    subs = {"LAYOUT": str(workdir / "bad.toml"), "SKETCH48": str(workdir / "sketch48.png"),
            "T2I": str(workdir / "t2i-sketch")}
    out = workdir / "bad" / "never.png"
    argv = ["sample", "--adapter", str(workdir / "fused"), "--steps", "1", "--out", str(out),
            *[subs.get(a, a) for a in extra]]
    if "--out" in extra:
        argv.remove(str(out))
        argv.remove("--out")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mos sample: error:") and len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_t2i_flags_pair_adapters_with_conditions():
    from argparse import Namespace

    from mos.shared.commands.sample import t2i_paths

    def ns(adapters, sketch=None, keypose=None):
        return Namespace(t2i_adapter=adapters, sketch=sketch, keypose=keypose)

    assert t2i_paths(ns([])) == {}
    both = {"sketch": ("A", "s.png"), "keypose": ("A", "k.png")}
    assert t2i_paths(ns(["A"], sketch="s.png", keypose="k.png")) == both
    assert t2i_paths(ns(["sketch=S", "keypose=K"], "s.png", "k.png")) == {"sketch": ("S", "s.png"),
                                                                          "keypose": ("K", "k.png")}
    for bad, message in ((ns(["sketch=S"], keypose="k.png"), "keypose has no adapter"),
                         (ns(["A", "B"], "s.png"), "without a kind"), (ns(["A"]), "needs a condition image")):
        with pytest.raises(ValueError, match=message):
            t2i_paths(bad)


def test_lora_scale_zero_is_the_embeddings_only_picture(workdir):
    """`--lora-scale 0` draws what the concepts' embeddings alone draw; other scales change the picture and the
    record says which scale was used."""
    from mos.shared.commands.mos import main
    from mos.shared.formats import adapter as adapter_mod

    full = adapter_mod.load(workdir / "fused")
    emb_only = adapter_mod.Adapter(full.fingerprint, full.concepts, {}, {})
    adapter_mod.save(emb_only, workdir / "emb-only.safetensors")

    def draw(name, adapter, *extra):
        out = workdir / "scale" / f"{name}.png"
        assert main(["sample", "--adapter", str(adapter), "--prompt", "a photo of <alice>", "--steps", "2",
                     "--out", str(out), "--quiet", *extra]) == 0
        return np.asarray(Image.open(out)).astype(int), json.loads(out.with_suffix(".json").read_text())

    zero, rec = draw("zero", workdir / "fused", "--lora-scale", "0")
    alone, _ = draw("alone", workdir / "emb-only.safetensors")
    one, _ = draw("one", workdir / "fused")
    assert np.array_equal(zero, alone)
    assert np.abs(one - zero).max() > 0
    assert rec["adapter"]["lora_scale"] == 0.0 and "--lora-scale 0" in rec["reproduce"]


def test_each_t2i_condition_has_its_own_weight_per_region():
    """A condition's weight (global, or per region by kind) changes only that condition's residual."""
    from diffusers import T2IAdapter

    from mos.shared.sampling.layout import parse_region
    from mos.shared.sampling.t2i import Condition, residuals

    torch.manual_seed(0)
    ads = {k: T2IAdapter(in_channels=1, channels=[32, 32, 64, 64], num_res_blocks=1, downscale_factor=8)
           for k in ("sketch", "keypose")}
    img = torch.rand(1, 1, 64, 64)

    def res(sketch, keypose, regions=()):
        return residuals([Condition("sketch", ads["sketch"], img, sketch),
                          Condition("keypose", ads["keypose"], img, keypose)], regions)

    only_sketch = residuals([Condition("sketch", ads["sketch"], img, 1.0)])
    only_keypose = residuals([Condition("keypose", ads["keypose"], img, 1.0)])
    for a, b, s, k in zip(res(0.5, 0.8), res(1.0, 0.8), only_sketch, only_keypose):
        assert torch.allclose(b - a, 0.5 * s, atol=1e-5)  # only the sketch's share moved
    (left,) = parse_region("<alice>||0,0,0.5,1|sketch=0")  # no sketch in the left half; keypose as global
    assert left.t2i_weight_for("sketch") == 0.0 and left.t2i_weight_for("keypose") is None
    assert left.as_dict()["t2i_weight"] == {"sketch": 0.0}
    for r, s, k in zip(res(0.5, 0.8, [left.fractions((64, 64))]), only_sketch, only_keypose):
        half = r.shape[-1] // 2
        if half == 0:  # a 1×1 map's one cell lies in the box
            continue
        assert torch.allclose(r[..., :half], 0.8 * k[..., :half], atol=1e-5)
        assert torch.allclose(r[..., half:], 0.5 * s[..., half:] + 0.8 * k[..., half:], atol=1e-5)


def test_fill_boxes_draws_a_disc_in_each_box_and_its_record_redraws_the_image(tmp_path):
    # the world base ships a layout adapter; --fill-boxes turns the region boxes into its sketch, written beside the
    # picture, so the record's command redraws the same image without the flag
    from mos.shared.commands.mos import main

    out = tmp_path / "duo.png"
    argv = ["sample", "--base", "world", "--prompt", "a red square on the left and a blue circle on the right",
            "--region", "a red square||0,0,0.5,1", "--region", "a blue circle||0.5,0,1,1", "--steps", "6",
            "--seed", "3", "--quiet"]
    assert main([*argv, "--fill-boxes", "--out", str(out)]) == 0
    sketch = np.asarray(Image.open(tmp_path / "duo_sketch.png"))
    assert sketch.shape == (64, 64) and set(np.unique(sketch)) <= {0, 255}
    left, right = sketch[:, :32] > 0, sketch[:, 32:] > 0
    assert left.sum() == right.sum() > 300 and not sketch[:, 30:34].any()  # one disc a half, clear of the line
    rec = json.loads(out.with_suffix(".json").read_text())
    cond = rec["t2i"]["conditions"]["sketch"]
    assert cond["image"] == str(tmp_path / "duo_sketch.png") and rec["t2i"]["weights"]["sketch"] == 2.0
    assert rec["t2i"]["until"] == 0.5 and "--t2i-until 0.5" in rec["reproduce"]  # concept boxes let go halfway
    again = tmp_path / "again.png"
    assert main([*argv, "--t2i-adapter", f"sketch={cond['adapter']}", "--sketch", cond["image"],
                 "--sketch-weight", "2", "--t2i-until", "0.5", "--out", str(again)]) == 0
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (out, again))
    assert np.abs(a - b).max() <= 1
    plain = tmp_path / "plain.png"
    assert main([*argv, "--out", str(plain)]) == 0
    assert np.abs(a - np.asarray(Image.open(plain), dtype=np.int16)).max() > 20  # the condition did something
