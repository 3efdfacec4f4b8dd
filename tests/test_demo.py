"""The README's main job on its default base: the demo round (scripts/demo_round.sh, what `bash scripts/demo.sh`
runs after setting up) on the world base — a server and two clients with the world's recipe (LoRA on attention,
feed-forward, projections and convolutions, all fused over the wire) — ends with the same fused adapter at every
party and a picture of both concepts, each recognised by the world's judge in its own half. It runs the round as
the README's command does, with the recipe's full tuning (about 6 minutes on 2 cores): the picture is what a user
sees, so the test judges that picture and no shortcut of it (docs/world.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mos.client.evaluation.world import column_box
from mos.shared.federation.flower_procs import free_port
from mos.shared.world.judge import Judge

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_round_on_the_world_base(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "STATE": str(tmp_path / "state"), "BASE": "world", "STEPS": "",
           "PORT": str(free_port()), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "demo_round.sh")], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    together = Image.open(out / "together.png")
    assert together.size == (128, 64)  # each half a picture of the base's own size
    seen = [g["object"] for g in Judge()(together, [column_box(0, 2), column_box(1, 2)])]
    assert seen == ["alice", "bob"], f"the judge sees {seen} in the halves of {out / 'together.png'}"
    assert (out / "together_layout.png").is_file()
    sketch = json.loads((out / "together.json").read_text())["t2i"]["conditions"]["sketch"]  # the layout adapter
    assert sketch["image"].endswith("together_sketch.png") and sketch["adapter"].endswith("world/layout")
    report = json.loads((out / "server" / "round-1" / "fusion.json").read_text())
    assert report["config"]["placement"] == "wide" and [c["name"] for c in report["concepts"]] == ["alice", "bob"]
    convs = [s for s in report["residuals"]["alice"] if ".resnets." in s]
    assert convs, "the convolutions' sites were fused"
