"""The SuperNode this party runs: started as a subprocess, watched, restarted when the server goes away.

Flower 1.42's SuperNode says why it was shut out only in its log, and can hang after a server restart; this is
where the client reads those signs (their wording is Flower's) and decides to retry, reconnect or give up.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

from mos.shared.federation import flower_procs as fp
from mos.shared.runtime import say

RESTART_BACKOFF_S = (2, 5, 10, 20, 30)
REFUSAL_GRACE_S = 45  # how long a refused node keeps trying before it gives up


def refused(log_text: str) -> str | None:
    """Why the SuperLink shut this SuperNode out, if its log says so (Flower 1.42's wording)."""
    if "Failed to activate SuperNode" in log_text or "[code: 2004]" in log_text:
        return ("node authentication failed: the server has not registered this node's public key "
                "(send it your --auth-key's .pub file)")
    low = log_text.lower()
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        return ("TLS failed: the server's certificate does not verify against --tls-dir's ca.pem, or does not "
                "name the host in --server")
    return None


def unreachable(log_text: str) -> str | None:
    """Why this SuperNode cannot reach the server at all, if its log says so (Flower / httpx wording)."""
    low = log_text.lower()
    if "wrong version number" in low or "record layer failure" in low or "ssl" in low and "eof" in low:
        return ("TLS mismatch: the server speaks TLS and this client does not (give --tls-dir with the server's "
                "ca.pem), or the other way round")
    if "remoteprotocolerror" in low or "server disconnected without sending a response" in low:
        return "the server closed the connection: it may expect TLS (give --tls-dir with the server's ca.pem)"
    if "connection refused" in low or "connecterror" in low:
        return "nothing answers at --server's address (is mos-server running there, on that port?)"
    if "name or service not known" in low or "nodename nor servname" in low:
        return "--server's host name does not resolve"
    return None


def wedged(log_text: str) -> bool:
    """Flower 1.42: a SuperNode that was sending a reply when the SuperLink restarted gets '401 Unauthorized'
    from the new one, tries to exit from a retry thread and deadlocks; it neither exits nor reconnects."""
    return "401 Unauthorized" in log_text or "KeyboardInterrupt" in log_text


def supervise(server: str, done: threading.Event, socket_path: Path, log: Path, root_cert: Path | None,
              auth_key: Path | None, wait: float = 0,
              on_start: Callable[[], None] = lambda: None) -> tuple[fp.Proc | None, str | None]:
    """Keep a SuperNode connected until `done` is set. Returns (last SuperNode, why it gave up or None):
    "refused" when the server refuses this node past a grace period (a restarted server registers node keys a
    moment after it starts listening), "timeout" when `wait` seconds (0: no limit) pass without an outcome."""
    node, restarts, started, refused_since = None, 0, time.time(), None
    while True:
        if node is not None and not node.alive():
            why = refused(node.tail(60))
            delay = RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)]
            if why:
                refused_since = refused_since or time.time()
                if time.time() - refused_since > REFUSAL_GRACE_S:
                    say(f"refused by the server: {why}")
                    return node, "refused"
                say(f"the server refused this node ({why}); trying again in {delay} s")
            else:
                refused_since = None
                hint = unreachable(node.tail(60))
                say(f"lost the server (SuperNode exited {node.popen.returncode}"
                    f"{': ' + hint if hint else ''}); reconnecting in {delay} s")
            restarts += 1
            if done.wait(delay):
                return node, None
        if node is None or not node.alive():
            on_start()  # e.g. the worker forgets the run it served: a restarted server brings a new one
            node = fp.start_supernode(socket_path.parent / "flwr", server, fp.free_port(),
                                      {"mos-worker": str(socket_path)}, log, root_cert, auth_key)
        if done.wait(1.0):
            return node, None
        if wedged(node.output()):
            say("the SuperNode lost its session with a restarted server and hangs; starting a new one")
            node.stop()
            continue
        why = refused(node.tail(20))
        if why:  # a SuperNode retries a certificate it cannot verify forever: give up here
            refused_since = refused_since or time.time()
            if time.time() - refused_since > REFUSAL_GRACE_S:
                say(f"refused by the server: {why}")
                return node, "refused"
        if wait and time.time() - started > wait:
            hint = unreachable(node.tail(200)) or refused(node.tail(200))
            say(f"no result after {wait:.0f} s: giving up" + (f"; the connection failed: {hint}" if hint else ""))
            return node, "timeout"


def let_reply_leave(log: Path, timeout: float = 20.0) -> None:
    """The worker answered; let the SuperNode send that answer (every message received gets one reply sent)
    before it is stopped."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            text = log.read_bytes()
        except OSError:
            return
        if text.count(b"Sent successfully") >= text.count(b"Received successfully"):
            return
        time.sleep(0.5)
