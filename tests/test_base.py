"""Foundation: tokenizer, the tiny base, fingerprints, base info, bad paths."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import run_cli


def test_tokenizer_matches_sd_ids():
    out = run_cli("mos", "base", "tokenize", "--base", "tiny", "a photo of a dog").stdout.strip()
    assert out == "49406 320 1125 539 320 1929 49407"


def test_tiny_base_fingerprint_is_stable_across_processes(tmp_path):
    # Two separate homes: the base is built twice from scratch, in two processes.
    fps = []
    for i in range(2):
        home = tmp_path / f"home{i}"
        info = json.loads(run_cli("mos", "base", "info", "--json", env={"MOS_HOME": str(home)}).stdout)
        fps.append(info["fingerprint"])
    assert fps[0] == fps[1]
    assert len(fps[0]) == 32


def test_other_seed_and_changed_weight_change_fingerprint(tiny_base):
    from mos.shared.sd.base import fingerprint, load_base

    other = load_base("tiny:1")
    assert other.fingerprint != tiny_base.fingerprint
    models = {"text_encoder": tiny_base.text_encoder, "unet": tiny_base.unet, "vae": tiny_base.vae}
    before = fingerprint(tiny_base.tokenizer, models, tiny_base.scheduler_config)
    assert before == tiny_base.fingerprint
    w = tiny_base.unet.conv_in.weight
    old = w[0, 0, 0, 0].item()
    with torch.no_grad():
        w[0, 0, 0, 0] = old + 1e-3
    try:
        assert fingerprint(tiny_base.tokenizer, models, tiny_base.scheduler_config) != before
    finally:
        with torch.no_grad():
            w[0, 0, 0, 0] = old


def test_sd15_random_is_built_once_then_read_back(tiny_base, tmp_path, monkeypatch):
    """sd15-random's first load writes its folder and the next reads it back instead of building it again. Here its
    recipe is swapped for tiny's (SD1.5's 4 GB are not built in the suite): the same seed and recipe then give
    tiny's own weights, so both loads must carry tiny's fingerprint."""
    from mos.shared.sd import architectures, base

    monkeypatch.setenv("MOS_HOME", str(tmp_path))
    monkeypatch.setattr(architectures, "sd15", architectures.tiny)
    first = base.load_base("sd15-random")
    assert (tmp_path / "bases" / f"sd15-random-v{base.FORMAT_VERSION}-seed0" / "unet").is_dir()
    monkeypatch.setattr(base, "build_random", lambda *a: pytest.fail("sd15-random was built again"))
    again = base.load_base("sd15-random")
    assert first.fingerprint == again.fingerprint == tiny_base.fingerprint


def test_save_load_roundtrip_gives_identical_unet_outputs(tiny_base, tmp_path):
    from mos.shared.sd.base import load_base

    for name in ("unet", "text_encoder", "vae"):
        getattr(tiny_base, name).save_pretrained(tmp_path / name, safe_serialization=True)
    from mos.shared.sd.base import tiny_folder

    for name in ("tokenizer", "scheduler"):
        shutil.copytree(tiny_folder() / name, tmp_path / name)
    again = load_base(str(tmp_path))
    assert again.fingerprint == tiny_base.fingerprint
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        a = tiny_base.unet(x, 500, c).sample
        b = again.unet(x, 500, c).sample
    assert torch.equal(a, b)


def test_base_info_lists_layers_and_shared_sites():
    info = json.loads(run_cli("mos", "base", "info", "--base", "tiny", "--json").stdout)
    assert info["cross_attention_layers"] == 16
    names = info["cross_attention_layer_names"]
    assert names[6].startswith("mid_block") and names[7].startswith("up_blocks")  # down -> mid -> up
    sites = {s["site"]: s for s in info["input_sites"]}
    qkv = [s for s in sites.values() if s["site"].endswith("attn1.qkv")]
    assert len(qkv) == 16
    assert [l["name"].rsplit(".", 1)[1] for l in qkv[0]["layers"]] == ["to_q", "to_k", "to_v"]
    kv = [s for s in sites.values() if s["site"].endswith("attn2.kv")]
    assert len(kv) == 16 and all(s["dim"] == 32 and s["stage"] == 2 for s in kv)
    te = [s for s in sites.values() if s["site"].startswith("text_encoder.")]
    assert len(te) == 8 and all(s["stage"] == 1 for s in te)
    # every LoRA target appears exactly once
    layers = [l["name"] for s in info["input_sites"] for l in s["layers"]]
    assert len(layers) == len(set(layers)) == 4 * 4 + 16 * 8


def test_bad_base_paths_give_clear_errors(tmp_path):
    from mos.shared.sd.base import BaseModelError, load_base

    with pytest.raises(BaseModelError, match="neither tiny"):
        load_base(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="lacks tokenizer/, text_encoder/, unet/, vae/, scheduler/"):
        load_base(str(tmp_path / "empty"))
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really")
    with pytest.raises(BaseModelError, match="pickle checkpoints are refused"):
        load_base(str(ckpt))
    from mos.shared.sd.base import tiny_folder

    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder(), broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(BaseModelError, match="cannot read unet/"):
        load_base(str(broken))
    proc = run_cli("mos", "base", "info", "--base", str(tmp_path / "empty"), check=False)
    assert proc.returncode == 2 and "lacks" in proc.stderr and "Traceback" not in proc.stderr


def test_device_and_dtype_choice():
    from mos.shared.sd.base import pick_device, pick_dtype

    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype(torch.device("cpu"), "fp8")
    assert pick_device("cpu").type == "cpu"


@pytest.mark.skipif(not os.environ.get("MOS_SD15_PATH"), reason="needs real SD1.5 weights: set MOS_SD15_PATH to a "
                    "local diffusers folder or .safetensors file")
def test_real_sd15_loads_offline():
    from mos.shared.sd.base import load_base

    base = load_base(os.environ["MOS_SD15_PATH"])
    assert base.resolution == 512 and len(base.fingerprint) == 32
