"""ED-LoRA tuning (`mos tune`): learning, layer-wise wiring, adapter round trip, untouched base, norm stop,
resume, cache, and bad concept folders. One short tuning run on data/alice is shared by the tests that need it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import DATA, run_cli
from mos.client.tuning.edlora import TuneConfig
from mos.shared.formats import adapter as adapter_io

STEPS = 100


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """100 steps on data/alice (with masks, so the attention regulariser runs), checkpoint at 50."""
    from mos.client.tuning.tune import run_tune
    from mos.shared.sd.base import load_base

    base = load_base("tiny")
    out = tmp_path_factory.mktemp("alice")
    res = run_tune(DATA / "alice", out, TuneConfig(steps=STEPS), base, checkpoint_every=STEPS // 2, progress=False)
    info = json.loads((out / "concept.json").read_text())
    return SimpleNamespace(out=out, trainer=res.trainer, data=res.data, info=info, base=base)


@pytest.fixture(scope="module")
def alice():
    from mos.client.tuning.data import load_concept

    return load_concept(DATA / "alice", 64)


def fixed_loss(trainer, data, n: int = 12) -> float:
    """Mean loss over fixed (batch, noise, timestep) draws: the same draws for every model compared."""
    from mos.client.tuning.data import make_batch
    from mos.client.tuning.edlora import compute_loss

    with torch.no_grad(), trainer.attention_recording():
        return float(np.mean([compute_loss(trainer, make_batch(data, 2, 123, s, 64), s)[0].item()
                              for s in range(n)]))


# ---------------------------------------------------------------------------------------------- learning


def test_loss_goes_down(tuned):
    from mos.client.tuning.report import initial_state

    hist = tuned.info["loss"]["history"]
    assert len(hist) == STEPS and all(np.isfinite(hist))
    first, last = np.mean(hist[: STEPS // 5]), np.mean(hist[-STEPS // 5:])
    assert last < 0.96 * first, (first, last)
    # the same noise and timesteps before and after tuning: a clean comparison
    with initial_state(tuned.trainer):
        before = fixed_loss(tuned.trainer, tuned.data)
    after = fixed_loss(tuned.trainer, tuned.data)
    assert after < 0.95 * before, (before, after)


def test_outputs_and_concept_json(tuned):
    from mos.shared.formats.adapter import load

    for f in ("adapter.safetensors", "concept.json", "loss.png", "samples.png"):
        assert (tuned.out / f).is_file(), f
    assert not (tuned.out / "checkpoint.safetensors").exists()  # removed once the run finished
    info = tuned.info
    assert info["name"] == "alice" and info["handle"] == "<alice>" and info["tokens"] == ["alice_a", "alice_b"]
    assert info["class_word"] == "diamond" and info["rank"] == 4 and info["steps"] == STEPS
    assert info["base_fingerprint"] == tuned.base.fingerprint and len(info["data_digest"]) == 32
    assert len(info["target_layers"]) == 4 * 4 + 16 * 8 and info["masks"] is True
    assert {"torch", "diffusers", "transformers", "peft"} <= set(info["library_versions"])
    ad = load(tuned.out)
    assert [c.name for c in ad.concepts] == ["alice"] and ad.concepts[0].embeddings.shape == (16, 2, 32)
    assert set(ad.ranks().values()) == {4} and len(ad.lora) == len(info["target_layers"])
    assert ad.meta["data_digest"] == info["data_digest"]
    png = Image.open(tuned.out / "samples.png")
    assert png.size[0] > 200 and png.size[1] > 200


# ---------------------------------------------------------------------------------------------- wiring


def test_layer_k_embedding_reaches_only_layer_k(tuned):
    from mos.shared.sd.sites import cross_attention_layers

    model, emb = tuned.trainer.model, tuned.trainer.embedding
    unet = model.base.unet
    names = cross_attention_layers(unet)
    seen: dict[str, torch.Tensor] = {}
    hooks = [unet.get_submodule(f"{n}.{proj}").register_forward_pre_hook(
        lambda m, args, key=f"{n}.{proj}": seen.__setitem__(key, args[0].detach().clone()))
        for n in names for proj in ("to_k", "to_v")]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def inputs() -> dict[str, torch.Tensor]:
        seen.clear()
        with torch.no_grad():
            model.predict(x, torch.tensor([500]), model.encode(["a photo of <alice>"]))
        return dict(seen)

    try:
        ref = inputs()
        assert len(ref) == 32
        for k in range(len(names)):
            saved = emb.detach().clone()
            with torch.no_grad():
                emb[k] += 0.05
            try:
                now = inputs()
            finally:
                with torch.no_grad():
                    emb.copy_(saved)
            changed = sorted({i for i, n in enumerate(names) for p in ("to_k", "to_v")
                              if not torch.equal(now[f"{n}.{p}"], ref[f"{n}.{p}"])})
            assert changed == [k], (k, changed)
    finally:
        for h in hooks:
            h.remove()


def test_save_load_gives_identical_predictions(tuned):
    from mos.shared.formats.adapter import load
    from mos.shared.sd.base import load_base
    from mos.shared.sd.model import ConceptModel

    again = ConceptModel.from_adapter(load_base("tiny"), load(tuned.out))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])
    prompts = ["a photo of <alice> in a garden", "<alice>"]
    with torch.no_grad():
        a = tuned.trainer.model.predict(x, t, tuned.trainer.model.encode(prompts))
        b = again.predict(x, t, again.encode(prompts))
    assert torch.equal(a, b)


def test_base_weights_and_other_rows_unchanged(tuned):
    """Every base tensor bit-for-bit as loaded: the fingerprint recomputed from the tuned model's base weights."""
    from mos.shared.sd.base import fingerprint, load_base

    fresh = load_base("tiny")

    def base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in model.state_dict().items():
            if "lora_" in k or ".tables." in k:
                continue  # the tuned parts
            out[k.replace(".base_layer.", ".").replace("token_embedding.base.", "token_embedding.")] = v
        return out

    class View:
        def __init__(self, model):
            self.config, self._state = model.config, base_state(model)

        def state_dict(self):
            return self._state

    for comp in ("text_encoder", "unet"):
        tuned_state, ref = base_state(getattr(tuned.base, comp)), getattr(fresh, comp).state_dict()
        assert tuned_state.keys() == ref.keys()
        assert all(torch.equal(tuned_state[k], ref[k]) for k in ref), comp
    models = {"text_encoder": View(tuned.base.text_encoder), "unet": View(tuned.base.unet), "vae": tuned.base.vae}
    assert fingerprint(tuned.base.tokenizer, models, tuned.base.scheduler_config) == fresh.fingerprint
    # the tuned parts did change: the concept's rows and LoRA B (which starts at zero)
    tr = tuned.trainer
    assert not torch.equal(tr.embedding.detach(), tr.concept.embeddings)
    assert any(B.abs().sum() > 0 for _, B in tr.lora.values())


def test_norm_stop_freezes_embeddings(fresh_base, alice):
    from mos.client.tuning.data import make_batch
    from mos.client.tuning.edlora import make_trainer, train_step

    tr = make_trainer(fresh_base, "alice", "doll", TuneConfig(steps=4, embedding_norm_stop=0.0))
    start = tr.embedding.detach().clone()
    snaps = []
    for s in range(4):
        stats = train_step(tr, make_batch(alice, 2, 0, s, 64), s)
        snaps.append((tr.embedding.detach().clone(), tr.lora[sorted(tr.lora)[-1]][1].detach().clone()))
        assert stats.embedding_frozen
    assert tr.embedding_frozen_at == 1 and not tr.embedding.requires_grad
    assert not torch.equal(snaps[0][0], start)  # it did learn before the stop
    assert all(torch.equal(e, snaps[0][0]) for e, _ in snaps[1:])  # and never after
    assert not torch.equal(snaps[-1][1], snaps[0][1])  # while LoRA goes on


def test_gradient_checkpointing_gives_the_same_step(alice):
    from mos.client.tuning.data import make_batch
    from mos.client.tuning.edlora import make_trainer, train_step
    from mos.shared.sd.base import load_base

    out = []
    for gc in (False, True):
        tr = make_trainer(load_base("tiny"), "alice", "doll", TuneConfig(steps=2), gradient_checkpointing=gc)
        with tr.attention_recording():  # masks: the explicit attention must be recomputed the same way
            stats = [train_step(tr, make_batch(alice, 2, 0, s, 64), s).loss for s in range(2)]
        out.append((stats, {k: v.detach().clone() for k, v in tr.named_parameters().items()}))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    assert all(torch.allclose(out[0][1][k], out[1][1][k], atol=1e-6) for k in out[0][1])


def test_the_prior_fits_the_class_pictures_the_base_drew(alice):
    """Tuned with the class pictures' loss, the model denoises the base's pictures of the class (under the class
    captions) better than tuned without it; those pictures are the base's whatever the LoRA holds. On the world
    base, whose recipe has the prior (tiny is random: nothing to keep)."""
    from mos.client.tuning import prior as prior_mod
    from mos.client.tuning.data import make_batch, seeded
    from mos.client.tuning.edlora import denoising_error, make_trainer, train_step
    from mos.shared.sd.base import load_base

    def class_error(tr) -> float:
        ids = tr.model.prompts.layerwise_ids(tr.prior.captions)
        with torch.no_grad():
            return float(denoising_error(tr, tr.prior.latents, ids, seeded(0, "test", 0)).mean())

    error, drawn = {}, []
    for weight in (0.0, 1.0):
        tr = make_trainer(load_base("world"), "alice", "diamond", TuneConfig(steps=40, prior=weight))
        tr.prior = prior_mod.draw_prior(tr.model, alice, "diamond", 0)
        drawn.append(tr.prior.latents)
        for s in range(40):
            train_step(tr, make_batch(alice, 2, 0, s, 64), s)
        error[weight] = class_error(tr)
        assert torch.equal(prior_mod.draw_prior(tr.model, alice, "diamond", 0).latents, drawn[0])  # LoRA off
    assert tr.prior.captions[0] == alice.items[0].caption.replace("<TOK>", "diamond")
    assert error[1.0] < 0.9 * error[0.0]


# ---------------------------------------------------------------------------------------------- resume, cache


def test_interrupted_run_resumes_to_the_same_adapter(tuned, tmp_path):
    """Stopped a few steps past the N/2 checkpoint, then resumed: the same adapter as one run of N steps."""
    from mos.client.tuning.tune import tune
    from mos.shared.formats.adapter import load

    n = 24

    class Stop(Exception):
        pass

    def stop_at(done, stats):
        if done == n // 2 + 3:  # the steps after the checkpoint are lost and must be redone identically
            raise Stop

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    tune(DATA / "alice", whole, TuneConfig(steps=n), checkpoint_every=0, progress=False)
    with pytest.raises(Stop):
        tune(DATA / "alice", parts, TuneConfig(steps=n), checkpoint_every=n // 2, progress=False, on_step=stop_at)
    assert (parts / "checkpoint.safetensors").is_file() and not (parts / "concept.json").exists()
    tune(DATA / "alice", parts, TuneConfig(steps=n), checkpoint_every=n // 2, progress=False, resume=True)
    a, b = load(parts), load(whole)
    assert a.lora.keys() == b.lora.keys()
    for layer in a.lora:
        for x, y in zip(a.lora[layer], b.lora[layer]):
            assert torch.allclose(x, y, atol=1e-6), layer
    assert torch.allclose(a.concepts[0].embeddings, b.concepts[0].embeddings, atol=1e-6)
    hist = [json.loads((p / "concept.json").read_text())["loss"]["history"] for p in (parts, whole)]
    assert len(hist[0]) == n and hist[0] == pytest.approx(hist[1], rel=1e-5)


def test_finished_run_is_reused_and_other_settings_are_not(tuned, monkeypatch, capsys):
    import mos.client.tuning.tune as tune_mod

    def no_tuning(*a, **k):
        raise AssertionError("tuned again")

    monkeypatch.setattr(tune_mod, "make_trainer", no_tuning)
    before = (tuned.out / "adapter.safetensors").stat().st_mtime_ns
    assert tune_mod.tune(DATA / "alice", tuned.out, TuneConfig(steps=STEPS), progress=False) == tuned.out
    assert "reusing cached adapter" in capsys.readouterr().err
    assert (tuned.out / "adapter.safetensors").stat().st_mtime_ns == before
    with pytest.raises(AssertionError, match="tuned again"):
        tune_mod.tune(DATA / "alice", tuned.out, TuneConfig(steps=STEPS, seed=1), progress=False)


def test_resume_refuses_a_checkpoint_of_another_run(tuned, tmp_path):
    from mos.client.tuning.tune import tune

    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        tune(DATA / "alice", out, TuneConfig(steps=4), checkpoint_every=2, progress=False,
             on_step=lambda done, s: (_ for _ in ()).throw(RuntimeError()) if done == 3 else None)
    with pytest.raises(ValueError, match="belongs to another run.*config"):
        tune(DATA / "alice", out, TuneConfig(steps=6), checkpoint_every=2, progress=False, resume=True)


# ---------------------------------------------------------------------------------------------- bad input


def test_empty_missing_and_corrupt_folders(tmp_path):
    from mos.client.tuning.data import load_concept

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_concept(tmp_path / "nope", 64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_concept(tmp_path / "empty", 64)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.md").write_text("hi")
    (notes / "00.txt").write_text("a photo of <TOK>")
    with pytest.raises(ValueError, match="holds no images"):
        load_concept(notes, 64)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (bad / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="none of its 2 image"):
        load_concept(bad, 64)


def test_corrupt_skipped_non_images_ignored_and_modes_converted(tmp_path, capsys):
    from mos.client.tuning.data import load_concept

    d = tmp_path / "My Concept!"
    d.mkdir()
    rgb = np.zeros((80, 80, 3), np.uint8)
    rgb[:, :40] = (255, 0, 0)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(np.full((70, 90), 128, np.uint8), "L").save(d / "gray.jpg")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: composited on white
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(np.full((64, 64), 65535, np.uint16)).save(d / "deep.png")  # 16-bit white
    Image.fromarray(np.full((64, 64, 3), 10, np.uint8)).save(d / "bmp.BMP")
    Image.fromarray(np.full((8, 6, 3), 200, np.uint8)).save(d / "tiny.webp")
    Image.fromarray(np.full((600, 1500, 3), 50, np.uint8)).save(d / "huge.png")
    (d / "broken.png").write_bytes(b"not a png")
    (d / "notes.md").write_text("ignored")
    (d / "data.json").write_text("{}")
    data = load_concept(d, 64, class_word="toy")
    assert data.name == "my_concept" and data.class_word == "toy"
    stems = sorted(it.stem for it in data.items)
    assert stems == ["bmp", "deep", "gray", "huge", "rgb", "rgba", "tiny"]
    assert len(data.skipped) == 1 and "broken.png" in data.skipped[0]
    assert "skipped 1 unreadable" in capsys.readouterr().err
    by = {it.stem: it.image for it in data.items}
    assert all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in by.values())
    assert int(by["rgba"].min()) == 255 and int(by["deep"].min()) == 255
    assert abs(int(by["gray"].float().mean()) - 128) <= 2
    assert min(by["tiny"].shape[1:]) == 64                  # tiny images grow to the native size
    assert min(by["huge"].shape[1:]) == 128 and max(by["huge"].shape[1:]) == 256  # huge shrink; 2:1 at most
    assert by["rgb"].shape[1:] == (80, 80)


def test_captions_masks_and_digest(tmp_path):
    from mos.client.tuning.data import load_concept, make_batch

    d = tmp_path / "c"
    (d / "masks").mkdir(parents=True)
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :32] = (255, 0, 0)  # the concept: red, left half
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255
    for i in range(3):
        Image.fromarray(img).save(d / f"{i}.png")
    Image.fromarray(mask).save(d / "masks" / "0.png")
    Image.fromarray(mask).save(d / "masks" / "1.png")
    (d / "0.txt").write_text("a red thing on black")
    (d / "1.txt").write_text("  photo of <TOK>   with <bob>\n")
    (d / "concept.toml").write_text('name = "Red Thing"\nclass_word = "toy"\n')
    data = load_concept(d, 64)
    assert data.name == "red_thing" and data.class_word == "toy" and data.has_masks
    caps = {it.stem: it.caption for it in data.items}
    assert caps == {"0": "<TOK>, a red thing on black", "1": "photo of <TOK> with bob", "2": "a photo of <TOK>"}
    assert data.captions("<red_thing>")[0] == "<red_thing>, a red thing on black"
    # crops and flips move image and mask together: masked pixels are red, unmasked are black
    for step in range(6):
        b = make_batch(data, 3, 0, step, 64)
        for px, m, has in zip(b.pixels, b.masks, b.has_mask):
            if not has:
                assert torch.equal(m, torch.ones_like(m))
                continue
            inside, outside = m[0] > 0.99, m[0] < 0.01
            assert inside.any() and outside.any()
            assert px[0][inside].mean() > 0.9 and px[0][outside].mean() < -0.9
    again = make_batch(data, 3, 0, 5, 64)
    assert torch.equal(again.pixels, make_batch(data, 3, 0, 5, 64).pixels)  # (seed, step) decides everything
    assert not torch.equal(again.pixels, make_batch(data, 3, 1, 5, 64).pixels)
    digest = data.digest
    assert load_concept(d, 64).digest == digest
    (d / "2.txt").write_text("something else")
    assert load_concept(d, 64).digest != digest


def test_class_word_errors(tmp_path):
    from mos.client.tuning.tune import tune

    with pytest.raises(ValueError, match="is 2 tokens"):
        tune(DATA / "alice", tmp_path / "x", TuneConfig(steps=1), class_word="teddy bear", progress=False)
    d = tmp_path / "noclass"
    d.mkdir()
    shutil.copy(DATA / "alice" / "00.png", d / "00.png")
    with pytest.raises(ValueError, match="no class word"):
        tune(d, tmp_path / "y", TuneConfig(steps=1), progress=False)


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_tune_and_bad_input(tmp_path):
    out = tmp_path / "bob"
    proc = run_cli("mos", "tune", "--concept", str(DATA / "bob"), "--out", str(out), "--steps", "4",
                   "--checkpoint-every", "2", "--prior", "0.5", "--no-progress")
    assert Path(proc.stdout.strip()) == out
    info = json.loads((out / "concept.json").read_text())
    assert info["name"] == "bob" and info["class_word"] == "circle" and info["steps"] == 4
    assert info["config"]["prior"] == 0.5
    negative = run_cli("mos", "tune", "--concept", str(DATA / "bob"), "--out", str(tmp_path / "n"), "--prior", "-1",
                       check=False)
    assert negative.returncode == 2 and "prior's weight" in negative.stderr and "Traceback" not in negative.stderr
    assert (out / "adapter.safetensors").is_file() and (out / "samples.png").is_file()
    (tmp_path / "empty").mkdir()
    bad = run_cli("mos", "tune", "--concept", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), check=False)
    assert bad.returncode == 2 and "holds no images" in bad.stderr and "Traceback" not in bad.stderr


def test_plain_lora_mode_tunes_only_lora_and_its_handle_is_the_trigger(tmp_path):
    """`mos tune --plain`: the paper's LoRA baseline, a trigger-word concept that fusion and sampling accept."""
    out = tmp_path / "plain"
    proc = run_cli("mos", "tune", "--concept", str(DATA / "bob"), "--out", str(out), "--steps", "4", "--plain",
                   "--checkpoint-every", "2")
    assert proc.returncode == 0
    ad = adapter_io.load(out)
    c = ad.concepts[0]
    assert (c.name, c.trigger, c.tokens, c.embeddings.shape[1]) == ("bob", "sks " + c.class_word, [], 0)
    # every LoRA learned, except where no gradient can reach: the tiny base's mid-block is one query position, so
    # its self-attention's softmax is over one key (always 1) whatever q and k are
    frozen = {f"unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_{w}" for w in "qk"}
    assert ad.meta["kind"] == "lora" and frozen <= set(ad.lora)
    assert all(float(B.abs().sum()) > 0 for layer, (B, A) in ad.lora.items() if layer not in frozen)
    info = json.loads((out / "concept.json").read_text())
    assert info["trigger"] == c.trigger and info["embedding_norm"] == 0.0


def test_flipped_crops_get_mirrored_captions():
    """Tuning flips images half the time; a caption that says 'left' must then say 'right', or it lies."""
    from mos.client.tuning.data import ConceptData, Item, make_batch, mirror_caption

    assert mirror_caption("a <TOK> on the left and a red square on the right") == \
        "a <TOK> on the right and a red square on the left"
    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    img[0, :, :32] = 255  # red on the left half only
    data = ConceptData(Path("."), "x", "toy", [Item("0", img, "a <TOK> on the left", None)], "d")
    seen = set()
    for step in range(12):
        b = make_batch(data, 1, seed=0, step=step, size=64)
        red_left = float(b.pixels[0, 0, :, :16].mean()) > float(b.pixels[0, 0, :, -16:].mean())
        assert b.captions[0] == ("a <TOK> on the left" if red_left else "a <TOK> on the right")
        seen.add(red_left)
    assert seen == {True, False}


# ---------------------------------------------------------------------------------------------- reference recipe


def portrait(head: int = 15) -> "torch.Tensor":
    """A 64×96 portrait: a head band on top (white top rows, then red), green below, a blue stripe down the left
    edge of the body."""
    img = torch.zeros(3, 96, 64, dtype=torch.uint8)
    img[1] = 255
    img[:, :head] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
    img[:, :3] = 255
    img[:, head:, :6] = torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None, None]
    return img


def head_in_frame(px: torch.Tensor, valid: torch.Tensor) -> bool:
    """The head band's top and bottom edges are both in the picture: its white top and the green below it."""
    rows = valid[0].any(1).nonzero().flatten()
    cols = valid[0].any(0).nonzero().flatten()
    column = px[:, rows, int(cols[len(cols) // 2])]
    white = (column > 0.5).all(0)
    green = (column[1] > 0.5) & (column[0] < -0.5)
    return bool(white.any()) and bool(green.any())


def test_human_crop_keeps_the_head_band_pads_and_never_flips():
    """The reference's crop for people: the head band is wholly in frame in every step (the square crop loses it
    in most), padding is black and left out of the loss, the picture is never mirrored."""
    from mos.client.tuning.data import ConceptData, Item, make_batch

    mask = torch.zeros(96, 64, dtype=torch.bool)
    mask[:15] = True  # the concept: the head
    data = ConceptData(Path("."), "x", "woman", [Item("0", portrait(), "<TOK> on the left", mask)], "d",
                       kind="person")
    square, cut = 0, 0
    for step in range(40):
        b = make_batch(data, 1, 0, step, 64, crop="human")
        px, v, m = b.pixels[0], b.valid[0], b.masks[0]
        assert head_in_frame(px, v)
        assert b.captions[0] == "<TOK> on the left"
        assert torch.all(px[:, v[0] == 0] == -1.0) and v.sum() < 64 * 64  # a portrait always leaves padding
        rows, cols = v[0].any(1).nonzero().flatten(), v[0].any(0).nonzero().flatten()
        left = px[:, rows[-1], cols[0]]
        assert left[2] > 0.5 and left[1] < 0  # blue stays on the left: no flip
        red, green = (px[0] > 0.9) & (px[2] < -0.9), (px[1] > 0.9) & (px[0] < -0.9)
        assert m[0][red].mean() > 0.95 and m[0][green].mean() < 0.05  # the mask travels with the picture
        assert float(m[0][v[0] == 0].sum()) == 0.0
        cut += int(cols.numel() > 43)  # uncut, a 2:3 portrait is 43 px wide at a long side of 64
        sq = make_batch(data, 1, 0, step, 64, crop="square")
        square += head_in_frame(sq.pixels[0], torch.ones(1, 64, 64))
    assert 10 < cut < 30  # half the steps cut (HUMAN_CROP_P)
    assert square < 8  # the square crop loses the head in most steps


def test_padding_is_left_out_of_the_loss():
    from mos.client.tuning.edlora import masked_mse

    err = torch.ones(2, 4, 8, 8)
    err[:, :, :, :4] = 100.0  # padding: huge error that must not count
    valid = torch.ones(2, 1, 64, 64)
    valid[..., :32] = 0
    ones = torch.ones(2, 1, 64, 64)
    assert masked_mse(err, ones, torch.tensor([False, False]), 0.0, valid).item() == pytest.approx(1.0)
    assert masked_mse(err, ones, torch.tensor([False, False]), 0.0).item() == pytest.approx(50.5)


def test_kind_sets_crop_and_attention_mode_and_the_reference_schedule(tmp_path, monkeypatch):
    """concept.toml kind -> crop and regulariser mode; the reference recipe's 4 images per step, as 2 x 2 on a
    small GPU; 125 steps per image (500 passes at 4), capped on a CPU."""
    from mos.client.tuning import tune as tune_mod
    from mos.client.tuning.data import load_concept

    d = tmp_path / "p"
    d.mkdir()
    Image.fromarray(np.zeros((96, 64, 3), np.uint8)).save(d / "0.png")
    (d / "concept.toml").write_text('class_word = "woman"\nkind = "person"\n')
    data = load_concept(d, 64)
    cpu = SimpleNamespace(spec="tiny", device=torch.device("cpu"))
    c = tune_mod.settle(TuneConfig(), data, cpu)
    assert (data.kind, c.crop, c.attention_reg_mode, c.batch_size, c.grad_accum, c.steps) == \
        ("person", "human", "partial", 4, 1, 125)
    assert tune_mod.settle(TuneConfig(crop="square", attention_reg_mode="full"), data, cpu).crop == "square"
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(total_memory=8 * 2**30))
    gpu = SimpleNamespace(spec="tiny", device=torch.device("cuda"))
    c = tune_mod.settle(TuneConfig(), data, gpu)
    assert (c.batch_size, c.grad_accum, c.steps) == (2, 2, 125)
    world = tune_mod.settle(TuneConfig(), data, SimpleNamespace(spec="world", device=torch.device("cpu")))
    assert (world.batch_size, world.grad_accum, world.steps) == (4, 1, 800)  # the small recipe is its own
    (d / "concept.toml").write_text('class_word = "woman"\nkind = "people"\n')
    with pytest.raises(ValueError, match="kind = 'people'"):
        load_concept(d, 64)


def test_micro_batches_read_the_images_of_one_batch_and_accumulate(alice):
    """Gradient accumulation: micro-batches k of step s hold the images a batch of 4 would; the step averages
    them (the reported loss is their mean)."""
    from mos.client.tuning.data import batch_indices

    whole = batch_indices(len(alice.items), 4, 0, 3)
    assert batch_indices(len(alice.items), 2, 0, 6) + batch_indices(len(alice.items), 2, 0, 7) == whole


def test_attention_regulariser_modes():
    """full: token b's map must equal the mask; partial: it must only stay inside; off: nothing. Layers of one
    resolution are averaged, resolutions summed."""
    from mos.client.tuning.attention_reg import attention_loss

    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    inside = mask.flatten(1)
    half = inside.clone().view(1, 8, 8)
    half[..., 2:] = 0  # b lights only half of the concept
    a_in = inside.clone()
    has = torch.tensor([True])

    def maps(a, b):
        return [torch.stack([a, b], -1)]

    both_in = maps(a_in, inside)
    assert attention_loss(both_in, mask, has, "full").item() == pytest.approx(0.0, abs=1e-6)
    part = maps(a_in, half.flatten(1))
    assert attention_loss(part, mask, has, "full").item() > 0.1
    assert attention_loss(part, mask, has, "partial").item() == pytest.approx(0.0, abs=1e-6)
    leak = maps(torch.ones(1, 64), inside)
    assert attention_loss(leak, mask, has, "partial").item() == pytest.approx(1.0)  # a's peak-normalised leak
    assert attention_loss(leak, mask, has, "off").item() == 0.0
    coarse = [torch.stack([torch.ones(1, 16), torch.ones(1, 16)], -1)]  # a 4×4 layer: both leak fully
    assert attention_loss(leak + coarse + coarse, mask, has, "partial").item() == pytest.approx(1.0 + 2.0)


def test_a_person_tunes_with_the_human_crop_and_accumulated_micro_batches(tmp_path):
    """End to end on tiny: kind = person takes the human crop (padding out of the loss) and the default partial
    regulariser; two micro-batches of one image make each step."""
    from mos.client.tuning.tune import run_tune

    d = tmp_path / "p"
    (d / "masks").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(portrait().permute(1, 2, 0).numpy()).save(d / f"{i}.png")
        Image.fromarray(np.pad(np.full((15, 64), 255, np.uint8), ((0, 81), (0, 0)))).save(d / "masks" / f"{i}.png")
    (d / "concept.toml").write_text('class_word = "woman"\nkind = "person"\n')
    res = run_tune(d, tmp_path / "out", TuneConfig(steps=2, batch_size=1, grad_accum=2), "tiny", progress=False,
                   checkpoint_every=0)
    info = json.loads((tmp_path / "out" / "concept.json").read_text())
    cfg = info["config"]
    assert (cfg["crop"], cfg["attention_reg_mode"], cfg["grad_accum"], cfg["batch_size"]) == ("human", "partial", 2, 1)
    assert len(info["loss"]["history"]) == 2 and all(np.isfinite(info["loss"]["history"]))
    assert res.trainer is not None


def test_captions_are_augmented_as_the_reference_does():
    """A bare caption becomes one of the kind's prompts (several across steps); a written one keeps its first
    part and shuffles the rest; the crops are the same either way."""
    from mos.client.tuning.data import (OBJECT_PROMPTS, PEOPLE_PROMPTS, STYLE_PROMPTS, ConceptData, Item,
                                        make_batch)

    img = torch.zeros(3, 64, 64, dtype=torch.uint8)
    tagged = "<TOK>, red hat, blue coat, on a beach, smiling"
    for kind, prompts in (("person", PEOPLE_PROMPTS), ("object", OBJECT_PROMPTS), ("style", STYLE_PROMPTS)):
        data = ConceptData(Path("."), "x", "toy", [Item("0", img, "a photo of <TOK>", None),
                                                    Item("1", img, tagged, None)], "d", kind=kind)
        bare, shuffled = set(), set()
        for step in range(30):
            b = make_batch(data, 2, 0, step, 64, captions="augment")
            fixed = make_batch(data, 2, 0, step, 64)
            assert torch.equal(b.pixels, fixed.pixels)
            for cap, orig in zip(b.captions, fixed.captions):
                if orig == tagged:
                    assert cap.startswith("<TOK>, ") and sorted(cap.split(", ")) == sorted(tagged.split(", "))
                    shuffled.add(cap)
                else:
                    assert cap in {p.format("<TOK>") for p in prompts}
                    bare.add(cap)
        assert len(bare) >= 4 and len(shuffled) >= 4


def test_spatial_rank_sets_the_spatial_layers_rank_only(tmp_path):
    """`mos tune --spatial-rank`: the spatial layers (fusion's stage 3) get their own rank, the text encoder and the
    cross-attention k/v keep `--rank`; the adapter loads like any other, and a rank below 1 is refused."""
    from mos.shared.sd.base import load_base
    from mos.shared.sd.model import ConceptModel
    from mos.shared.sd.sites import input_sites

    out = tmp_path / "alice"
    proc = run_cli("mos", "tune", "--concept", str(DATA / "alice"), "--out", str(out), "--steps", "2", "--rank", "4",
                   "--spatial-rank", "2", "--checkpoint-every", "2")
    assert proc.returncode == 0, proc.stderr
    ad, info = adapter_io.load(out), json.loads((out / "concept.json").read_text())
    base = load_base("tiny")
    placement = info["config"]["placement"]
    stage = {layer: s.stage for s in input_sites(base.text_encoder, base.unet, placement) for layer in s.layers}
    ranks = {layer: A.shape[0] for layer, (B, A) in ad.lora.items()}
    assert set(ranks) == set(stage)
    assert {ranks[l] for l in ranks if stage[l] == 3} == {2} and {ranks[l] for l in ranks if stage[l] < 3} == {4}
    assert info["config"]["spatial_rank"] == 2
    ConceptModel.from_adapter(base, ad)  # mixed ranks load
    bad = run_cli("mos", "tune", "--concept", str(DATA / "alice"), "--out", str(tmp_path / "x"), "--spatial-rank", "0",
                  check=False)
    assert bad.returncode != 0 and "ranks" in bad.stderr


def test_init_word_starts_the_first_token_at_the_word(tmp_path):
    """concept.toml's `init_word` (or `--init-word`) starts token a at half that word's embedding in every layer,
    token b still at the class word's; the LoRA's random start is the same as without it; a word of two tokens is
    refused, and the run records the word."""
    from mos.client.tuning.data import load_concept
    from mos.client.tuning.edlora import make_trainer
    from mos.shared.sd.base import load_base
    from mos.shared.sd.concepts import INIT_WORD_SCALE

    folder = tmp_path / "alice"
    shutil.copytree(DATA / "alice", folder)
    (folder / "concept.toml").write_text('name = "alice"\nclass_word = "diamond"\ninit_word = " red "\n')
    assert load_concept(folder, 64).init_word == "red"
    cfg = TuneConfig(steps=1)
    started = make_trainer(load_base("tiny"), "alice", "diamond", cfg, init_word="red")
    plain = make_trainer(load_base("tiny"), "alice", "diamond", cfg)
    prompts = started.model.prompts
    table = prompts.embedding.base.weight.detach().float().cpu()
    red, diamond = (table[prompts.word_id(w, "word")] for w in ("red", "diamond"))
    red = red * INIT_WORD_SCALE
    emb, emb0 = started.embedding.detach().cpu(), plain.embedding.detach().cpu()
    assert torch.equal(emb[:, 0], red.expand_as(emb[:, 0])) and torch.equal(emb[:, 1], diamond.expand_as(emb[:, 1]))
    assert emb0[:, 0].norm(dim=-1).max() < 0.1 and torch.equal(emb0[:, 1], emb[:, 1])
    assert all(torch.equal(started.lora[k][0], plain.lora[k][0]) for k in started.lora)  # same LoRA draws
    with pytest.raises(ValueError, match="init word 'zzqx' is 2 tokens"):
        prompts.init_embeddings("diamond", torch.Generator().manual_seed(0), init_word="zzqx")
    out = tmp_path / "out"
    proc = run_cli("mos", "tune", "--concept", str(folder), "--out", str(out), "--steps", "1", "--init-word", "green",
                   "--checkpoint-every", "0")
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "concept.json").read_text())
    assert info["init_word"] == "green" and info["cache_key"]["init_word"] == "green"
