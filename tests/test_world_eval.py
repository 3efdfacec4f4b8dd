"""`mos eval world` end to end on the tiny base (what runs, what is cached, what it writes), the shipped judge
naming what is in renders whose answers are known, and the shipped world base drawing what simple prompts say."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import DATA, run_cli
from mos.shared.world import judge as judge_mod
from mos.shared.world import scenes as world


def random_judge(path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in judge_mod.JudgeNet().state_dict().items()}, path)
    return judge_mod.Judge(path)


def test_eval_world_runs_on_tiny_and_second_run_reuses_tuning_and_fusion(tmp_path, monkeypatch):
    from mos.client.evaluation import world as we
    from mos.client.tuning import tune as tune_mod

    s = we.Settings(DATA, tmp_path / "work", tune_steps=2, images=2, sample_steps=2, fusion_steps=2, one_shot=True)
    judge = random_judge(tmp_path / "judge.safetensors")
    r, pictures = we.evaluate(s, "tiny", judge)
    assert set(r["single"]) == {"alice", "bob", "carol"}
    assert set(r["fusion"]) == {"2 concepts", "3 concepts"}
    assert set(r["fusion"]["2 concepts"]) == {"gradient", "gradient one-shot", "weight"}
    assert set(r["fusion"]["3 concepts"]["weight"]) == {"alice", "bob", "carol"}
    rates = [v for d in r["single"].values() for v in d.values()] + [
        v[k] for m in r["multi"].values() for k, v in [("all_present", m), ("binding", m)]] + [
        r["base_alone"]["prompt_following"], *r["base_alone"]["binding"].values()]
    assert set(r["base_alone"]["binding"]) == {"plain", "regional", "regional_prompts_only"}
    assert set(r["ceiling"]) == {"alice", "bob", "carol"}
    assert all(set(v) == {"drawn", "autoencoded"} for v in r["ceiling"].values())
    assert all(0.0 <= x <= 1.0 for x in rates)
    assert [len(v) for v in pictures.values()] == [4, 4]  # per mode: images x (three concepts, concept + object)
    assert set(r["summary"]) == {"single_edlora_min", "single_lora_min", "fused3_gradient_keep_min",
                                 "fused3_weight_keep_min", "regional_all_present", "plain_all_present",
                                 "base_two_objects_regional"}
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in r["summary"].values())
    assert r["summary"]["single_edlora_min"] == min(v["ed-lora"] for v in r["single"].values())
    assert r["summary"]["regional_all_present"] == r["multi"]["regional"]["all_present"]

    # the second run (in this process: tuning ran in two worker processes) tunes and fuses nothing, and measures
    # the same (everything is seeded)
    monkeypatch.setattr(tune_mod, "make_trainer", lambda *a, **k: pytest.fail("tuned again"))
    monkeypatch.setattr("mos.shared.fusion.local.fuse", lambda *a, **k: pytest.fail("fused again"))
    s.workers = 1
    again, _ = we.evaluate(s, "tiny", judge)
    assert {k: v for k, v in again.items() if k != "settings"} == {k: v for k, v in r.items() if k != "settings"}
    # without --one-shot (the default) the one-shot fusions are not made, and nothing else changes
    s.one_shot = False
    plain, _ = we.evaluate(s, "tiny", judge)
    assert {k: set(v) for k, v in plain["fusion"].items()} == {k: {"gradient", "weight"} for k in r["fusion"]}
    for k, v in plain["fusion"].items():
        assert v == {m: r["fusion"][k][m] for m in ("gradient", "weight")}
    assert plain["summary"] == r["summary"]

    we.write(r, pictures, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "world_eval.json").read_text()) == json.loads(json.dumps(r))
    for name in ("world_eval.png", "world_eval_pictures.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    assert "all present" in we.table(r) and "gradient one-shot" in we.table(r) and "the base alone" in we.table(r)


def test_eval_world_base_only_tunes_nothing_and_writes_json_alone(tmp_path, monkeypatch):
    from mos.client.evaluation import world as we

    monkeypatch.setattr("mos.client.evaluation.world.tune_all", lambda *a, **k: pytest.fail("tuned"))
    s = we.Settings(DATA, tmp_path / "work", images=1, sample_steps=2)
    r, pictures = we.evaluate(s, "tiny", random_judge(tmp_path / "judge.safetensors"), base_only=True)
    assert set(r) == {"settings", "base", "base_fingerprint", "base_alone"} and pictures == {}
    we.write(r, pictures, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["world_eval.json"]
    assert we.table(r).startswith("0. the base alone")


@pytest.mark.skipif(not judge_mod.WEIGHTS.is_file(), reason="judge weights not trained (scripts/train_judge.py)")
def test_autoencoder_ceiling_judges_the_drawings_and_what_the_autoencoder_gives_back(tmp_path):
    from mos.client.evaluation import world as we
    from mos.shared.sd.base import load_base

    s = we.Settings(DATA, tmp_path, images=6)
    base, judge = load_base("world"), judge_mod.Judge()
    got = we.autoencoder_ceiling(base, judge, "bob", s)
    assert got["drawn"] == 1.0  # the judge knows bob's own drawings (big and small, every background)
    assert got["autoencoded"] > 0.0
    base.vae.decode = lambda z: type("Out", (), {"sample": torch.zeros(z.shape[0], 3, 64, 64)})()  # all gray
    assert we.autoencoder_ceiling(base, judge, "bob", s) == {"drawn": 1.0, "autoencoded": 0.0}


@pytest.mark.skipif(not judge_mod.WEIGHTS.is_file(), reason="judge weights not trained (scripts/train_judge.py)")
def test_world_base_draws_the_shape_colour_and_place_a_prompt_names(tmp_path):
    # the shipped weights: 1.00 on these 8 prompts (the H100-only base before them 0.88, and 22/24 on others; the
    # CPU-only base before that 3/24) — a base that stops following prompts fails here
    from mos.client.evaluation import world as we
    from mos.shared.sd.base import load_base
    from mos.shared.sd.model import ConceptModel

    s = we.Settings(DATA, tmp_path, images=8)
    assert we.prompt_following(ConceptModel(load_base("world")), judge_mod.Judge(), s) >= 0.75


@pytest.mark.skipif(not judge_mod.WEIGHTS.is_file(), reason="judge weights not trained (scripts/train_judge.py)")
def test_layout_adapter_puts_two_named_objects_each_in_its_half(tmp_path):
    # region prompts say what each half holds, not that something is drawn there: the world base then draws one
    # object, or two where it likes (1 of 16 right in the eleventh session); with its layout adapter asking for a
    # disc in each half, 11 of 16 (docs/world.md). The first 8 of those pictures:
    from mos.client.evaluation import world as we
    from mos.shared.sd.base import load_base
    from mos.shared.sd.model import ConceptModel

    s = we.Settings(DATA, tmp_path, images=8)
    model, judge = ConceptModel(load_base("world")), judge_mod.Judge()
    with_layout = we.object_binding(model, judge, s, regional=True)
    prompts_only = we.object_binding(model, judge, s, regional=True, layout=False)
    assert with_layout >= 0.5 and with_layout > prompts_only + 0.25, (with_layout, prompts_only)


def test_eval_world_cli_refuses_missing_concept_folder(tmp_path):
    proc = run_cli("mos", "eval", "world", "--data", str(tmp_path), "--base", "tiny", check=False)
    assert proc.returncode != 0 and "no concept folder" in proc.stderr


def test_eval_world_cli_from_an_empty_folder_prints_only_json(tmp_path):
    """From any directory: the demo concepts are drawn into the work folder (the same as data/), and --json
    prints the JSON and nothing else on stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [str(Path(sys.executable).parent / "mos"), "eval", "world", "--base", "tiny", "--base-only", "--images",
           "1", "--steps", "2", "--json", "--work", str(work), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)) == {"settings", "base", "base_fingerprint", "base_alone"}
    for name in ("alice", "bob", "carol"):
        assert sorted(p.name for p in (work / "concepts" / name).iterdir()) == sorted(
            p.name for p in (DATA / name).iterdir()), name
        assert (work / "concepts" / name / "00.png").read_bytes() == (DATA / name / "00.png").read_bytes()


@pytest.mark.skipif(not judge_mod.WEIGHTS.is_file(), reason="judge weights not trained (scripts/train_judge.py)")
def test_shipped_judge_names_objects_and_concepts_in_clean_renders():
    judge = judge_mod.Judge()
    rng = random.Random(123)
    hits = total = 0
    for name in world.CONCEPTS:
        for _ in range(10):
            scene, _ = world.concept_scene(name, rng)
            got = judge(world.render(scene)[0], [t.box() for t in scene.things])
            hits += got[0]["object"] == name
            total += 1
    for scene in world.scenes(7, 40):
        got = judge(world.render(scene)[0], [t.box() for t in scene.things])
        for t, g in zip(scene.things, got):
            hits += g["object"] == t.shape and g["colour"] == t.colour
            total += 1
    assert hits / total >= 0.9, f"{hits}/{total}"
