"""`mos eval clip`: the paper's CLIP scores, on a tiny random CLIPModel (real CLIP weights are not available here)."""

from __future__ import annotations

import json

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


def test_scores_are_cosines_of_clip_embeddings(clip_dir):
    from mos.client.evaluation.clip import Clip, scores

    clip = Clip(clip_dir)
    red, noise = Image.new("RGB", (64, 64), (200, 30, 30)), Image.effect_noise((64, 64), 80).convert("RGB")
    same = scores(clip, [red], ["a red doll"], [red])
    assert same["image_alignment"] == pytest.approx(1.0, abs=1e-5)
    assert scores(clip, [red], ["a red doll"], [noise])["image_alignment"] < 0.999
    want = float(clip.images([red])[0] @ clip.texts(["a red doll"])[0])
    assert same["text_alignment"] == pytest.approx(want, abs=1e-6) and -1 <= want <= 1


def test_mos_eval_clip_cli(tiny_base, clip_dir, tmp_path):
    adapter_io.save(random_adapter(tiny_base, "alice", "doll", seed=1), tmp_path / "alice" / adapter_io.FILENAME)
    proc = run_cli("mos", "eval", "clip", str(tmp_path / "alice"), "--clip", str(clip_dir), "--concept",
                   str(DATA / "alice"), "--prompts", "2", "--images", "1", "--steps", "2", "--json")
    row = json.loads(proc.stdout)["alice"]
    assert row["images"] == 2 and all(-1 <= row[k] <= 1 for k in ("text_alignment", "image_alignment"))
    bad = run_cli("mos", "eval", "clip", str(tmp_path / "alice"), "--clip", str(tmp_path / "nothing"), "--concept",
                  str(DATA / "alice"), check=False)
    assert bad.returncode == 2 and "no CLIP model folder" in bad.stderr
