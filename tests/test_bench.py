"""bench/gpu.sh runs on a machine without a GPU (tiny base, CPU, smallest settings), so the GPU check cannot rot:
every part exits 0 and gpu.json carries its figures. The measurements themselves are not checked (benches
print and write JSON; docs/figures.md holds the figures). bench/lora_forward.py runs on the world base the same
way; what it checks is that its two LoRA forms agree. bench/regional.py's batch comparison runs on tiny, and
bench/ridge.py at its quick size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GPU_SH = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"


def run_gpu_sh(out: Path, parts: str, timeout: float) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "PARTS": parts}
    proc = subprocess.run(["bash", str(GPU_SH), "--quick", str(out)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu.json").read_text())
    assert result["mode"] == "cpu-tiny" and set(result["exit_codes"].values()) == {0}
    return result


def test_gpu_script_step_stats_and_regional_run_on_cpu(tmp_path):
    s = run_gpu_sh(tmp_path, "step stats regional", 300)["summary"]
    assert set(s["step"]["ms"]) == {"lora", "edlora", "edlora_masked"} and s["step"]["ratio_edlora_over_lora"] > 0
    assert set(s["stats"]) == {"stage1", "stage2", "stage3"} and all(v["s"] > 0 for v in s["stats"].values())
    assert set(s["regional"]) == {"1_regions_wall_ratio", "2_regions_wall_ratio", "4_regions_wall_ratio",
                                  "plain_wall_s"}


@pytest.mark.slow
def test_gpu_script_round_runs_on_cpu(tmp_path):
    r = run_gpu_sh(tmp_path, "round", 600)["summary"]["round"]
    assert r["finished"] and r["same_adapter"]
    assert set(r["stage_s"]) == {"train.tune", "query.kv", "query.spatial", "train.result"}


def test_lora_forward_bench_runs_and_its_forms_agree(tmp_path):
    """bench/lora_forward.py on the world base (whose layers merge): it writes its JSON, and the two forms agree."""
    out = tmp_path / "lora_forward.json"
    bench = GPU_SH.parent / "lora_forward.py"
    proc = subprocess.run([sys.executable, str(bench), "--base", "world", "--steps", "1", "--warmup", "0",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["agreement"]["grad_rel_diff_max"] < 1e-4 and r["agreement"]["loss_rel_diff"] < 1e-5
    assert r["layers_merged"]["tune"]["merged"] > 0 and set(r["ratio_merged_over_peft"]) == {"tune", "sample"}


def test_regional_bench_times_pictures_one_by_one_against_one_batch(tmp_path):
    out = tmp_path / "regional.json"
    proc = subprocess.run([sys.executable, str(GPU_SH.parent / "regional.py"), "--base", "tiny", "--steps", "2",
                           "--reps", "2", "--batch", "3", "--out", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    b = json.loads(out.read_text())["batch"]
    assert b["pictures"] == 3 and len(b["batched"]["wall_times_s"]) == len(b["one_by_one"]["wall_times_s"]) == 2
    assert b["batched"]["wall_ratio_paired"] > 0 and "one batch" in proc.stdout


def test_ridge_bench_runs_and_its_held_out_choice_picks_from_the_grid(tmp_path):
    out = tmp_path / "ridge.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "ridge.py"
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mos.shared.fusion.solver import _GCV_EPS

    result = json.loads(out.read_text())
    for row in result["problems"]:
        assert set(row["methods"]) == {"lbfgs", "eps=1e-2", "eps=1e-3", "eps=1e-8", "gcv", "heldout"}
        held = row["methods"]["heldout"]
        assert min(abs(held["eps"] - g) for g in _GCV_EPS.tolist()) <= 1e-9 * held["eps"]
        assert 0 < held["fit_rel"] < 1 and 0 < held["held_rel"] < 1  # better than leaving W0, on both row sets
    names = {f"{r['kind']} {r['d_in']}->{r['d_out']}" for r in result["problems"]}
    assert set(result["summary"]["heldout_eps"]) == names
