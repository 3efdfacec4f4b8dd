"""The README's main job on its default base: the demo round (scripts/demo_round.sh, what `bash scripts/demo.sh`
runs after setting up) on the world base — a server and two clients with the world's recipe (LoRA on attention,
feed-forward, projections and convolutions, all fused over the wire) — ends with the same fused adapter at every
party and a picture of both concepts. Tuning is cut to a few steps here: whether the concepts are recognisable is
`mos eval world`'s question (docs/world.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mos.shared.federation.flower_procs import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_round_on_the_world_base(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "STATE": str(tmp_path / "state"), "BASE": "world", "STEPS": "4",
           "PORT": str(free_port()), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo_round.sh")], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert Image.open(out / "together.png").size == (64, 64)
    assert (out / "together_layout.png").is_file()
    sketch = json.loads((out / "together.json").read_text())["t2i"]["conditions"]["sketch"]  # the layout adapter
    assert sketch["image"].endswith("together_sketch.png") and sketch["adapter"].endswith("world/layout")
    report = json.loads((out / "server" / "round-1" / "fusion.json").read_text())
    assert report["config"]["placement"] == "wide" and [c["name"] for c in report["concepts"]] == ["alice", "bob"]
    convs = [s for s in report["residuals"]["alice"] if ".resnets." in s]
    assert convs, "the convolutions' sites were fused"
