"""Many real clients in one round: one `mos-server` and N `mos-client --adapter` processes on this machine; not a test.

For each N (default 2, 4, 8) it starts a fresh server (`--min-clients N`, its own state and output folders) and N
clients, each bringing its own pre-tuned adapter, and records:
  - wall time: from start to the last party's exit, per protocol stage (the server's own timing in fusion.json:
    send to last reply) and per client (each client's reply times, as the server saw them);
  - memory: peak RSS of the server's process tree (mos-server, SuperLink, ServerApp), of the largest single
    server process, of each client's tree, and of all parties together, sampled from /proc every 0.2 s;
  - bytes on the wire, per stage and per client, as the server counted them (fusion.json `traffic`, `clients`);
  - that the round finished: every party exited 0, and every party holds the same adapter (the server's
    round-1/adapter.safetensors and each client's adapter.safetensors: same tensor names, equal tensors).

Adapters: concept folders copied from data/{alice,bob,carol} under distinct names (alice0, bob1, carol2,
alice3, ...) and tuned once on the chosen base with `--tune-steps` steps and seed i into the cache folder (later
runs reuse them: same data, settings and base). The round's sampling is kept small (`--sample-steps`, no
previews, no merged pipelines) so N = 8 finishes on 2 cores in a few minutes.

Usage (repo root, package installed; Linux: reads /proc):
    python bench/many_clients.py                       # N = 2, 4, 8 on tiny
    python bench/many_clients.py --ns 8 --sample-steps 4
Writes JSON (default bench/results/many_clients.json) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from mos.shared.federation.flower_procs import descendants, free_port
from mos.shared.files import read_json, write_json
from mos.shared.formats import adapter as adapter_io
from mos.shared.sd.base import mos_home

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SOURCES = ["alice", "bob", "carol"]
SAMPLE_S = 0.2
# the server's line closing each stage, e.g. "train.result  done: 2/2 replied, 932.1 kB down, 122 B up, 5.7 s"
DONE = re.compile(r"\]\s+(\S+)\s+done: (\d+)/(\d+) replied, ([\d.]+ \w?B) down, ([\d.]+ \w?B) up, ([\d.]+) s$")
UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}  # as the server prints them (flower_runner.fmt_bytes)


def parse_bytes(text: str) -> int:
    value, unit = text.split()
    return round(float(value) * UNITS[unit])


def concept_names(n: int) -> list[str]:
    return [f"{SOURCES[i % len(SOURCES)]}{i}" for i in range(n)]


def prepare_adapters(n: int, base: str, steps: int, cache: Path, device: str | None = None) -> dict[str, Path]:
    """name -> tuned adapter folder; tunes (in this process, as `mos tune` does) only what the cache lacks."""
    from mos.client.tuning.edlora import TuneConfig
    from mos.client.tuning.tune import run_tune
    from mos.shared.sd.base import load_base

    out, loaded = {}, None  # one base serves every cached adapter (loading and fingerprinting one takes seconds)
    for i, name in enumerate(concept_names(n)):
        src = REPO / "data" / SOURCES[i % len(SOURCES)]
        folder = cache / "concepts" / name
        if not folder.is_dir():  # a copy under another name: the name is what makes it another concept
            tmp = folder.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp)
            toml = (tmp / "concept.toml").read_text()
            (tmp / "concept.toml").write_text(toml.replace(f'name = "{src.name}"', f'name = "{name}"'))
            tmp.rename(folder)
        t0 = time.perf_counter()
        loaded = loaded or load_base(base, device)
        run = run_tune(folder, cache / "adapters" / f"{base.replace(':', '_')}-{steps}steps" / name,
                       TuneConfig(steps=steps, seed=i), loaded, device=device, progress=False)
        if not run.reused:
            loaded = None  # tuning put LoRA on it: the next concept needs a clean base
        out[name] = run.out
        print(f"adapter {name}: {out[name]} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def rss_mib(pid: int) -> float:
    """Resident set of one process in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


class Sampler(threading.Thread):
    """Peak RSS of process trees (each root and everything it started), polled until stopped."""

    def __init__(self, roots: dict[str, int]):
        super().__init__(daemon=True)
        self.roots = roots
        self.peak_tree = {k: 0.0 for k in roots}
        self.peak_single = {k: 0.0 for k in roots}
        self.peak_all = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0.0
            for name, pid in self.roots.items():
                sizes = [rss_mib(p) for p in [pid, *descendants(pid)]]
                self.peak_tree[name] = max(self.peak_tree[name], sum(sizes))
                self.peak_single[name] = max(self.peak_single[name], max(sizes))
                total += sum(sizes)
            self.peak_all = max(self.peak_all, total)
            self.stop.wait(SAMPLE_S)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a party we started and everything below it (Flower starts some processes in sessions of their own)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    proc.wait(30)


def same_adapter(paths: list[Path]) -> dict[str, Any]:
    """Whether every file holds the same tensors (names, shapes and values) and the same concepts."""
    first = adapter_io.load(paths[0])
    ref = first.lora
    differ = []
    for p in paths[1:]:
        other = adapter_io.load(p)
        same = sorted(other.lora) == sorted(ref) and all(
            torch.equal(other.lora[k][0], B) and torch.equal(other.lora[k][1], A) for k, (B, A) in ref.items())
        same = same and [c.name for c in other.concepts] == [c.name for c in first.concepts] and all(
            torch.equal(a.embeddings, b.embeddings) for a, b in zip(first.concepts, other.concepts))
        if not same:
            differ.append(str(p))
    return {"files": len(paths), "lora_tensors": 2 * len(ref), "concepts": [c.name for c in first.concepts],
            "all_equal": not differ, "differ": differ,
            "bytes_equal": len({p.read_bytes() for p in paths}) == 1}


def one_round(n: int, adapters: dict[str, Path], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One round with N clients in `work`; the parties' figures and checks."""
    names = list(adapters)[:n]
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads),
           "FLWR_TELEMETRY_ENABLED": "0", "TRANSFORMERS_VERBOSITY": "error"}
    logs = work / "logs"
    logs.mkdir(parents=True)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, cmd: list[str]) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True)

    t0 = time.perf_counter()
    start("server", ["mos-server", "--port", str(port), "--base", args.base, "--min-clients", str(n),
                     "--stage-timeout", str(args.stage_timeout), "--sample-steps", str(args.sample_steps),
                     "--no-preview", "--out", str(work / "out" / "server"), "--state-dir", str(work / "state")])
    for name in names:
        start(name, ["mos-client", "--adapter", str(adapters[name]), "--base", args.base, "--server",
                     f"127.0.0.1:{port}", "--no-pipeline", "--out", str(work / "out" / name),
                     *(["--device", args.device] if args.device else [])])
    sampler = Sampler({k: p.pid for k, p in procs.items()})
    sampler.start()
    exits: dict[str, int | None] = {}
    ended: dict[str, float] = {}
    try:
        while len(exits) < len(procs):
            for name, p in procs.items():
                if name not in exits and p.poll() is not None:
                    exits[name], ended[name] = p.returncode, time.perf_counter() - t0
            if time.perf_counter() - t0 > args.round_timeout:
                break
            time.sleep(0.5)
    finally:
        for name, p in procs.items():
            if p.poll() is None:
                kill_tree(p)
                exits.setdefault(name, None)
        sampler.stop.set()
        sampler.join()
    wall = time.perf_counter() - t0

    report = read_json(work / "out" / "server" / "round-1" / "fusion.json") or {}
    files = [work / "out" / "server" / "round-1" / adapter_io.FILENAME,
             *(work / "out" / name / adapter_io.FILENAME for name in names)]
    check = same_adapter(files) if all(f.is_file() for f in files) else {
        "all_equal": False, "missing": [str(f) for f in files if not f.is_file()]}
    traffic = report.get("traffic", {})
    clients = report.get("clients", {})
    # fusion.json is written before train.result (the fused adapter's delivery) runs: stage times, and that
    # stage's bytes (to 0.1 kB), come from the server's log; the other stages' bytes are fusion.json's exact counts
    done = {m[1]: {"seconds": float(m[6]), "replied": f"{m[2]}/{m[3]}", "bytes_up": parse_bytes(m[5]),
                   "bytes_down": parse_bytes(m[4])}
            for line in (logs / "server.log").read_text(errors="replace").splitlines() if (m := DONE.search(line))}
    for k, v in done.items():
        if k in traffic:
            v["bytes_up"], v["bytes_down"] = traffic[k]["up"], traffic[k]["down"]
    result = {
        "n": n, "wall_s": round(wall, 1), "exit_codes": exits,
        "exited_s": {k: round(v, 1) for k, v in ended.items()},
        "round_finished": all(v == 0 for v in exits.values()) and bool(report),
        "same_adapter": check,
        "fused_concepts": [c["name"] for c in report.get("concepts", [])],
        "dropped": report.get("dropped", {}),
        "stages": done,
        "bytes_total": sum(v["bytes_up"] + v["bytes_down"] for v in done.values()),
        "clients": {k: {"bytes_up": sum(c.get("bytes_up", {}).values()), "seconds": c.get("seconds", {})}
                    for k, c in clients.items()},
        "server_peak_rss_mib": round(sampler.peak_tree["server"], 1),
        "server_largest_process_peak_rss_mib": round(sampler.peak_single["server"], 1),
        "client_peak_rss_mib": {k: round(sampler.peak_tree[k], 1) for k in names},
        "all_parties_peak_rss_mib": round(sampler.peak_all, 1),
        "logs": str(logs),
    }
    if not result["round_finished"] or not check.get("all_equal"):
        for name in ["server", *names]:
            tail = (logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            print(f"--- {name} (exit {exits.get(name)}):\n" + "\n".join(tail), file=sys.stderr)
    return result


def mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def print_table(rounds: list[dict[str, Any]]) -> None:
    stages = list(dict.fromkeys(s for r in rounds for s in r["stages"]))
    head = f"{'N':>3} {'ok':>3} {'same':>5} {'wall s':>7} " + " ".join(f"{s + ' s':>16}" for s in stages)
    print(head + f" {'MiB wire':>9} {'server RSS':>11} {'largest':>8} {'client RSS':>11} {'all RSS':>8}")
    for r in rounds:
        cl = r["client_peak_rss_mib"].values()
        print(f"{r['n']:>3} {'yes' if r['round_finished'] else 'NO':>3} "
              f"{'yes' if r['same_adapter'].get('all_equal') else 'NO':>5} {r['wall_s']:>7.1f} "
              + " ".join(f"{(r['stages'].get(s) or {}).get('seconds') or 0:>16.1f}" for s in stages)
              + f" {mib(r['bytes_total']):>9} {r['server_peak_rss_mib']:>11.0f} "
              f"{r['server_largest_process_peak_rss_mib']:>8.0f} {max(cl, default=0):>11.0f} "
              f"{r['all_parties_peak_rss_mib']:>8.0f}")
    print("stage columns: the server's time from sending a stage to its last reply; RSS in MiB (peaks: server "
          "tree, its largest process, the largest client tree, all parties together)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ns", default="2,4,8", help="client counts, comma-separated (default 2,4,8)")
    ap.add_argument("--base", default="tiny", help="tiny (default) or world")
    ap.add_argument("--device", default=None, help="clients' (and tuning's) device; default: cuda when present. "
                    "The server's ServerApp picks its own (cuda when present)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of each process (torch here, "
                    "OMP_NUM_THREADS for the parties; default 1: N parties share 2 cores here)")
    ap.add_argument("--tune-steps", type=int, default=10, help="tuning steps of each cached adapter (default 10)")
    ap.add_argument("--sample-steps", type=int, default=4, help="the server's --sample-steps (stage 3; default 4)")
    ap.add_argument("--stage-timeout", type=float, default=900.0)
    ap.add_argument("--round-timeout", type=float, default=1800.0, help="give up on a round after this long")
    ap.add_argument("--cache", default=str(mos_home() / "bench-many-clients"), help="concept copies and tuned "
                    "adapters, kept (default MOS_HOME/bench-many-clients)")
    ap.add_argument("--keep", action="store_true", help="keep each round's folder (logs, outputs)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "many_clients.json"))
    args = ap.parse_args()
    # `timeout` (bench/gpu.sh) sends SIGTERM: leave through the finally blocks that kill the parties started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.ns.split(",") if x]
    t0 = time.perf_counter()
    adapters = prepare_adapters(max(ns), args.base, args.tune_steps, Path(args.cache), args.device)
    prep = time.perf_counter() - t0
    rounds = []
    for n in ns:
        work = Path(tempfile.mkdtemp(prefix=f"mos-many-{n}-"))
        load = os.getloadavg()[0]
        print(f"round with {n} clients in {work} ...", flush=True)
        r = one_round(n, adapters, args, work)
        r["load_average_before"] = load
        rounds.append(r)
        print(f"  N={n}: finished={r['round_finished']} same adapter={r['same_adapter'].get('all_equal')} "
              f"{r['wall_s']} s", flush=True)
        if not args.keep and r["round_finished"]:
            shutil.rmtree(work, ignore_errors=True)
            r["logs"] = None
    result = {
        "bench": "many_clients", "base": args.base, "device": args.device or "default", "tune_steps": args.tune_steps,
        "sample_steps": args.sample_steps, "threads": args.threads, "adapters_prepare_s": round(prep, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "rounds": rounds,
        "all_finished": all(r["round_finished"] and r["same_adapter"].get("all_equal") for r in rounds),
        "command": " ".join(["python", "bench/many_clients.py", *sys.argv[1:]]),
    }
    write_json(args.out, result)
    print_table(rounds)
    print(f"wrote {args.out}")
    return 0 if result["all_finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
