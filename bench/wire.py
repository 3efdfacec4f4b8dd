"""Bytes on the wire per client and stage of the federated protocol; not a test.

tiny    measured: the real stage functions run on random rank-4 concepts and every payload is encoded exactly as
        mos-server / mos-client encode it (mos.shared.federation.wire), without Flower processes.
sd15    computed from `mos base info --base sd15-random --json` (site dimensions) and the row counts measured on
        tiny, scaled to SD1.5's 64x64 latents (the layouts match, so every site sees (64/8)^2 times the tokens).
Both with float32 Grams (the default) and float64 (`mos-server --gram-dtype float64`). Target: <= 150 MB per
client in total for SD1.5. Tiny's stage 3 carries its held-out share (the default there); SD1.5's does not (its
default is a fixed ε; `--eps heldout` would add as many bytes again to query.spatial's upload: at these row counts
every spatial Gram is sent whole).

Usage (from the repo root, package installed):
    python bench/wire.py [--concepts 2] [--info sd15.json] [--out bench/results/wire.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import RecordDict

from mos.shared.federation import gram_codec, wire
from mos.shared.formats import adapter as adapter_io
from mos.shared.formats.adapter import Adapter
from mos.shared.fusion.config import FusionConfig, heldout_by_default
from mos.shared.fusion.driver import Fusion, run_fusion
from mos.shared.fusion.local import LocalRunner
from mos.shared.sd.base import load_base
from mos.shared.sd.concepts import N_TOKENS, Concept
from mos.shared.sd.model import ConceptModel

RANK = 4
STAGES = ("train.tune", "query.kv", "query.spatial", "train.result")


def random_adapter(base, name: str, class_word: str, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    model = ConceptModel(copy.deepcopy(base))
    emb = model.prompts.init_embeddings(class_word, g)
    lora = {layer: (0.1 * torch.randn(o, RANK, generator=g), torch.randn(RANK, s.dim, generator=g) / s.dim ** 0.5)
            for s in wire.BaseManifest.from_base(base).sites for layer, o in zip(s.layers, s.out_dims)}
    return Adapter(base.fingerprint, [Concept(name, class_word, emb)], lora)


class MeasuringRunner(LocalRunner):
    """The local driver, with every payload encoded as the Flower path encodes it; records bytes and rows."""

    def __init__(self, base, adapters, dtype: str):
        super().__init__(base, adapters, progress=False)
        self.dtype = dtype
        self.bytes: dict[str, dict[str, dict[str, int]]] = {}  # concept -> stage -> {"up", "down"}
        self.rows: dict[str, int] = {}

    def note(self, name: str, stage: str, up: RecordDict | None = None, down: RecordDict | None = None) -> None:
        b = self.bytes.setdefault(name, {}).setdefault(stage, {"up": 0, "down": 0})
        b["up"] += wire.record_bytes(up) if up is not None else 0
        b["down"] += wire.record_bytes(down) if down is not None else 0

    def stage1(self, config):
        config = replace(config, gram_dtype=self.dtype)
        out = super().stage1(config)
        fp = self.base.fingerprint
        for name, (adapter, stats) in out.items():
            up = wire.encode_stats(wire.encode_concept(RecordDict(), adapter), 1, name, fp, stats, dtype=self.dtype)
            self.note(name, "train.tune", up, wire.encode_tune(fp, 1, config, []))
            self.rows |= {s: g.rows for s, g in stats.items()}
        return out

    def _stage(self, stage: int, kind: str, fused, concepts, config, out):
        down = wire.encode_fused(stage - 1, fused, concepts, self.base.fingerprint, 1, replace(config, gram_dtype=self.dtype))
        for name, stats in out.items():
            self.note(name, kind, wire.encode_stats(RecordDict(), stage, name, self.base.fingerprint, stats,
                                                    dtype=self.dtype), down)
            self.rows |= {s: g.rows for s, g in stats.items()}
        return out

    def stage2(self, fused_te, concepts, config):
        return self._stage(2, "query.kv", fused_te, concepts, config, super().stage2(fused_te, concepts, config))

    def stage3(self, fused, concepts, config):
        return self._stage(3, "query.spatial", fused, concepts, config, super().stage3(fused, concepts, config))


def measure_tiny(n: int, dtype: str) -> tuple[dict, dict[str, int], dict]:
    base = load_base("tiny")
    torch.set_num_threads(1)
    adapters = [random_adapter(base, f"c{i}", "dog", i) for i in range(n)]
    runner = MeasuringRunner(base, adapters, dtype)
    t0 = time.time()
    # stage 3 with its held-out share, as the tiny base's default; SD1.5 (below) keeps ε by default and sends none
    config = FusionConfig(heldout=heldout_by_default("tiny"))
    result = run_fusion(runner, Fusion(base.fingerprint, list(wire.BaseManifest.from_base(base).sites), config))
    with tempfile.TemporaryDirectory() as tmp:
        data = adapter_io.save(result, Path(tmp) / adapter_io.FILENAME).read_bytes()
    final = wire.encode_fused(4, {}, [], base.fingerprint, 1, adapter_file=data)
    for name in runner.bytes:
        runner.note(name, "train.result", RecordDict(), final)
    per_client = runner.bytes[adapters[0].concepts[0].name]
    return per_client, runner.rows, {"seconds": round(time.time() - t0, 1)}


def sd15_info(path: str | None) -> dict:
    if path:
        return json.loads(Path(path).read_text())
    exe = Path(sys.executable).parent / "mos"
    out = subprocess.run([str(exe), "base", "info", "--base", "sd15-random", "--json"], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def lora_bytes(layers: list[tuple[int, int]], rank: int, dtype_bytes: int = 4) -> int:
    """A LoRA of `rank` on each (in, out) layer; the fused one turns dense where that is smaller."""
    return sum(min(rank, i, o) * (i + o) * dtype_bytes for i, o in layers)


def compute_sd15(info: dict, tiny_rows: dict[str, int], n: int, dtype: str, scale: int) -> dict:
    """Bytes per client and stage for SD1.5 site dimensions, from the same encodings."""
    sites = info["input_sites"]
    L, dim = info["cross_attention_layers"], 768
    emb = L * N_TOKENS * dim * 4

    def rows_of(site: dict) -> int:
        name = site["site"]
        if name.startswith("text_encoder."):  # every text layer sees the same tokens; tiny has 4 layers, SD1.5 12
            return tiny_rows["text_encoder.encoder.layers.0.self_attn." + name.rsplit(".", 1)[1]]
        r = tiny_rows[name]  # UNet site names match: the tiny base has SD1.5's block layout
        return r * scale if site["stage"] == 3 else r  # k/v rows are text tokens: no image-size factor

    def grams(stage: int) -> int:
        return sum(gram_codec.gram_wire_bytes(s["dim"], rows_of(s), dtype) for s in sites if s["stage"] == stage)

    def layers(stages: tuple[int, ...]) -> list[tuple[int, int]]:
        return [(s["dim"], l["out_dim"]) for s in sites if s["stage"] in stages for l in s["layers"]]

    own = lora_bytes(layers((1, 2, 3)), RANK) + emb
    return {
        "train.tune": {"up": own + grams(1), "down": 0},
        "query.kv": {"up": grams(2), "down": lora_bytes(layers((1,)), n * RANK) + n * emb},
        "query.spatial": {"up": grams(3), "down": lora_bytes(layers((1, 2)), n * RANK) + n * emb},
        "train.result": {"up": 0, "down": lora_bytes(layers((1, 2, 3)), n * RANK) + n * emb},
    }


def table(name: str, data: dict) -> None:
    total = 0
    print(f"\n{name}")
    print(f"  {'stage':<14}{'up':>14}{'down':>14}")
    for stage in STAGES:
        b = data[stage]
        total += b["up"] + b["down"]
        print(f"  {stage:<14}{b['up'] / 1e6:>12.3f} MB{b['down'] / 1e6:>11.3f} MB")
    print(f"  {'total':<14}{total / 1e6:>26.3f} MB")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concepts", type=int, default=2, help="concepts fused (downloads grow with it)")
    p.add_argument("--info", default=None, help="saved `mos base info --base sd15-random --json` output")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "wire.json"))
    args = p.parse_args()
    info = sd15_info(args.info)
    if not args.info:  # keep it: building SD1.5 with random weights takes a while
        Path(args.out).with_name("sd15_info.json").write_text(json.dumps(info))
    report = {"concepts": args.concepts, "rank": RANK, "target_sd15_mb_per_client": 150, "tiny": {}, "sd15": {}}
    scale = (64 // 8) ** 2
    for dtype in ("float32", "float64"):
        tiny, rows, meta = measure_tiny(args.concepts, dtype)
        sd15 = compute_sd15(info, rows, args.concepts, dtype, scale)
        for key, data in (("tiny", tiny), ("sd15", sd15)):
            total = sum(b["up"] + b["down"] for b in data.values())
            report[key][dtype] = {"per_stage": data, "total_bytes": total, "total_mb": round(total / 1e6, 3)}
            table(f"{key}, Grams as {dtype}, {args.concepts} concepts (bytes per client)", data)
        report["tiny"][dtype]["measured_in_s"] = meta["seconds"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    ok = report["sd15"]["float32"]["total_mb"] <= 150
    print(f"\nSD1.5 per client (float32 Grams): {report['sd15']['float32']['total_mb']:.1f} MB "
          f"({'within' if ok else 'over'} the 150 MB target) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
