"""The ServerApp's logic: rounds of staged fusion over Flower, driven by the same `run_fusion` as `mos fuse`.

The app bundle Flower ships (server/flwr_app) only imports `main` from here. Settings are the run's Flower run
config (mos.server.settings). Progress lines go to stdout (`flwr log`) and to STATE/progress.log, which
`mos-server` shows.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid

from mos.server.flower_runner import FlowerRunner, fmt_bytes, send_notices
from mos.server.settings import Settings
from mos.server.state import ServerState
from mos.shared.federation import wire
from mos.shared.files import read_json, write_json
from mos.shared.formats import adapter as adapter_io
from mos.shared.fusion.driver import Fusion, FusionError, run_fusion
from mos.shared.runtime import limit_threads
from mos.shared.sd.base import load_base

NOTICE_WAIT_S = 120.0  # how long the end of a round waits for clients to read why they are out


class Progress:
    """One line per event, to stdout and to a file that mos-server tails."""

    def __init__(self, path: Path):
        self.path = path
        self.prefix = ""

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {self.prefix}{msg}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def wait_for_clients(grid: Grid, n: int, exclude: set[int], say: Progress) -> list[int]:
    """Block until n clients that have not been served yet are connected; take every such client then."""
    last = -1
    while True:
        nodes = sorted(set(grid.get_node_ids()) - exclude)
        if len(nodes) != last:
            say(f"clients connected: {len(nodes)}/{n}" + ("" if len(nodes) >= n else " (waiting)"))
            last = len(nodes)
        if len(nodes) >= n:
            time.sleep(1.0)  # clients started together arrive within moments of each other
            return sorted(set(grid.get_node_ids()) - exclude)
        time.sleep(1.0)


def main(grid: Grid, context: Context) -> None:
    settings = Settings.from_run_config(dict(context.run_config))
    state_dir, out = Path(settings.state_dir), Path(settings.out)
    say = Progress(state_dir / "progress.log")
    say(f"ServerApp started (run {context.run_id}); loading base {settings.base}")
    base = load_base(settings.base)
    limit_threads(base)
    fusion_config = settings.fusion.resolved(base.spec)
    manifest = wire.BaseManifest.from_base(base, fusion_config.placement)
    state = ServerState(state_dir, base.fingerprint)
    # The gateway (server/gateway.py, in mos-server) refuses a reply's objects past this many bytes.
    write_json(state_dir / "limits.json", {"upload_cap": wire.upload_cap(manifest, fusion_config.one_shot,
                                                                            fusion_config.uses_heldout)})
    bounds = state.bounds(base, fusion_config.placement)
    keys = node_keys(state_dir)
    served: set[int] = set()
    failed: list[str] = []
    for _ in range(settings.rounds):
        r, resumed = state.open_round()
        say.prefix = f"[round {r}] "
        if resumed:
            say(f"resuming: the server stopped during this round; held concepts: "
                f"{', '.join(state.known(r)) or 'none'}")
        nodes = wait_for_clients(grid, settings.min_clients, served, say)
        runner = FlowerRunner(grid, Fusion(base.fingerprint, list(manifest.sites), fusion_config, bounds,
                                                spill=state.round_dir(r) / ".fusion"), manifest,
                              state, r, nodes, settings.stage_timeout, say, keys)
        served |= set(nodes)
        try:
            result = run_fusion(runner, runner.fusion)
            if not result.concepts:
                raise FusionError("every client left the round")
        except FusionError as e:
            say(f"round failed: {e}")
            state.fail_round(r, str(e), runner.fusion.report())
            failed.append(f"round {r}: {e}")
            runner.notify({n: ("dropped", f"round {r} failed: {e}") for n in runner.members})
            runner.await_notices(NOTICE_WAIT_S)
            continue
        except Exception as e:  # a bug or a broken state folder: clients must not wait for a result forever
            say(f"round failed on the server: {type(e).__name__}: {e}")
            state.fail_round(r, f"{type(e).__name__}: {e}", {})
            runner.notify({n: ("dropped", f"the server failed in round {r}: {type(e).__name__}") for n in runner.members})
            runner.await_notices(NOTICE_WAIT_S)
            raise
        write_round(out / f"round-{r}", result, runner, settings, base, say)
        acked = runner.send_result((out / f"round-{r}" / adapter_io.FILENAME).read_bytes())
        state.complete_round(r, [c.name for c in result.concepts], result.meta.get("fusion", {}))
        say(f"round complete: {', '.join(c.handle for c in result.concepts)} -> {out / f'round-{r}'}; "
            f"result confirmed by {', '.join(acked) or 'no client'}")
        runner.await_notices(min(settings.stage_timeout, NOTICE_WAIT_S))
    say.prefix = ""
    leftover = sorted(set(grid.get_node_ids()) - served)
    if leftover:
        pending = send_notices(grid, {n: ("finished", "the server finished its rounds before this client could "
                                          "join") for n in leftover}, 0, NOTICE_WAIT_S)
        t0 = time.time()
        while pending and time.time() - t0 < NOTICE_WAIT_S:
            for reply in grid.pull_messages(list(pending)):
                pending.pop(reply.metadata.reply_to_message_id, None)
            time.sleep(0.5)
    say("ServerApp finished")
    if failed:  # the run ends as failed, so mos-server exits non-zero
        raise RuntimeError(f"{len(failed)} round(s) failed: {'; '.join(failed)}")


def node_keys(state_dir: Path) -> dict[int, str]:
    """node id -> registered key id, as mos-server wrote them (empty without --auth-keys)."""
    nodes = read_json(state_dir / "nodes.json") or {}
    return {int(n): str(v["key"]) for n, v in nodes.items() if str(n).isdigit() and isinstance(v, dict)}


def write_round(folder: Path, result, runner: FlowerRunner, settings: Settings, base, say: Progress) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    adapter_io.save(result, folder / adapter_io.FILENAME)
    report = dict(result.meta.get("fusion", {}))
    report["round"] = runner.round
    report["base"] = {"spec": settings.base, "fingerprint": result.fingerprint}
    report["one_shot"] = settings.fusion.one_shot
    report["gram_dtype"] = settings.fusion.gram_dtype
    report["clients"] = {m.name: {"node": str(n), "bytes_up": m.bytes_up, "seconds": m.seconds, "cache": m.cache}
                         for n, m in runner.members.items()}
    report["left"] = {str(n): {"concept": c, "kind": k, "reason": why} for n, (c, k, why) in runner.out.items()}
    report["from_state"] = sorted(runner.from_state)
    report["traffic"] = runner.traffic
    write_json(folder / "fusion.json", report)
    total = sum(t["up"] + t["down"] for t in runner.traffic.values())
    say(f"wrote {folder / adapter_io.FILENAME} and fusion.json ({fmt_bytes(total)} on the wire this round)")
    if settings.preview:
        try:
            from mos.shared.sampling.preview import write_preview

            write_preview(base, result, folder / "preview.png", steps=settings.preview_steps)
            say(f"wrote {folder / 'preview.png'}")
        except Exception as e:  # a preview is a nicety: never lose a round over it
            print(f"preview failed: {type(e).__name__}: {e}", file=sys.stderr)
