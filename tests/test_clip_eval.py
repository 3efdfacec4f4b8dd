"""`mos eval clip`: the reference's CLIP scores (CLIPScore scale, "A photo depicts" prefix, per-category prompts), on
a stub encoder with known vectors and a tiny random CLIPModel (real CLIP weights are not available here)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image

from conftest import DATA, random_adapter, run_cli
from mos.shared.formats import adapter as adapter_io


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from mos.shared.sd.tokenizer import write_tokenizer_files

    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "vocab_size": 49408, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    write_tokenizer_files(d)
    return d


class StubClip:
    """Unit vectors handed out in order, and a record of every text the 'encoder' received."""

    def __init__(self, image_vecs=None, text_vecs=None):
        self.image_vecs, self.text_vecs, self.received = list(image_vecs or []), list(text_vecs or []), []

    def images(self, images):
        if self.image_vecs:
            return torch.tensor(self.image_vecs.pop(0), dtype=torch.float32)
        return torch.nn.functional.normalize(torch.ones(len(images), 2), dim=-1)

    def texts(self, texts):
        self.received += texts
        if self.text_vecs:
            return torch.tensor(self.text_vecs.pop(0), dtype=torch.float32)
        return torch.nn.functional.normalize(torch.ones(len(texts), 2), dim=-1)


def test_clipscore_clips_negative_cosines_and_scales_by_w():
    from mos.client.evaluation.clip import TEXT_WEIGHT, clipscore

    out = clipscore(torch.tensor([-0.3, 0.0, 0.2, 0.4]), TEXT_WEIGHT)
    assert TEXT_WEIGHT == 2.5
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.5, 1.0]))


def test_scores_on_known_vectors():
    from mos.client.evaluation.clip import scores

    img = Image.new("RGB", (8, 8))
    # generated g1 = (1, 0), g2 = (0, 1); texts at cos 0.6 and -1 (clipped to 0): text = 2.5 · (0.6 + 0) / 2
    # references (1, 0) and (-1, 0): cosines 1, 0, -1 → 0, 0 → image = 1/4 (the raw mean would be 0)
    stub = StubClip(image_vecs=[[[1, 0], [0, 1]], [[1, 0], [-1, 0]]], text_vecs=[[[0.6, 0.8], [0, -1]]])
    row = scores(stub, [img, img], ["a doll on a table", "a red doll"], [img, img])
    assert row["text_alignment"] == pytest.approx(0.75)
    assert row["image_alignment"] == pytest.approx(0.25)
    assert row["images"] == 2 and row["references"] == 2
    assert stub.received == ["A photo depicts a doll on a table", "A photo depicts a red doll"]


def test_real_clip_model_scores_lie_on_the_scale(clip_dir):
    from mos.client.evaluation.clip import Clip, scores

    clip = Clip(clip_dir)
    red, noise = Image.new("RGB", (64, 64), (200, 30, 30)), Image.effect_noise((64, 64), 80).convert("RGB")
    same = scores(clip, [red], ["a red doll"], [red])
    assert same["image_alignment"] == pytest.approx(1.0, abs=1e-5)
    assert scores(clip, [red], ["a red doll"], [noise])["image_alignment"] < 0.999
    cos = float(clip.images([red])[0] @ clip.texts(["A photo depicts a red doll"])[0])
    assert same["text_alignment"] == pytest.approx(2.5 * max(cos, 0.0), abs=1e-6)


def test_category_prompts_reach_the_encoder_with_class_word_and_prefix(tiny_base):
    from mos.client.evaluation.clip import CATEGORIES, category_for, evaluate, pick

    assert {k: len(v) for k, v in CATEGORIES.items()} == {"human": 20, "animal": 20, "object": 20, "scene": 20}
    assert [category_for(k) for k in ("person", "character", "object")] == ["human", "human", "object"]
    with pytest.raises(ValueError, match="--category"):
        category_for("style")
    # four of twenty: one from each group of five (places, styles, interactions, attributes)
    assert pick(CATEGORIES["human"], 4) == [CATEGORIES["human"][i] for i in (0, 5, 10, 15)]
    adapter = random_adapter(tiny_base, "alice", "doll", seed=1)
    stub = StubClip()
    ref = Image.new("RGB", (32, 32))
    row = evaluate(tiny_base, adapter, {"alice": [ref]}, stub, {"alice": CATEGORIES["animal"]}, n_prompts=2,
                   n_images=2, steps=1, progress=False)["alice"]
    assert row["prompts"] == ["A <alice>, in the swimming pool", "A <alice> sit on the chair"]
    assert stub.received == ["A photo depicts A doll, in the swimming pool"] * 2 + \
        ["A photo depicts A doll sit on the chair"] * 2
    assert row["images"] == 4 and row["references"] == 1


def test_mos_eval_clip_cli(tiny_base, clip_dir, tmp_path):
    adapter_io.save(random_adapter(tiny_base, "alice", "doll", seed=1), tmp_path / "alice" / adapter_io.FILENAME)
    person = tmp_path / "person"
    shutil.copytree(DATA / "alice", person)
    (person / "concept.toml").write_text('name = "alice"\nclass_word = "doll"\nkind = "person"\n')
    common = ("mos", "eval", "clip", str(tmp_path / "alice"), "--clip", str(clip_dir), "--prompts", "2", "--images",
              "1", "--steps", "2", "--json")
    row = json.loads(run_cli(*common, "--concept", str(person)).stdout)["alice"]
    assert set(row) == {"text_alignment", "image_alignment", "images", "references", "category", "prompts"}
    assert row["category"] == "human" and row["images"] == 2 and row["references"] == len(list(person.glob("*.png")))
    assert 0 <= row["text_alignment"] <= 2.5 and 0 <= row["image_alignment"] <= 1
    assert row["prompts"][0].startswith("A photo of <alice> on the beach")
    row = json.loads(run_cli(*common, "--concept", str(person), "--category", "scene").stdout)["alice"]
    assert row["category"] == "scene" and row["prompts"] == ["A <alice>, in the snow", "A girl near the <alice>"]
    (tmp_path / "chair.txt").write_text("A <TOK>, near the beach\n\nA girl sit on a <TOK>\n")
    row = json.loads(run_cli(*common, "--concept", str(person), "--prompt-file", str(tmp_path / "chair.txt")).stdout)
    assert row["alice"]["category"] == "file" and row["alice"]["prompts"] == ["A <alice>, near the beach",
                                                                               "A girl sit on a <alice>"]
    bad = run_cli("mos", "eval", "clip", str(tmp_path / "alice"), "--clip", str(tmp_path / "nothing"), "--concept",
                  str(DATA / "alice"), check=False)
    assert bad.returncode == 2 and "no CLIP model folder" in bad.stderr
