"""Flower 1.42's processes, run as subprocesses: SuperLink, SuperNode and the `flwr` CLI.

Flower has no public Python API to start a SuperLink or a SuperNode, so `mos-server` and `mos-client` wrap
the executables. Every process gets its own FLWR_HOME (Flower keeps installed apps and CLI config there),
telemetry and update checks off, and this environment's bin folder first on PATH: the SuperNode finds
`flower-superexec` and `flwr-clientapp` through PATH, and must find this venv's, which has `mos` installed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mos.shared.runtime import OFFLINE_ENV

BIN = Path(sys.executable).parent
CONNECTION = "mos"  # the name of the SuperLink connection in the CLI's config.toml


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({**OFFLINE_ENV, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"})
    env.update(extra or {})
    return env


def exe(name: str) -> str:
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}: is flwr==1.42.0 installed here?")
    return str(path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    target = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    try:
        with socket.create_connection((target, port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the process that started it dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Proc:
    """A Flower process with its output in a log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    start: int = 0  # where this process's output begins in `log` (logs are appended across restarts)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """Everything this process wrote so far."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.start)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL; descendants (SuperExec, app processes) go too."""
        kids = descendants(self.popen.pid)
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for pid in kids:
            _kill(pid)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc; empty where /proc is missing)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for kid in parents.get(todo.pop(), []):
            out.append(kid)
            todo.append(kid)
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass


def spawn(name: str, cmd: list[str], flwr_home: Path, log: Path, extra_env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Proc:
    """Start a Flower process; its output goes to `log`, each line stamped with the time (Flower's own lines
    carry none, and the stamps are what shows where a stage spends its seconds)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=flower_env(flwr_home, extra_env),
                             cwd=str(cwd or flwr_home), preexec_fn=_die_with_parent)
    threading.Thread(target=_stamp, args=(popen.stdout, log), name=f"{name}-log", daemon=True).start()
    return Proc(name, popen, log, start)


def _stamp(stream, log: Path) -> None:
    with open(log, "ab", buffering=0) as out:
        for line in iter(stream.readline, b""):
            out.write(time.strftime("%H:%M:%S ").encode() + _ANSI.sub(b"", line))


_ANSI = re.compile(rb"\x1b\[[0-9;]*m")


# ------------------------------------------------------------------------------------------------- SuperLink

@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path | None = None  # server side only
    key: Path | None = None


def start_superlink(flwr_home: Path, host: str, port: int, log: Path, tls: Tls | None = None,
                    node_auth: bool = False, wait: float = 60.0) -> Proc:
    """One SuperLink: Fleet, Control and Runtime APIs share one HTTP port in Flower 1.42."""
    if port_open(host, port):
        raise OSError(f"port {port} on {host} is already in use: is another mos-server running? (use --port)")
    cmd = [exe("flower-superlink"), "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if tls:
        cmd += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
    else:
        cmd += ["--insecure"]
    if node_auth:
        cmd += ["--enable-supernode-auth"]
    proc = spawn("superlink", cmd, flwr_home, log)
    deadline = time.time() + wait
    while not port_open(host, port):
        if not proc.alive():
            raise RuntimeError(f"flower-superlink exited ({proc.popen.returncode}):\n{proc.tail()}")
        if time.time() > deadline:
            proc.stop()
            raise RuntimeError(f"flower-superlink did not open {host}:{port} within {wait:.0f} s:\n{proc.tail()}")
        time.sleep(0.2)
    return proc


def start_supernode(flwr_home: Path, superlink: str, port: int, node_config: dict[str, Any], log: Path,
                    root_cert: Path | None = None, auth_key: Path | None = None,
                    extra_env: dict[str, str] | None = None) -> Proc:
    cmd = [exe("flower-supernode"), "--superlink", superlink, "--port", str(port),
           "--node-config", toml_pairs(node_config)]
    cmd += ["--root-certificates", str(root_cert)] if root_cert else ["--insecure"]
    if auth_key:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return spawn("supernode", cmd, flwr_home, log, extra_env)


def toml_pairs(values: dict[str, Any]) -> str:
    """`key="value" n=3` as Flower's --node-config / --run-config parse it (no quotes inside values)."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={str(v).lower()}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            s = str(v)
            if any(c in s for c in "\"'\n\\"):
                raise ValueError(f"{k}={s!r}: Flower's config strings cannot hold quotes, backslashes or newlines")
            parts.append(f'{k}="{s}"')
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------- flwr CLI

def write_cli_config(flwr_home: Path, address: str, root_cert: Path | None = None) -> None:
    """A config.toml whose default connection is this SuperLink's Control API (the same port)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f'address = "{address}"']
    lines += [f'root-certificates = "{root_cert}"'] if root_cert else ["insecure = true"]
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def flwr_cli(flwr_home: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([exe("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                          env=flower_env(flwr_home), cwd=str(flwr_home))


def _json_out(proc: subprocess.CompletedProcess, what: str) -> dict:
    try:
        out = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout.strip()} {proc.stderr.strip()}") from None
    if not out.get("success", False):
        raise RuntimeError(f"{what} failed: {out.get('error-message') or out}")
    return out


def start_run(flwr_home: Path, app_dir: Path, run_config: dict[str, Any]) -> int:
    """`flwr run`: upload the app bundle and start its ServerApp; returns the run id."""
    proc = flwr_cli(flwr_home, "run", str(app_dir), CONNECTION, "--run-config", toml_pairs(run_config),
                    "--format", "json")
    return int(_json_out(proc, "flwr run")["run-id"])


def run_status(flwr_home: Path, run_id: int) -> tuple[str, str]:
    """(status, details), e.g. ("running", "") or ("finished:failed", "ServerApp failed with ...").

    `flwr run` returns as soon as the run is submitted and says nothing of how it ends: this is where a
    failed ServerApp shows.
    """
    proc = flwr_cli(flwr_home, "ls", "--run-id", str(run_id), CONNECTION, "--format", "json", timeout=60)
    runs = _json_out(proc, "flwr ls").get("runs", [])
    if not runs:
        return "unknown", ""
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", ""))


def run_log(flwr_home: Path, run_id: int) -> str:
    return flwr_cli(flwr_home, "log", str(run_id), CONNECTION, "--show", timeout=60).stdout


def stop_run(flwr_home: Path, run_id: int) -> None:
    flwr_cli(flwr_home, "stop", str(run_id), CONNECTION, timeout=60)


def register_node_keys(flwr_home: Path, public_keys: list[Path]) -> dict[str, dict[str, str]]:
    """`flwr supernode register KEY.pub` for each key, in parallel (each is a new `flwr` process): a SuperNode
    signing with the matching private key may then join. Returns node id -> {"key": the key's sha256, "file"}:
    who a node is, for the ServerApp (a concept name belongs to the key that first uploaded it)."""
    procs = [(key, subprocess.Popen([exe("flwr"), "supernode", "register", str(key), CONNECTION, "--format", "json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=flower_env(flwr_home), cwd=str(flwr_home))) for key in public_keys]
    nodes: dict[str, dict[str, str]] = {}
    for key, p in procs:
        out, err = p.communicate(timeout=120)
        if p.returncode != 0 and "already" in (out + err).lower():
            continue
        done = _json_out(subprocess.CompletedProcess(p.args, p.returncode, out, err),
                         f"flwr supernode register {key.name}")
        nodes[str(done["node-id"])] = {"key": key_id(key), "file": key.name}
    return nodes


def key_id(public_key: Path) -> str:
    """A node key's identity: sha256 of its key material (the OpenSSH line without its comment)."""
    fields = public_key.read_text().split()
    return "sha256:" + hashlib.sha256(" ".join(fields[:2]).encode()).hexdigest()[:32]
