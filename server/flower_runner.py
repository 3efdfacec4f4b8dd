"""The StageRunner that answers `run_fusion`'s stages with Flower clients (docs/design.md, "The federated shape").

    train.tune     -> each client: adapter + stage-1 statistics (or "cached": the server already holds them)
    query.kv       <- fused text encoder + every concept's embeddings; -> k/v statistics
    query.spatial  <- fused text encoder + k/v;                          -> spatial statistics
    train.result   <- the fused adapter file;                            -> acknowledgement
    query.notice   <- "rejected" / "dropped" / "finished": the client stops with that reason

Every reply is decoded and checked (mos.shared.federation.wire) before it reaches the fusion; a client whose reply is
missing, late or bad leaves the round (Fusion.remove) with the reason in fusion.json, and is told so.
Concepts fused in earlier rounds whose clients are gone take part from the server's state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from mos.server.state import ServerState
from mos.shared.federation import wire
from mos.shared.formats import adapter as adapter_io
from mos.shared.formats.adapter import Adapter
from mos.shared.fusion.config import FusionConfig
from mos.shared.fusion.driver import Fusion, FusionError
from mos.shared.fusion.stats import Stats
from mos.shared.fusion.stats_file import StoredGram, checked_refs
from mos.shared.sd.concepts import Concept
from mos.shared.sd.lora import Lora

POLL_S = 0.5


@dataclass
class Member:
    """One client in this round."""

    node: int
    name: str = ""
    bytes_up: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cache: dict[str, bool] = field(default_factory=dict)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def send_notices(grid: Grid, notices: dict[int, tuple[str, str]], round_: int, timeout: float) -> dict[str, int]:
    """Push `query.notice` messages; returns message id -> node."""
    msgs = [Message(wire.encode_notice(kind, reason, round_), dst_node_id=n, message_type="query.notice",
                    ttl=timeout + 600) for n, (kind, reason) in notices.items()]
    ids = list(grid.push_messages(msgs)) if msgs else []
    return {mid: n for mid, n in zip(ids, notices) if mid}


class FlowerRunner:
    def __init__(self, grid: Grid, fusion: Fusion, manifest: wire.BaseManifest, state: ServerState, round_: int,
                 nodes: list[int], timeout: float, say: Callable[[str], None], keys: dict[int, str] | None = None):
        self.grid = grid
        self.keys = keys or {}  # node -> its registered key (--auth-keys); without keys no node has an identity
        self.fusion = fusion
        self.manifest = manifest
        self.state = state
        self.round = round_
        self.nodes = nodes
        self.timeout = timeout
        self.say = say
        self.config = fusion.config
        self.members: dict[int, Member] = {}           # node -> member (accepted clients still in the round)
        self.out: dict[int, tuple[str, str, str]] = {}  # node -> (concept, kind, reason): rejected or dropped
        self.from_state: dict[str, dict[int, dict[str, StoredGram]]] = {}  # registry concepts without a client
        self.traffic: dict[str, dict[str, int]] = {}    # stage -> {"up": bytes, "down": bytes}
        self.pending_notices: dict[str, int] = {}        # message id -> node

    # --- messaging ------------------------------------------------------------------------------------------

    def exchange(self, kind: str, contents: dict[int, RecordDict], timeout: float | None = None) -> dict[int, Message]:
        """Send one message per node and collect replies as they come; late nodes are simply absent."""
        if not contents:
            return {}
        timeout = self.timeout if timeout is None else timeout
        msgs = [Message(rd, dst_node_id=n, message_type=kind, ttl=timeout + 60, group_id=f"round-{self.round}")
                for n, rd in contents.items()]
        down = sum(wire.record_bytes(rd) for rd in contents.values())
        t0 = time.time()
        ids = list(self.grid.push_messages(msgs))
        pending = {mid: n for mid, n in zip(ids, contents) if mid}
        replies: dict[int, Message] = {}
        up = 0
        while pending and time.time() - t0 < timeout:
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                replies[node] = reply
                size = 0 if reply.has_error() else wire.record_bytes(reply.content)
                up += size
                m = self.members.get(node)
                if m is not None:
                    m.bytes_up[kind], m.seconds[kind] = size, time.time() - t0
                who = (m.name if m and m.name else "") or self._name_of(reply) or f"node {node}"
                status = f"error: {reply.error.reason}" if reply.has_error() else f"{fmt_bytes(size)} up"
                self.say(f"{kind:<13} {who:<12} {status}  {time.time() - t0:5.1f} s  "
                         f"({len(replies)}/{len(contents)} replied)")
            if pending:
                time.sleep(POLL_S)
        stage = self.traffic.setdefault(kind, {"up": 0, "down": 0, "seconds": 0})
        stage["up"] += up
        stage["down"] += down
        stage["seconds"] = round(time.time() - t0, 2)
        self.say(f"{kind:<13} done: {len(replies)}/{len(contents)} replied, {fmt_bytes(down)} down, "
                 f"{fmt_bytes(up)} up, {time.time() - t0:.1f} s")
        return replies

    def notify(self, notices: dict[int, tuple[str, str]]) -> None:
        """Tell clients they are out (or that the run ended); `await_notices` collects the acknowledgements."""
        self.pending_notices |= send_notices(self.grid, notices, self.round, self.timeout)

    def await_notices(self, timeout: float) -> None:
        """Wait (bounded) until every notice was read: a client only stops once it has been told why."""
        t0 = time.time()
        while self.pending_notices and time.time() - t0 < timeout:
            for reply in self.grid.pull_messages(list(self.pending_notices)):
                self.pending_notices.pop(reply.metadata.reply_to_message_id, None)
            if self.pending_notices:
                time.sleep(POLL_S)
        if self.pending_notices:
            self.say(f"{len(self.pending_notices)} notice(s) unread after {timeout:.0f} s")

    def leave(self, node: int, kind: str, reason: str) -> None:
        """Take a client out of the round with a reason, in the fusion's report and in a notice to it."""
        m = self.members.pop(node, None)
        name = m.name if m and m.name else f"node {node}"
        self.out[node] = (m.name if m else "", kind, reason)
        if m and m.name and m.name in self.fusion.adapters:
            self.fusion.remove(m.name, f"{kind}: {reason}")
        else:
            self.fusion.dropped[name] = f"{kind}: {reason}"
        self.say(f"{kind} {name}: {reason}")
        self.notify({node: (kind, reason)})

    def _missing(self, kind: str, sent: list[int], replies: dict[int, Message]) -> None:
        for node in sent:
            if node not in replies and node in self.members:
                self.leave(node, "dropped", f"no reply to {kind} within {self.timeout:.0f} s")
            elif node in replies and replies[node].has_error() and node in self.members:
                self.leave(node, "dropped", f"{kind} failed on the client: {replies[node].error.reason}")

    # --- stages ---------------------------------------------------------------------------------------------

    def stage1(self, config: FusionConfig) -> dict[str, tuple[Adapter, dict[str, StoredGram]]]:
        """Every concept's adapter and stage-1 statistics, the statistics as references to the state's files:
        an upload is decoded, checked and written one client at a time, so memory does not grow with N."""
        known = self.state.known(self.round)
        registry = self.state.registry()
        offer = [wire.held_token(n, d) for n, d in (registry | known).items()]
        self.members = {n: Member(n) for n in self.nodes}
        tune = {n: wire.encode_tune(self.manifest.fingerprint, self.round, config, offer)
                for n in self.nodes}
        replies = self.exchange("train.tune", tune)
        self._missing("train.tune", self.nodes, replies)
        out: dict[str, tuple[Adapter, dict[str, StoredGram]]] = {}
        for node in sorted(replies, key=lambda n: self._name_of(replies[n])):
            if node not in self.members:
                continue
            got = self._accept_tune(node, replies[node].content, known, registry, config.one_shot)
            if got:
                out[self.members[node].name] = got
        # concepts of earlier rounds whose clients did not come back this round
        present = set(out)
        for name in sorted(set(registry) - present):
            adapter, stats = self.state.load_registry(name)
            self.from_state[name] = stats
            out[name] = (adapter, self._stage_stats(stats, 1, config.one_shot))
            self.say(f"train.tune    {name:<12} from the server's state (round before; no client needed)")
        # said once every upload is in the state dir: from here a restarted server resumes without them
        self.say(f"train.tune    accepted: {', '.join(sorted(out)) or 'none'} (adapters and stage-1 statistics saved)")
        return dict(sorted(out.items()))

    @staticmethod
    def _name_of(reply: Message) -> str:
        if reply.has_error():
            return ""
        try:
            return wire.concept_manifest(reply.content, "?").name
        except wire.WireError:
            return ""

    def _accept_tune(self, node: int, rd: RecordDict, known: dict[str, str], registry: dict[str, str],
                     one_shot: bool) -> tuple[Adapter, dict[str, StoredGram]] | None:
        m = self.members[node]
        try:
            name = wire.concept_manifest(rd, f"node {node}").name
            if any(o.name == name for n, o in self.members.items() if n != node):
                raise wire.WireError(f"node {node}: concept name {name!r} is already taken by another client "
                                     "this round")
            self._check_owner(node, name)
            m.name = name
            cm, adapter = wire.decode_concept(rd, self.manifest, f"node {node}")
            if cm.cached:
                if known.get(cm.name) == cm.adapter_digest:
                    adapter, saved = self.state.load_round_concept(self.round, cm.name)
                elif registry.get(cm.name) == cm.adapter_digest:
                    adapter, saved = self.state.load_registry(cm.name)
                    self.state.save_concept(self.round, adapter, cm.adapter_digest, {"node": node, "reused": True})
                    self.state.save_stats(self.round, cm.name, 1, saved[1])
                else:
                    raise wire.WireError("answered 'cached' for an adapter the server does not hold")
                stats = saved[1]
                m.cache["train.tune"] = True
                self.say(f"train.tune    {cm.name:<12} adapter and stage-1 statistics from the server's state "
                         f"(digest {cm.adapter_digest[:12]}): no upload, no tuning")
            else:
                _, decoded = wire.decode_stats(rd, self.manifest, 1, cm.name, f"node {node}", one_shot,
                                               self.config.uses_heldout)
                self._check_reach(node, adapter, decoded)
                self.state.save_concept(self.round, adapter, cm.adapter_digest, {"node": node,
                                                                                  "data_digest": cm.data_digest})
                stats = checked_refs(decoded, self.state.save_stats(self.round, cm.name, 1, decoded))
                del decoded
            if node in self.keys:
                self.state.claim(cm.name, self.keys[node])
            return adapter, stats
        except (wire.WireError, adapter_io.AdapterError, ValueError) as e:
            self.leave(node, "rejected", str(e))
            return None

    def _check_owner(self, node: int, name: str) -> None:
        """A name belongs to the node key that first uploaded it; a node without a registered key (no
        --auth-keys) cannot take a name a key owns."""
        owner = self.state.owners().get(name)
        if owner is not None and self.keys.get(node) != owner:
            raise wire.WireError(f"node {node}: concept name {name!r} belongs to another node's key "
                                 f"({owner[:20]}…); this node may not upload or claim it")

    def _check_reach(self, node: int, adapter: Adapter, stats: Stats) -> None:
        """The base's bounds (LoRA change, Gram power, XᵀX) before the upload counts, so an outlier is refused
        by name instead of failing everyone's round."""
        try:
            self.fusion.check_adapter(adapter)
            self.fusion.check_stats(adapter.concepts[0].name, stats)
        except FusionError as e:
            raise wire.WireError(f"node {node}: {e}") from None

    def _stage_stats(self, stats: dict[int, dict[str, StoredGram]], stage: int, one_shot: bool
                     ) -> dict[str, StoredGram]:
        """A stored concept's statistics for one stage. A one-shot upload holds every site under stage 1;
        where a later stage's own file exists it wins (it was computed with the fused layers before it)."""
        merged = {k: v for s in sorted(stats) for k, v in stats[s].items()}
        keys = wire.stats_sites(self.manifest, stage, one_shot, self.config.uses_heldout)
        return {k: merged[k] for k in keys if k in merged}

    def _query(self, kind: str, stage: int, fused: Lora, concepts: list[Concept]) -> dict[str, dict[str, StoredGram]]:
        payload = wire.encode_fused(stage - 1, fused, concepts, self.manifest.fingerprint, self.round, self.config)
        nodes = list(self.members)
        replies = self.exchange(kind, {n: payload for n in nodes})
        self._missing(kind, nodes, replies)
        out: dict[str, dict[str, StoredGram]] = {}
        for node in nodes:
            if node not in self.members:
                continue
            m = self.members[node]
            try:
                p, stats = wire.decode_stats(replies[node].content, self.manifest, stage, m.name, f"node {node}",
                                             heldout=self.config.uses_heldout)
                try:
                    self.fusion.check_stats(m.name, stats)
                except FusionError as e:
                    raise wire.WireError(f"node {node}: {e}") from None
                m.cache[kind] = p.from_cache
                out[m.name] = checked_refs(stats, self.state.save_stats(self.round, m.name, stage, stats))
                del stats  # the fusion reads each Gram back from the file when it adds it
            except (wire.WireError, ValueError) as e:
                self.leave(node, "rejected", str(e))
        for name, stats in self.from_state.items():
            if name in self.fusion.adapters:
                out[name] = self._stage_stats(stats, stage, False)
        return dict(sorted(out.items()))

    def stage2(self, fused_te: Lora, concepts: list[Concept], config: FusionConfig) -> dict[str, Stats]:
        return self._query("query.kv", 2, fused_te, concepts)

    def stage3(self, fused: Lora, concepts: list[Concept], config: FusionConfig) -> dict[str, Stats]:
        return self._query("query.spatial", 3, fused, concepts)

    def deliver(self, fused: Adapter) -> None:
        """Nothing here: the ServerApp writes the result first, then calls `send_result`."""

    def send_result(self, adapter_file: bytes) -> list[str]:
        """The final adapter file to every client still in the round; returns who acknowledged."""
        payload = wire.encode_fused(4, {}, [], self.manifest.fingerprint, self.round, adapter_file=adapter_file)
        nodes = list(self.members)
        replies = self.exchange("train.result", {n: payload for n in nodes})
        acked = []
        for node in nodes:
            r = replies.get(node)
            if r is not None and not r.has_error():
                acked.append(self.members[node].name)
            else:
                why = r.error.reason if r is not None else f"no acknowledgement within {self.timeout:.0f} s"
                self.say(f"train.result  {self.members[node].name:<12} did not confirm: {why}")
        return acked
