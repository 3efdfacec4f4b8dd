"""Trust (issue 20): only the operator controls the server, a client answers only its own run, and no one party can
ruin the fused model. Each case of docs/protocol.md's table "What an outside party or a participant can do" is a
test here; the outside-party ones dial a real SuperLink behind the gateway on loopback.
"""

from __future__ import annotations

import copy
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_adapter
from mos.shared.federation import wire
from mos.shared.fusion.bounds import Bounds
from mos.shared.fusion.config import FusionConfig
from mos.shared.fusion.driver import Fusion, FusionError, run_fusion
from mos.shared.fusion.stats import Gram

BIN = Path(sys.executable).parent


# --- 1 and 7: the public port is the Fleet API only, sizes refused before bodies are read ---------------------

@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A real SuperLink (TLS, node authentication) on loopback, with the gateway on another port."""
    from mos.server import gateway as gw
    from mos.shared.federation import flower_procs as fp
    from mos.shared.federation.tls import ensure_server_tls

    root = tmp_path_factory.mktemp("link")
    t = ensure_server_tls(root / "tls", ["127.0.0.1"])
    internal, public = fp.free_port(), fp.free_port()
    link = fp.start_superlink(root / "home", "127.0.0.1", internal, root / "superlink.log",
                              fp.Tls(t.ca, t.cert, t.key), node_auth=True)
    door = gw.Gateway("127.0.0.1", public, internal, gw.server_context(str(t.cert), str(t.key)),
                      gw.client_context(str(t.ca)), upload_cap=lambda: 1 << 20).start()
    operator, outsider = root / "operator", root / "outsider"
    fp.write_cli_config(operator, f"127.0.0.1:{internal}", t.ca)
    fp.write_cli_config(outsider, f"127.0.0.1:{public}", t.ca)  # holds only the public ca.pem
    yield {"fp": fp, "operator": operator, "outsider": outsider, "public": public, "ca": t.ca, "door": door,
           "root": root}
    door.stop()
    link.stop()


def _raw(s, request: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=str(s["ca"]))
    with socket.create_connection(("127.0.0.1", s["public"]), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    return data


@pytest.mark.slow
def test_control_api_is_not_reachable_from_the_public_port(superlink):
    """`flwr ls | run | supernode register | stop` with the public ca.pem all fail; the operator's loopback works."""
    from mos.server.operator import APP_DIR
    from mos.shared.federation.tls import make_node_key

    fp, outsider = superlink["fp"], superlink["outsider"]
    _, pub = make_node_key(superlink["root"] / "intruder")
    attempts = [("ls", fp.CONNECTION), ("run", str(APP_DIR), fp.CONNECTION),
                ("supernode", "register", str(pub), fp.CONNECTION), ("stop", "1", fp.CONNECTION)]
    for args in attempts:
        proc = fp.flwr_cli(outsider, *args, "--format", "json")
        assert '"success": true' not in proc.stdout, (args, proc.stdout)
        assert "403" in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
    assert fp.run_status  # the operator's own CLI, on loopback, still answers
    proc = fp.flwr_cli(superlink["operator"], "ls", fp.CONNECTION, "--format", "json")
    assert '"success": true' in proc.stdout, proc.stdout
    assert all(status == 403 for status, _ in superlink["door"].refusals[-len(attempts):])


@pytest.mark.slow
def test_gateway_refuses_other_paths_chunked_bodies_and_oversized_requests(superlink):
    for target in ("/v1/control/list-runs", "/v1/fleet/../control/stop-run", "/v1/fleet/%2e%2e/control/x",
                   "/docs"):
        assert _raw(superlink, f"POST {target} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n".encode()
                    ).startswith(b"HTTP/1.1 403"), target
    chunked = b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    assert _raw(superlink, chunked).startswith(b"HTTP/1.1 411")
    # 420 MB declared, nothing sent: refused from the head alone
    huge = b"POST /v1/fleet/push-object HTTP/1.1\r\nhost: x\r\ncontent-length: 440401920\r\n\r\n"
    assert _raw(superlink, huge).startswith(b"HTTP/1.1 413")


def test_gateway_counts_one_replys_objects_against_the_upload_cap():
    from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module

    from mos.server import gateway as gw

    door = gw.Gateway("127.0.0.1", 0, 1, upload_cap=lambda: 3000)
    chunk = PushObjectRequest(run_id=1, session_id="s", object_id="o", object_content=b"x" * 1000)
    door._tally(chunk.SerializeToString())
    door._tally(chunk.SerializeToString())
    with pytest.raises(gw.Refused, match="over the 3000-byte cap") as e:
        for _ in range(2):
            door._tally(chunk.SerializeToString())
    assert e.value.status == 413
    assert gw.allowed_path("/v1/fleet/push-object") and not gw.allowed_path("/v1/fleet/./x/../../control")


# --- 2: the worker answers only the run it joined ---------------------------------------------------------------

def test_worker_answers_only_the_run_it_joined(tmp_path, tiny_base):
    from mos.client.federation.worker import Worker

    w = Worker(tiny_base, random_adapter(tiny_base, "alice", "doll", 1), tmp_path)
    with pytest.raises(PermissionError, match="opens with train.tune"):
        w.check_run("query.kv", {"run_id": 7})  # another run asking first gets nothing
    w.check_run("train.tune", {"run_id": 5})
    for kind in ("query.kv", "train.tune", "query.spatial", "train.result"):
        with pytest.raises(PermissionError, match="serves run 5 only"):
            w.check_run(kind, {"run_id": 6})
    w.check_run("query.kv", {"run_id": 5})
    w.new_session()  # a new SuperNode: a restarted server's run has a new id
    w.check_run("train.tune", {"run_id": 9})


# --- 3: bounds from the base ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bounded(tiny_base):
    from mos.shared.sd.sites import input_sites

    cfg = FusionConfig().resolved(tiny_base.spec)
    sites = input_sites(tiny_base.text_encoder, tiny_base.unet, cfg.placement)
    return sites, cfg, Bounds.from_base(tiny_base, cfg.placement)


def _fusion(tiny_base, bounded) -> Fusion:
    sites, cfg, bounds = bounded
    return Fusion(tiny_base.fingerprint, sites, cfg, bounds)


def test_huge_lora_is_refused_naming_concept_and_layer(tiny_base, bounded):
    fusion = _fusion(tiny_base, bounded)
    honest = random_adapter(tiny_base, "alice", "doll", 1, placement=bounded[1].placement)
    fusion.check_adapter(honest)
    hostile = copy.deepcopy(honest)
    layer = sorted(hostile.lora)[0]
    B, A = hostile.lora[layer]
    hostile.lora[layer] = (B * 1e30, A)
    with pytest.raises(FusionError, match=rf"concept 'alice', layer {layer}: LoRA change .* at most 2×"):
        fusion.check_adapter(hostile)


def _honest_gram(site, rows: int = 50, scale: float = 1.0) -> Gram:
    X = torch.randn(rows, site.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return Gram(X.T @ X * scale, rows)


@pytest.mark.parametrize("fault, pattern", [
    ("huge", r"trace\(G\)/rows .* accepted"), ("e300", r"trace\(G\)/rows|NaN or Inf"),
    ("zero", r"trace\(G\)/rows = 0"), ("not_xtx", "not positive semidefinite")])
def test_grams_outside_the_base_bounds_are_refused(tiny_base, bounded, fault, pattern):
    sites, cfg, bounds = bounded
    fusion = _fusion(tiny_base, bounded)
    fusion.add(random_adapter(tiny_base, "alice", "doll", 1, placement=cfg.placement))
    site = next(s for s in sites if s.stage == 1)
    ref = bounds.row_power[site.name]
    g = _honest_gram(site)
    g = Gram(g.gram * (ref * g.rows / float(g.gram.diagonal().sum())), g.rows)  # the base's own power
    fusion.check_stats("alice", {site.name: g})
    bad = {"huge": g.gram * 1e30, "e300": g.gram * 1e300, "zero": torch.zeros_like(g.gram)}.get(fault)
    if fault == "not_xtx":  # passes the cheap |G_ij| <= sqrt(G_ii G_jj) check, yet has a negative eigenvalue
        d = site.dim
        bad = torch.eye(d, dtype=torch.float64) * ref * g.rows / d
        bad[0, 1] = bad[1, 0] = bad[1, 2] = bad[2, 1] = bad[0, 0]
        bad[0, 2] = bad[2, 0] = -bad[0, 0]
    with pytest.raises(FusionError, match=pattern):
        fusion.check_stats("alice", {site.name: Gram(bad, g.rows)})


def test_a_held_out_share_outside_the_base_bounds_is_refused_like_its_site(tiny_base, bounded):
    from mos.shared.fusion.stats import heldout_key

    sites, cfg, bounds = bounded
    assert cfg.uses_heldout  # the tiny base's default
    fusion = _fusion(tiny_base, bounded)
    fusion.add(random_adapter(tiny_base, "alice", "doll", 1, placement=cfg.placement))
    site = next(s for s in sites if s.stage == 3 and s.conv is None)
    g = _honest_gram(site)
    g = Gram(g.gram * (bounds.row_power[site.name] * g.rows / float(g.gram.diagonal().sum())), g.rows)
    fusion.check_stats("alice", {heldout_key(site.name): g})
    with pytest.raises(FusionError, match=f"site {site.name}: trace"):
        fusion.check_stats("alice", {heldout_key(site.name): Gram(g.gram * 1e30, g.rows)})


def test_fused_result_outside_bounds_is_never_sent(tiny_base, bounded):
    fusion = _fusion(tiny_base, bounded)
    layer = next(iter(bounded[2].weight_norms))
    with pytest.raises(FusionError, match="NaN or Inf"):
        fusion.check_result({layer: (torch.full((4, 1), float("nan")), torch.ones(1, 4))})


def test_a_solve_the_concepts_blow_up_is_ridged_back_within_bounds():
    """Two honest concepts whose rows (in 3 of 8 dimensions) differ by a hair and whose changes disagree: at a tiny
    ε the solve fits them through that hair and reaches far past both; with bounds the site is solved again at
    ε ×10 until it is within them (fusion.json says which ε), and the round goes on. Without bounds the plain
    solve stands."""
    from mos.shared.formats.adapter import Adapter
    from mos.shared.sd.concepts import Concept
    from mos.shared.sd.sites import Site

    d, layer = 8, "unet.x.to_q"
    site = Site("unet.x.to_q", d, (layer,), (d,), 3)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, dtype=torch.float64, generator=g) @ torch.randn(3, d, dtype=torch.float64, generator=g)
    nudge = 1e-3 * torch.randn(40, d, dtype=torch.float64, generator=g)
    B = 0.3 * torch.randn(d, 2, generator=g)
    A = torch.randn(2, d, generator=g)
    adapters = [Adapter("fp", [Concept(n, "doll", torch.zeros(16, 2, 4))], {layer: (sign * B, A)})
                for n, sign in (("alice", 1.0), ("bob", -1.0))]
    rows = {"alice": X, "bob": X + nudge}

    def fused(bounds):
        fusion = Fusion("fp", [site], FusionConfig(eps=1e-8), bounds)
        try:
            for a in adapters:
                fusion.add(a)
                name = a.concepts[0].name
                fusion.add_stats(name, {site.name: Gram(rows[name].T @ rows[name], 40)})
            return fusion.solve(3)[layer], fusion.report()["eps_per_site"][site.name]
        finally:
            fusion.close()

    w = float(A.double().norm())  # a base weight as large as one concept's A: each change is within 2x of it
    bounds = Bounds({layer: w}, {})
    (Bp, Ap), eps_plain = fused(None)
    assert float((Bp.double() @ Ap.double()).norm()) > 2 * bounds.max_delta * w  # the blow-up, unbounded
    (Bb, Ab), eps_bounded = fused(bounds)
    assert float((Bb.double() @ Ab.double()).norm()) <= 2 * bounds.max_delta * w
    assert eps_plain == 1e-8 and eps_bounded > 1e-8
    assert eps_bounded >= 1e-2 * (1 - 1e-9)  # raised: from 1e-3 (the floor a raise starts from) ×10 and up


def test_huge_class_word_and_name_with_newline_are_refused_on_the_wire(tiny_base):
    manifest = wire.BaseManifest.from_base(tiny_base)
    alice = random_adapter(tiny_base, "alice", "doll", 1)
    for name, cw in (("alice\n", "doll"), ("../../../x", "doll"), ("alice", "x" * (1 << 20)),
                     ("alice", "doll\nrm")):
        bad = copy.deepcopy(alice)
        bad.concepts[0].name, bad.concepts[0].class_word = name, cw
        with pytest.raises(wire.WireError, match="not a plain name|class word"):
            wire.decode_concept(wire.encode_concept(wire.RecordDict(), bad), manifest, "node 1")


# --- 4: a dropped client leaves no trace ------------------------------------------------------------------------

def test_client_dropped_in_any_stage_leaves_no_trace(tiny_base):
    from mos.shared.fusion.local import LocalRunner, fuse

    cfg = FusionConfig(sample_steps=2).resolved(tiny_base.spec)
    alice, bob, carol, dave = (random_adapter(tiny_base, n, "doll", s, placement=cfg.placement)
                               for n, s in (("alice", 1), ("bob", 2), ("carol", 3), ("dave", 4)))

    class Dropping(LocalRunner):
        """carol vanishes during stage 2, dave during stage 3."""

        def stage2(self, fused_te, concepts, config):
            out = super().stage2(fused_te, concepts, config)
            self.adapters.pop("carol", None)  # gone: she answers nothing from now on
            return {n: s for n, s in out.items() if n != "carol"}

        def stage3(self, fused, concepts, config):
            out = super().stage3(fused, concepts, config)
            self.adapters.pop("dave", None)
            return {n: s for n, s in out.items() if n != "dave"}

    from mos.shared.sd.sites import input_sites

    sites = input_sites(tiny_base.text_encoder, tiny_base.unet, cfg.placement)
    got = run_fusion(Dropping(tiny_base, [alice, bob, carol, dave], progress=False),
                     Fusion(tiny_base.fingerprint, sites, cfg))
    alone = fuse([alice, bob], tiny_base, cfg, progress=False)
    assert [c.name for c in got.concepts] == ["alice", "bob"]
    assert sorted(got.lora) == sorted(alone.lora)
    for layer, (B, A) in alone.lora.items():
        want = B.double() @ A.double()
        have = got.lora[layer][0].double() @ got.lora[layer][1].double()
        assert float((have - want).abs().max()) <= 1e-5 * (float(want.abs().max()) or 1.0), layer


# --- 5: names are owned -----------------------------------------------------------------------------------------

def test_a_name_belongs_to_the_key_that_first_uploaded_it(tmp_path, tiny_base):
    from mos.server.flower_runner import FlowerRunner
    from mos.server.state import ServerState

    state = ServerState(tmp_path, tiny_base.fingerprint)
    state.claim("alice", "sha256:alice-key")
    state.claim("alice", "sha256:mallory-key")  # a later claim changes nothing
    assert state.owners() == {"alice": "sha256:alice-key"}
    runner = FlowerRunner.__new__(FlowerRunner)
    runner.state, runner.keys = state, {1: "sha256:alice-key", 2: "sha256:mallory-key"}
    runner._check_owner(1, "alice")
    runner._check_owner(2, "bob")  # nobody owns bob yet
    for node in (2, 3):  # another key, or a node without one
        with pytest.raises(wire.WireError, match=f"node {node}: concept name 'alice' belongs to another node"):
            runner._check_owner(node, "alice")


def test_held_adapters_are_offered_without_revealing_their_digests(tiny_base):
    alice = random_adapter(tiny_base, "alice", "doll", 1)
    token = wire.held_token("alice", wire.adapter_digest(alice))
    assert wire.adapter_digest(alice) not in token and "alice" not in token


def test_failed_round_is_marked_and_not_resumed(tmp_path, tiny_base):
    from mos.server.state import ServerState

    state = ServerState(tmp_path, tiny_base.fingerprint)
    assert state.open_round() == (1, False)
    state.fail_round(1, "fused layer x: NaN", {"dropped": {}})
    assert state.round_info(1)["status"] == "failed"
    assert state.open_round() == (2, False)


# --- 6: names that become paths ---------------------------------------------------------------------------------

def test_names_are_checked_with_fullmatch_everywhere(tmp_path, tiny_base):
    from mos.shared.formats import adapter as adapter_io
    from mos.shared.sd.concepts import check_name

    for bad in ("alice\n", "../../../x", "a/b", "", "-x", "x" * 65):
        with pytest.raises(ValueError):
            check_name(bad)
    evil = random_adapter(tiny_base, "alice", "doll", 1)
    evil.concepts[0].name = "../../../x"
    path = adapter_io.save(evil, tmp_path / "evil.safetensors")
    with pytest.raises(adapter_io.AdapterError, match="not a plain name"):
        adapter_io.load(path)  # what `mos export` and the client's result writer read first
    rd = wire.encode_fused(1, {}, evil.concepts, tiny_base.fingerprint, 1)
    with pytest.raises(wire.WireError, match="not a plain name"):
        wire.decode_fused(rd, wire.BaseManifest.from_base(tiny_base))


# --- 7: clear messages ------------------------------------------------------------------------------------------

def test_shape_mismatch_message_names_both_shapes(tiny_base):
    spec = wire.pb.TensorSpec(key="t", shape=[4, 32], dtype="float32")
    with pytest.raises(wire.WireError, match=r"has shape \(4, 32\), this base expects \(4, 16\)"):
        wire._get({"t": torch.zeros(4, 32)}, spec, "node 1", (4, 16))


def test_client_with_a_key_but_no_tls_says_why_and_exits():
    proc = subprocess.run([str(BIN / "mos-client"), "--adapter", "x", "--auth-key", "/nonexistent"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "error" in proc.stderr


def test_client_that_cannot_connect_gives_up_after_wait_and_says_why():
    from mos.client.federation.supernode import unreachable

    assert "TLS" in unreachable("httpx.ConnectError: [SSL: WRONG_VERSION_NUMBER] wrong version number")
    assert "nothing answers" in unreachable("httpx.ConnectError: [Errno 111] Connection refused")
