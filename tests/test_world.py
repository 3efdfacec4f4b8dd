"""The toy world: scenes are deterministic and captioned truthfully; the `world` base loads from packaged weights."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mos.shared.sd import base as base_mod
from mos.shared.world import scenes as world


def test_scenes_are_deterministic_and_captions_state_only_true_facts():
    a = [(s.caption, world.render(s)[0].tobytes()) for s in world.scenes(3, 20)]
    b = [(s.caption, world.render(s)[0].tobytes()) for s in world.scenes(3, 20)]
    assert a == b and len({c for c, _ in a}) > 10
    for s in world.scenes(4, 200):
        words = s.caption.replace(",", "").split()
        for t in s.things:
            assert t.shape in words
            assert (t.colour in words) == s.said["colour"]
            assert (t.size in words) == s.said["size"]
        others = set(world.COLOURS) - {t.colour for t in s.things}
        assert not others & set(words)  # never a colour that is not there
        if s.said["background"]:
            assert f"on a {s.background} background" in s.caption


def test_each_object_is_drawn_inside_its_box_in_its_colour():
    s = world.Scene([world.Thing("square", "red", "big", "left"), world.Thing("circle", "blue", "small", "right")],
                    "dark")
    img, masks = world.render(s)
    px = np.asarray(img).astype(int)
    for t, m in zip(s.things, masks):
        m = np.asarray(m) > 200
        x0, y0, x1, y1 = (int(v * world.SIZE) for v in t.box())
        ys, xs = np.nonzero(m)
        assert x0 - 1 <= xs.min() and xs.max() <= x1 + 1 and y0 - 1 <= ys.min() and ys.max() <= y1 + 1
        assert np.abs(px[m].mean(0) - world.COLOURS[t.colour]).max() < 8
    assert world.caption(s) == "a square and a circle"
    s.said = {"colour": True, "size": True, "position": True, "background": True}
    assert world.caption(s) == ("a big red square on the left and a small blue circle on the right, "
                                "on a dark background")


def test_concept_objects_have_patterns_the_world_has_no_words_for():
    t = world.Thing("star", "red", "big", "center", pattern="stripes", colour2="white")
    img, (m,) = world.render(world.Scene([t], "gray"))
    inside = np.asarray(img)[np.asarray(m) > 200]
    assert len({tuple(v) for v in inside // 40}) >= 2  # two colours inside the silhouette
    assert not set(world.PATTERN_SHAPES) & set(world.SHAPES)


def test_world_base_loads_from_packaged_weights(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from mos.shared.sd import architectures
    from mos.shared.sd.sites import cross_attention_layers

    cfg = architectures.world()
    monkeypatch.setattr(base_mod, "WORLD_WEIGHTS", tmp_path)
    with pytest.raises(base_mod.BaseModelError, match="train_world.py"):
        base_mod.load_base("world")
    torch.manual_seed(0)
    for name, m in (("text_encoder", CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))),
                    ("unet", UNet2DConditionModel(**cfg["unet"])), ("vae", AutoencoderKL(**cfg["vae"]))):
        save_file({k: v.half().contiguous() for k, v in m.state_dict().items()}, tmp_path / f"{name}.safetensors")
    (tmp_path / "world.json").write_text('{"vae_scaling_factor": 2.5}')
    b = base_mod.load_base("world")
    assert b.resolution == 64 and b.vae.config.scaling_factor == 2.5
    assert len(cross_attention_layers(b.unet)) == 16
    assert base_mod.load_base("world").fingerprint == b.fingerprint != base_mod.load_base("tiny").fingerprint


def test_train_world_scenes_do_not_depend_on_the_number_of_render_workers(monkeypatch):
    import importlib.util
    import sys

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("train_world", REPO / "scripts" / "train_world.py")
    tw = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_world", tw)  # the render workers look its function up by module name
    spec.loader.exec_module(tw)
    one, caps1 = tw.render_scenes(tw.CHUNK + 40, seed=3, workers=1)
    two, caps2 = tw.render_scenes(tw.CHUNK + 40, seed=3, workers=2)
    assert one.shape == (tw.CHUNK + 40, world.SIZE, world.SIZE, 3) and one.dtype == np.uint8
    assert caps1 == caps2 and np.array_equal(one, two)
    assert len(set(caps1)) > 50  # and they are many different scenes, not one repeated


def test_patterned_world_objects_say_their_pattern_and_concepts_still_do_not():
    rng = random.Random(4)
    for _ in range(20):
        scene = world.random_scene(rng, patterned=1.0)
        img, masks = world.render(scene)
        for t, m in zip(scene.things, masks):
            assert t.shape in world.SHAPES and t.pattern in world.PATTERNS and t.colour2 != t.colour
            assert f"{t.shape} with " in scene.caption and t.pattern in scene.caption
            inside = np.asarray(img)[np.asarray(m) > 250]
            near = lambda c: (np.abs(inside.astype(int) - world.COLOURS[c]).sum(1) < 60).mean()  # noqa: E731
            assert near(t.colour) > 0.1 and near(t.colour2) > 0.1  # both colours drawn
        if scene.said["colour"]:
            assert all(f"{t.colour} {t.shape} with {t.colour2} {t.pattern}" in scene.caption for t in scene.things)
    for name in world.CONCEPTS:
        _, caption = world.concept_scene(name, rng)
        assert not set(caption.split()) & (set(world.PATTERNS) | {"with"})


def test_partial_captions_name_one_of_two_objects_and_change_nothing_at_zero():
    rng = random.Random(6)
    scenes = [world.random_scene(rng, n_things=2, partial=1.0) for _ in range(30)]
    for s in scenes:
        named, left_out = s.things[s.said["only"]], s.things[1 - s.said["only"]]
        assert " and " not in s.caption.split(",")[0]  # one object phrase (a background may follow the comma)
        assert f"{named.shape} {world.PLACE[named.position]}" in s.caption
        assert f"{left_out.shape} {world.PLACE[left_out.position]}" not in s.caption
        assert len(world.render(s)[1]) == 2  # both still drawn
    assert {s.said["only"] for s in scenes} == {0, 1}
    # p = 0 draws nothing extra: the same scenes as before the option existed
    a, b = random.Random(3), random.Random(3)
    assert [world.random_scene(a).caption for _ in range(100)] == \
        [world.random_scene(b, partial=0.0).caption for _ in range(100)]


def test_demo_folders_show_each_concept_big_at_every_place_and_match_the_repository(tmp_path):
    """The demo concepts' folders (what `mos eval world` draws for itself, and data/ in the repository): every
    concept big in every picture, alone at each of the world's places at least once; data/ is those files."""
    repo_data = Path(__file__).resolve().parents[1] / "data"
    for folder in world.draw_concepts(tmp_path, 10):
        captions = [(folder / f"{i:02d}.txt").read_text() for i in range(10)]
        lone = [c for c in captions if " and " not in c]
        assert {p for p in world.PLACE.values() if any(p in c for c in lone)} == set(world.PLACE.values())
        for i in range(10):
            mask = np.asarray(Image.open(folder / "masks" / f"{i:02d}.png")) > 127
            # big: a star covers 8.6 % of the picture, a ring 15 %; small: 3 % and 5 %
            assert mask.mean() > 0.07, f"{folder.name} {i}: the concept is small"
            mine = folder / f"{i:02d}.png"
            theirs = repo_data / folder.name / mine.name
            assert np.array_equal(np.asarray(Image.open(mine)), np.asarray(Image.open(theirs)))
            assert captions[i] == (repo_data / folder.name / f"{i:02d}.txt").read_text()
