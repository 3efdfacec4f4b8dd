"""The wire format and the checks on every upload (mos.shared.federation.wire), without Flower processes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from conftest import REPO, random_adapter
from mos.protos import mos_pb2 as pb
from mos.shared.federation import gram_codec, wire
from mos.shared.federation.wire import WireError
from mos.shared.fusion.stats import Gram


@pytest.fixture(scope="module")
def manifest(tiny_base):
    return wire.BaseManifest.from_base(tiny_base)


@pytest.fixture(scope="module")
def alice(tiny_base):
    return random_adapter(tiny_base, "alice", "doll", 1)


def gram(d: int, rows: int, seed: int = 0, spread: float = 1.0) -> Gram:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, d, generator=g, dtype=torch.float64) * torch.logspace(0, -spread, d, dtype=torch.float64)
    G = X.T @ X
    return Gram((G + G.T) / 2, rows)  # exactly symmetric, like the packed form


def stats_for(manifest, stage: int, seed: int = 0, rows: int = 40) -> dict[str, Gram]:
    return {s.name: gram(s.dim, rows, seed + i) for i, s in enumerate(manifest.stage_sites(stage))}


# ------------------------------------------------------------------------------------------------ protos

def test_generated_protobuf_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    shutil.copy(REPO / "protos" / "mos.proto", tmp_path / "mos.proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", str(tmp_path / "mos.proto")], check=True)
    for name in ("mos_pb2.py", "mos_pb2.pyi"):
        assert (tmp_path / name).read_text() == (REPO / "protos" / name).read_text(), \
            f"protos/{name} is stale: regenerate with grpc_tools.protoc (see docs/protocol.md)"


def test_unknown_protocol_version_is_a_clear_error():
    rd = wire.encode_notice("rejected", "why", 1)
    m = pb.Notice.FromString(rd["notice"]["proto"])
    m.version = 99
    rd["notice"] = ConfigRecord({"proto": m.SerializeToString()})
    with pytest.raises(WireError, match="protocol version 99.*speaks 1"):
        wire.decode_notice(rd)
    rd["notice"] = ConfigRecord({"proto": b"\xff\xff not a proto"})
    with pytest.raises(WireError, match="not a valid Notice"):
        wire.decode_notice(rd)


# ------------------------------------------------------------------------------------------------ Grams

def test_float64_grams_travel_exactly():
    g = gram(32, 100)
    enc, rank, t = gram_codec.encode_gram(g, "float64")
    assert enc == pb.PACKED_UPPER and t.numel() == gram_codec.packed_len(32)
    assert torch.equal(gram_codec.decode_gram(enc, rank, t, 32, 100, "x").gram, g.gram)


@pytest.mark.parametrize("rows", [5, 31, 200])
def test_triangular_factor_is_never_larger_than_packed_and_stays_psd(rows):
    d = 64
    g = gram(d, rows, spread=4.0)  # eigenvalues over 8 decades, like real activations
    enc, rank, t = gram_codec.encode_gram(g, "float32")
    assert enc == pb.TRIANGULAR_FACTOR and rank == min(rows, d)
    assert t.numel() == gram_codec.trapezoid_len(rank, d) <= gram_codec.packed_len(d)
    if rows < d:
        assert t.numel() < gram_codec.packed_len(d) * 2 * rows / d  # few rows: much smaller than the triangle
    G = gram_codec.decode_gram(enc, rank, t.float(), d, rows, "x").gram
    assert float(torch.linalg.eigvalsh(G).min()) >= -1e-12 * float(G.diagonal().max())
    assert float((G - g.gram).abs().max() / g.gram.abs().max()) < 1e-6
    assert gram_codec.gram_wire_bytes(d, rows, "float32") == t.numel() * 4


@pytest.mark.parametrize("k,d,block", [(600, 600, 256), (130, 600, 256), (7, 50, 16), (50, 50, 16), (50, 50, 64)])
def test_factor_gram_by_blocks_equals_the_full_product(k, d, block):
    from mos.shared.fusion.gram import add_factor_gram, symmetric_from_upper

    g = torch.Generator().manual_seed(k + d)
    R = torch.triu(torch.randn(k, d, generator=g, dtype=torch.float64))
    A = torch.randn(5, d, generator=g, dtype=torch.float64)
    U = torch.zeros(d, d, dtype=torch.float64)
    AG = add_factor_gram(U, R, block=block, A=A)
    G = symmetric_from_upper(U)
    assert torch.equal(G, G.T)
    assert float((G - R.T @ R).abs().max()) <= 1e-12 * float((R.T @ R).abs().max())
    assert float((AG - A @ R.T @ R).abs().max()) <= 1e-12 * float((A @ R.T @ R).abs().max())
    # float32 products of a float32 R, summed in float64: rounding at float32's level, and the same products
    # subtracted again leave the sum where it was
    R32 = R.float()
    U32 = torch.zeros(d, d, dtype=torch.float64)
    AG32 = add_factor_gram(U32, R32, block=block, A=A, dtype=torch.float32)
    exact = R32.double().T @ R32.double()
    assert float((symmetric_from_upper(U32) - exact).abs().max()) <= 1e-5 * float(exact.abs().max())
    assert float((AG32 - A @ exact).abs().max()) <= 1e-5 * float((A @ exact).abs().max())
    add_factor_gram(U32, R32, -1.0, block=block, dtype=torch.float32)
    assert float(U32.triu().abs().max()) <= 1e-12 * float(exact.abs().max())


@pytest.mark.parametrize("k,d", [(0, 9), (1, 9), (5, 9), (9, 9), (64, 200)])
def test_trapezoid_packs_and_unpacks(k, d):
    from mos.shared.fusion.gram import pack_trapezoid, trapezoid_len, unpack_trapezoid

    R = torch.triu(torch.randn(k, d, generator=torch.Generator().manual_seed(d + k)))
    t = pack_trapezoid(R)
    assert t.shape == (trapezoid_len(k, d),) and t.dtype == R.dtype
    iu = torch.triu_indices(k, d)
    assert torch.equal(t, R[iu[0], iu[1]])  # the wire's row-by-row order
    assert torch.equal(unpack_trapezoid(t, k, d), R)
    with pytest.raises(ValueError, match="trapezoid"):
        unpack_trapezoid(torch.zeros(t.numel() + 1), k, d)


def test_factored_grams_are_stored_packed_and_older_files_still_load(tmp_path):
    from safetensors import safe_open

    from mos.shared.files import save_tensors
    from mos.shared.fusion.stats_file import checked_refs, load_stats, save_stats

    g = gram(48, 30)
    enc, rank, t = gram_codec.encode_gram(g, "float32")
    fg = gram_codec.decode_gram(enc, rank, t.float(), 48, 30, "x")
    stats = {"site.a": fg, "site.b": g}
    path = save_stats(stats, tmp_path / "stats-1.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"trapezoid/site.a", "gram/site.b"}
        assert f.get_tensor("trapezoid/site.a").numel() == gram_codec.trapezoid_len(rank, 48)
    refs = checked_refs(stats, path)
    assert refs["site.a"].checked and refs["site.a"].factored and refs["site.a"].shape == (rank, 48)
    back = refs["site.a"].load()
    assert torch.equal(back.factor, fg.factor) and back.rows == 30 and back.trace() == fg.trace()
    assert torch.equal(load_stats(path)["site.b"].gram, g.gram)
    # a file written before factors were stored packed: R whole under factor/<site>
    old = save_tensors({"factor/site.a": fg.factor}, tmp_path / "old.safetensors",
                       {"rows": '{"site.a": 30}', "factored": '["site.a"]'})
    assert torch.equal(load_stats(old)["site.a"].factor, fg.factor)


# ------------------------------------------------------------------------------------------------ round trips

def test_adapter_and_stats_round_trip(tiny_base, manifest, alice):
    stats = stats_for(manifest, 1)
    rd = wire.encode_stats(wire.encode_concept(RecordDict(), alice, "digest"), 1, "alice", tiny_base.fingerprint, stats)
    m, got = wire.decode_concept(rd, manifest, "node 7")
    assert m.name == "alice" and m.data_digest == "digest" and not m.cached
    assert wire.adapter_digest(got) == wire.adapter_digest(alice)
    assert torch.equal(got.concepts[0].embeddings, alice.concepts[0].embeddings)
    assert all(torch.equal(got.lora[k][1], alice.lora[k][1]) for k in alice.lora)
    _, decoded = wire.decode_stats(rd, manifest, 1, "alice", "node 7")
    assert set(decoded) == set(stats)
    for site, g in stats.items():
        assert decoded[site].rows == g.rows
        assert torch.allclose(decoded[site].gram, g.gram, rtol=1e-5, atol=1e-6 * float(g.gram.abs().max()))


def test_cached_concept_sends_the_manifest_only(manifest, alice):
    rd = wire.encode_concept(RecordDict(), alice, cached=True)
    m, adapter = wire.decode_concept(rd, manifest, "node 1")
    assert m.cached and adapter is None and "concept.tensors" not in rd
    assert m.adapter_digest == wire.adapter_digest(alice)


def test_trigger_word_concept_travels_up_and_down(tiny_base, manifest):
    """A concept imported from a plain LoRA (no tokens, trigger words) crosses the wire both ways, checked."""
    from mos.shared.sd.concepts import Concept

    imp = random_adapter(tiny_base, "sks_toy", "toy", seed=9)
    imp.concepts = [Concept("sks_toy", "", torch.zeros(16, 0, 32), "sks toy")]
    m, got = wire.decode_concept(wire.encode_concept(RecordDict(), imp, "d"), manifest, "node 1")
    assert got.concepts[0].trigger == "sks toy" and got.concepts[0].embeddings.shape == (16, 0, 32)
    assert wire.adapter_digest(got) == wire.adapter_digest(imp)
    f = wire.decode_fused(wire.encode_fused(1, {}, imp.concepts, tiny_base.fingerprint, 1), manifest)
    assert [(c.name, c.trigger) for c in f.concepts] == [("sks_toy", "sks toy")]
    imp.concepts[0].trigger = "<alice> hides a handle"
    with pytest.raises(WireError, match="plain printable words"):
        wire.decode_concept(wire.encode_concept(RecordDict(), imp, "d"), manifest, "node 1")


def test_fused_payload_round_trips_and_detects_tampering(tiny_base, manifest, alice):
    lora = {k: v for k, v in alice.lora.items() if k.startswith("text_encoder.")}
    rd = wire.encode_fused(1, lora, alice.concepts, tiny_base.fingerprint, 3)
    f = wire.decode_fused(rd, manifest)
    assert f.manifest.round == 3 and [c.name for c in f.concepts] == ["alice"]
    assert all(torch.equal(f.lora[k][0], lora[k][0]) for k in lora)
    _corrupt(rd, "fused", "lora/", lambda t: t + 1.0)
    with pytest.raises(WireError, match="digest"):
        wire.decode_fused(rd, manifest)


def test_final_adapter_file_travels_byte_for_byte(tiny_base, manifest):
    data = bytes(range(256)) * 41
    rd = wire.encode_fused(4, {}, [], tiny_base.fingerprint, 1, adapter_file=data)
    assert wire.decode_fused(rd, manifest).adapter_file == data


# ------------------------------------------------------------------------------------------------ validation

def _corrupt(rd: RecordDict, part: str, key_prefix: str, fn) -> None:
    """Change one tensor of a part the way a broken or hostile client would, keeping the blob well-formed."""
    tensors = safetensors_load(rd[f"{part}.tensors"][wire.BLOB_KEY].data)
    key = sorted(k for k in tensors if k.startswith(key_prefix))[0]
    tensors[key] = fn(tensors[key].clone())
    _set_blob(rd, part, safetensors_save(tensors))


def _set_blob(rd: RecordDict, part: str, blob: bytes) -> None:
    rd[f"{part}.tensors"] = ArrayRecord({wire.BLOB_KEY: Array(dtype="uint8", shape=(len(blob),), stype=wire.STYPE,
                                                              data=blob)})


def _stats_rd(tiny_base, manifest, stage=2, **kw):
    return wire.encode_stats(RecordDict(), stage, "alice", tiny_base.fingerprint, stats_for(manifest, stage), **kw)


def _nan(t):
    t.view(-1)[0] = float("nan")
    return t


def _short(t):
    return t.reshape(-1)[:-1]


@pytest.mark.parametrize("fault, pattern", [(_nan, "NaN"), (_short, "shape|values")])
def test_bad_gram_upload_is_refused_naming_client_and_site(tiny_base, manifest, fault, pattern):
    rd = _stats_rd(tiny_base, manifest)
    _corrupt(rd, "stats", "gram/", fault)
    with pytest.raises(WireError, match=pattern) as e:
        wire.decode_stats(rd, manifest, 2, "alice", "node 42")
    assert "node 42" in str(e.value) and "site unet." in str(e.value)


def test_gram_that_is_not_xtx_is_refused(tiny_base, manifest):
    """A dense (packed) Gram is decoded as sent and refused by the fusion's one check, before it counts."""
    from mos.shared.fusion.driver import Fusion, FusionError

    fusion = Fusion(tiny_base.fingerprint, list(manifest.sites))
    stats = stats_for(manifest, 2)
    site = sorted(stats)[0]
    stats[site].gram[0, 0] = -stats[site].gram.abs().max()  # negative diagonal
    rd = wire.encode_stats(RecordDict(), 2, "alice", tiny_base.fingerprint, stats, dtype="float64")
    _, got = wire.decode_stats(rd, manifest, 2, "alice", "node 1")
    with pytest.raises(FusionError, match="negative diagonal"):
        fusion.check_stats("alice", got)
    stats = stats_for(manifest, 2)
    stats[site].gram[0, 1] = stats[site].gram[1, 0] = 10 * stats[site].gram.diagonal().max()
    rd = wire.encode_stats(RecordDict(), 2, "alice", tiny_base.fingerprint, stats, dtype="float64")
    _, got = wire.decode_stats(rd, manifest, 2, "alice", "node 1")
    with pytest.raises(FusionError, match="not XᵀX"):
        fusion.check_stats("alice", got)
    fusion.close()


def test_stats_must_cover_exactly_the_stage_sites(tiny_base, manifest):
    stats = stats_for(manifest, 2)
    del stats[sorted(stats)[0]]
    rd = wire.encode_stats(RecordDict(), 2, "alice", tiny_base.fingerprint, stats)
    with pytest.raises(WireError, match="missing"):
        wire.decode_stats(rd, manifest, 2, "alice", "node 1")
    rd = _stats_rd(tiny_base, manifest, stage=2)
    with pytest.raises(WireError, match="stage 2"):
        wire.decode_stats(rd, manifest, 3, "alice", "node 1")
    with pytest.raises(WireError, match="concept 'bob'"):
        wire.decode_stats(rd, manifest, 2, "bob", "node 1")


def test_held_out_shares_travel_beside_their_sites_and_only_where_asked(tiny_base, manifest):
    from mos.shared.fusion.stats import heldout_key

    fit = stats_for(manifest, 3)
    both = fit | {heldout_key(s): gram(g.gram.shape[0], 20, 100 + i) for i, (s, g) in enumerate(sorted(fit.items()))}
    rd = wire.encode_stats(RecordDict(), 3, "alice", tiny_base.fingerprint, both, dtype="float64")
    m = pb.StagePayload.FromString(rd["stats"]["proto"])
    assert sum(s.heldout for s in m.sites) == len(fit) and all("#" not in s.site for s in m.sites)
    _, got = wire.decode_stats(rd, manifest, 3, "alice", "node 1", heldout=True)
    assert set(got) == set(both)
    for key, g in both.items():
        assert got[key].rows == g.rows and torch.allclose(got[key].gram, g.gram)
    with pytest.raises(WireError, match="unexpected"):  # a server that asked for none takes none
        wire.decode_stats(rd, manifest, 3, "alice", "node 1")
    partial = dict(both)
    del partial[heldout_key(sorted(fit)[0])]
    rd = wire.encode_stats(RecordDict(), 3, "alice", tiny_base.fingerprint, partial)
    with pytest.raises(WireError, match="missing"):  # all of them or (an older client) none
        wire.decode_stats(rd, manifest, 3, "alice", "node 1", heldout=True)
    rd = wire.encode_stats(RecordDict(), 3, "alice", tiny_base.fingerprint, fit)
    assert set(wire.decode_stats(rd, manifest, 3, "alice", "node 1", heldout=True)[1]) == set(fit)
    assert wire.stats_cap(manifest, 3, heldout=True) > 1.9 * wire.stats_cap(manifest, 3) - (1 << 17)


def test_wrong_dimension_rows_and_base_are_refused(tiny_base, manifest):
    rd = _stats_rd(tiny_base, manifest)
    m = pb.StagePayload.FromString(rd["stats"]["proto"])
    m.sites[0].rows = 0
    rd["stats"] = ConfigRecord({"proto": m.SerializeToString()})
    with pytest.raises(WireError, match="row count 0"):
        wire.decode_stats(rd, manifest, 2, "alice", "node 1")
    m.sites[0].rows, m.sites[0].dim = 40, 33
    rd["stats"] = ConfigRecord({"proto": m.SerializeToString()})
    with pytest.raises(WireError, match="dimension 33"):
        wire.decode_stats(rd, manifest, 2, "alice", "node 1")
    rd = wire.encode_stats(RecordDict(), 2, "alice", "0" * 32, stats_for(manifest, 2))
    with pytest.raises(WireError, match="base"):
        wire.decode_stats(rd, manifest, 2, "alice", "node 1")


def test_oversized_or_broken_blob_is_refused_before_decoding(tiny_base, manifest):
    rd = _stats_rd(tiny_base, manifest)
    _set_blob(rd, "stats", bytes(wire.stats_cap(manifest, 2) + 1))
    with pytest.raises(WireError, match="over the .* cap"):
        wire.decode_stats(rd, manifest, 2, "alice", "node 1")
    _set_blob(rd, "stats", b"\xff" * 64)
    with pytest.raises(WireError, match="not valid safetensors"):
        wire.decode_stats(rd, manifest, 2, "alice", "node 1")


def test_adapter_from_another_base_or_with_bad_layers_is_refused(tiny_base, manifest, alice):
    other = random_adapter(tiny_base, "alice", "doll", 1)
    other.fingerprint = "f" * 32
    with pytest.raises(WireError, match="made on base f+.*same base"):
        wire.decode_concept(wire.encode_concept(RecordDict(), other), manifest, "node 3")
    layer = sorted(alice.lora)[0]
    bad = random_adapter(tiny_base, "alice", "doll", 1)
    B, A = bad.lora[layer]
    bad.lora[layer] = (B[:-1], A)  # wrong out dimension
    with pytest.raises(WireError, match=f"LoRA of '{layer}' is"):
        wire.decode_concept(wire.encode_concept(RecordDict(), bad), manifest, "node 3")
    bad = random_adapter(tiny_base, "alice", "doll", 1)
    bad.lora["unet.not.a.layer"] = bad.lora.pop(layer)
    with pytest.raises(WireError, match="not a LoRA target"):
        wire.decode_concept(wire.encode_concept(RecordDict(), bad), manifest, "node 3")
    bad = random_adapter(tiny_base, "alice", "doll", 1, rank=wire.MAX_RANK + 1)
    with pytest.raises(WireError, match="rank"):
        wire.decode_concept(wire.encode_concept(RecordDict(), bad), manifest, "node 3")
    rd = wire.encode_concept(RecordDict(), alice)
    _corrupt(rd, "concept", "emb/", lambda t: t * 2)
    with pytest.raises(WireError, match="digest"):
        wire.decode_concept(rd, manifest, "node 3")
    bad = random_adapter(tiny_base, "bad name!", "doll", 1)
    with pytest.raises(WireError, match="not a plain name"):
        wire.decode_concept(wire.encode_concept(RecordDict(), bad), manifest, "node 3")


def test_a_bad_upload_does_not_touch_the_fusion(tiny_base, manifest):
    """Decode-then-add: the refused client's Grams never reach the running sums, so the result is unchanged."""
    from mos.shared.fusion.driver import Fusion

    a, b = random_adapter(tiny_base, "alice", "doll", 1), random_adapter(tiny_base, "bob", "robot", 2)

    def fuse(extra: bool) -> dict:
        f = Fusion(tiny_base.fingerprint, list(manifest.sites))
        for ad, seed in ((a, 0), (b, 50)):
            f.add(ad)
            f.add_stats(ad.concepts[0].name, stats_for(manifest, 1, seed))
        if extra:
            rd = wire.encode_stats(wire.encode_concept(RecordDict(), random_adapter(tiny_base, "eve", "dog", 3)),
                                   1, "eve", tiny_base.fingerprint, stats_for(manifest, 1, 99))
            _corrupt(rd, "stats", "gram/", _nan)
            with pytest.raises(WireError):  # the server decodes the whole reply before adding anything
                _, eve = wire.decode_concept(rd, manifest, "node 9")
                eve_stats = wire.decode_stats(rd, manifest, 1, "eve", "node 9")[1]
                f.add(eve)
                f.add_stats("eve", eve_stats)
        return f.solve(1)

    clean, attacked = fuse(False), fuse(True)
    assert clean.keys() == attacked.keys()
    assert all(torch.equal(clean[k][0], attacked[k][0]) and torch.equal(clean[k][1], attacked[k][1]) for k in clean)


def test_bench_sizes_match_the_encoder(manifest):
    """bench/wire.py computes SD1.5 bytes with gram_wire_bytes: it must agree with what encode_stats sends."""
    for site in manifest.sites[:3]:
        for rows in (3, site.dim, 4 * site.dim):
            g = gram(site.dim, rows)
            for dtype in ("float32", "float64"):
                _, _, t = gram_codec.encode_gram(g, dtype)
                assert t.numel() * wire.DTYPES[dtype] == gram_codec.gram_wire_bytes(site.dim, rows, dtype)
