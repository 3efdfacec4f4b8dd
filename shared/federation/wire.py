"""What travels between mos-server and mos-client, inside Flower records, and the checks on every upload.

A message's RecordDict holds, per part, a ConfigRecord `<part>` with one key `proto` (a serialised manifest
from protos/mos.proto, version first) and an ArrayRecord `<part>.tensors` holding one Array: a safetensors blob
with the tensors the manifest lists (TensorSpec: key, shape, dtype). Nothing is ever unpickled.

Parts: `tune` (server asks for an adapter + stage-1 statistics), `concept` (a client's adapter), `stats` (a client's
Gram matrices for one stage), `fused` (a fused LoRA, or the final adapter file), `notice` (you are out / done).

Grams travel as an upper-triangular factor R with RᵀR = G (k × d, k = rank ≤ rows: never larger than the packed
upper triangle, smaller where a Gram has few rows), or packed-symmetric in float64: a client never sends
activations. Every upload is checked against the base manifest (sites and dimensions from `input_sites`)
before it reaches a sum; a problem raises WireError naming the client, the part and the site.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from mos.protos import mos_pb2 as pb
from mos.shared.federation.gram_codec import GRAM_DTYPE, GramError, decode_gram, encode_gram
from mos.shared.formats.adapter import Adapter
from mos.shared.fusion.config import FusionConfig
from mos.shared.fusion.gram import packed_len
from mos.shared.fusion.stats import Stats, heldout_key, site_of_key
from mos.shared.sd.base import check_same_base
from mos.shared.sd.concepts import N_TOKENS, Concept, check_class_word, check_name, check_trigger
from mos.shared.sd.lora import Lora
from mos.shared.sd.sites import Site, cross_attention_layers, input_sites

PROTOCOL_VERSION = 1
STYPE = "mos.safetensors"
DTYPES = {"float32": 4, "float64": 8, "uint8": 1}  # what may travel, and its bytes per element
MAX_RANK = 128           # per layer in one client's adapter (ED-LoRA uses 4; community LoRAs up to 128)
MAX_ROWS = 1 << 40
MAX_ADAPTER_FILE = 2 << 30
# For callers that still `.match` a name (shared/formats/import_lora.py): \Z, unlike $, refuses "alice\n".


class WireError(ValueError):
    """An upload or download that cannot be accepted; the message says whose, which part and why."""


# ------------------------------------------------------------------------------------------------ base manifest

@dataclass(frozen=True)
class BaseManifest:
    """What the server checks uploads against: the base's fingerprint, input sites and embedding shape."""

    fingerprint: str
    sites: tuple[Site, ...]
    n_layers: int
    embedding_dim: int

    @classmethod
    def from_base(cls, base, placement: str = "attention") -> "BaseManifest":
        return cls(base.fingerprint, tuple(input_sites(base.text_encoder, base.unet, placement)),
                   len(cross_attention_layers(base.unet)), int(base.text_encoder.config.hidden_size))

    def site(self, name: str) -> Site | None:
        return self._sites.get(name)

    @property
    def _sites(self) -> dict[str, Site]:
        return {s.name: s for s in self.sites}

    def layer_dims(self) -> dict[str, tuple[int, int]]:
        """layer -> (in_dim, out_dim)."""
        return {l: (s.dim, o) for s in self.sites for l, o in zip(s.layers, s.out_dims)}

    def stage_sites(self, stage: int, one_shot: bool = False) -> list[Site]:
        return list(self.sites) if (stage == 1 and one_shot) else [s for s in self.sites if s.stage == stage]

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "n_layers": self.n_layers, "embedding_dim": self.embedding_dim,
                "sites": [s.as_dict() for s in self.sites]}

    @classmethod
    def from_json(cls, d: dict) -> "BaseManifest":
        sites = tuple(Site(s["site"], s["dim"], tuple(l["name"] for l in s["layers"]),
                           tuple(l["out_dim"] for l in s["layers"]), s["stage"]) for s in d["sites"])
        return cls(d["fingerprint"], sites, d["n_layers"], d["embedding_dim"])


# ------------------------------------------------------------------------------------------------ tensors
#
# All tensors of one part travel as ONE safetensors blob in one Flower Array: Flower moves every Array as its own
# object (an HTTP request each), and an adapter has hundreds of small tensors; one blob is one object (chunked by
# Flower past 5 MiB). safetensors parses untrusted bytes without running code; the manifest's TensorSpecs are
# checked against what the blob holds.

Tensors = dict[str, torch.Tensor]
BLOB_KEY = "safetensors"


def _put(tensors: Tensors, key: str, t: torch.Tensor, dtype: str | None = None) -> pb.TensorSpec:
    dtype = dtype or str(t.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise WireError(f"{key}: dtype {dtype} cannot travel (allowed: {', '.join(DTYPES)})")
    tensors[key] = t.detach().to("cpu", getattr(torch, dtype)).contiguous()
    return pb.TensorSpec(key=key, shape=list(tensors[key].shape), dtype=dtype)


def _get(tensors: Tensors, spec: pb.TensorSpec, where: str, shape: tuple[int, ...] | None = None,
         dtypes: tuple[str, ...] = ("float32", "float64")) -> torch.Tensor:
    """The tensor a spec names, after checking dtype and shape; float tensors must be finite."""
    t = tensors.get(spec.key)
    if t is None:
        raise WireError(f"{where}: tensor {spec.key!r} is missing")
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype != spec.dtype or dtype not in dtypes:
        raise WireError(f"{where}: tensor {spec.key!r} is {dtype} (manifest: {spec.dtype}), expected one of {dtypes}")
    got = tuple(int(x) for x in t.shape)
    if got != tuple(spec.shape):
        raise WireError(f"{where}: tensor {spec.key!r} has shape {got}, its manifest says {tuple(spec.shape)}")
    if shape is not None and got != shape:
        raise WireError(f"{where}: tensor {spec.key!r} has shape {got}, this base expects {shape}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise WireError(f"{where}: tensor {spec.key!r} holds NaN or Inf")
    return t


def _proto(rd: RecordDict, part: str, cls, where: str):
    rec = rd.get(part) if part in rd else None
    if not isinstance(rec, ConfigRecord) or not isinstance(rec.get("proto"), bytes):
        raise WireError(f"{where}: message has no {part!r} manifest")
    msg = cls()
    try:
        msg.ParseFromString(rec["proto"])
    except Exception as e:  # protobuf's DecodeError
        raise WireError(f"{where}: {part!r} manifest is not a valid {cls.__name__} ({e})") from None
    if msg.version != PROTOCOL_VERSION:
        raise WireError(f"{where}: {part!r} speaks protocol version {msg.version}, this build speaks "
                        f"{PROTOCOL_VERSION}; update mos on both sides to the same release")
    return msg


def _blob(rd: RecordDict, part: str, where: str) -> bytes:
    key = f"{part}.tensors"
    rec = rd.get(key) if key in rd else None
    if rec is None:
        return b""
    arr = rec.get(BLOB_KEY) if isinstance(rec, ArrayRecord) else None
    if arr is None or arr.stype != STYPE or arr.dtype != "uint8" or len(rec) != 1:
        raise WireError(f"{where}: {key!r} must hold one {STYPE} blob")
    return arr.data


def _tensors(rd: RecordDict, part: str, where: str, cap: int | None = None) -> Tensors:
    """The part's tensors, refusing a blob over `cap` bytes before parsing it."""
    blob = _blob(rd, part, where)
    if cap is not None and len(blob) > cap:
        raise WireError(f"{where}: {part} upload of {len(blob)} bytes is over the {cap}-byte cap")
    if not blob:
        return {}
    try:
        return safetensors_load(blob)
    except Exception as e:  # safetensors' SafetensorError: a header or offsets that do not add up
        raise WireError(f"{where}: {part} tensors are not valid safetensors ({e})") from None


def _pack(rd: RecordDict, part: str, msg, tensors: Tensors | None = None, blob: bytes | None = None) -> RecordDict:
    msg.version = PROTOCOL_VERSION
    rd[part] = ConfigRecord({"proto": msg.SerializeToString()})
    if blob is None and tensors:
        blob = safetensors_save(tensors)
    if blob:
        rd[f"{part}.tensors"] = ArrayRecord({BLOB_KEY: Array(dtype="uint8", shape=(len(blob),), stype=STYPE,
                                                             data=blob)})
    return rd


def record_bytes(rd: RecordDict) -> int:
    """Bytes of a message's payload (manifests and tensors), for progress lines and the bench."""
    return sum(r.count_bytes() for r in rd.values())


# ------------------------------------------------------------------------------------------------ LoRA

def _put_lora(tensors: Tensors, lora: Lora, prefix: str = "lora") -> list[pb.LoraLayer]:
    out = []
    for layer, (B, A) in sorted(lora.items()):
        out.append(pb.LoraLayer(name=layer, rank=int(A.shape[0]), in_dim=int(A.shape[1]), out_dim=int(B.shape[0]),
                                a=_put(tensors, f"{prefix}/{layer}/A", A), b=_put(tensors, f"{prefix}/{layer}/B", B)))
    return out


def _get_lora(tensors: Tensors, layers, dims: dict[str, tuple[int, int]], where: str,
              max_rank: int | None) -> Lora:
    lora: Lora = {}
    for l in layers:
        if l.name not in dims:
            raise WireError(f"{where}: LoRA on {l.name!r}, which is not a LoRA target of this base")
        if l.name in lora:
            raise WireError(f"{where}: LoRA of {l.name!r} sent twice")
        d_in, d_out = dims[l.name]
        if (l.in_dim, l.out_dim) != (d_in, d_out):
            raise WireError(f"{where}: LoRA of {l.name!r} is {l.out_dim}x{l.in_dim}, the base layer is {d_out}x{d_in}")
        if not 1 <= l.rank <= (max_rank or max(d_in, d_out)):
            raise WireError(f"{where}: LoRA of {l.name!r} has rank {l.rank}, allowed 1..{max_rank or max(d_in, d_out)}")
        A = _get(tensors, l.a, f"{where}, layer {l.name}", (l.rank, d_in))
        B = _get(tensors, l.b, f"{where}, layer {l.name}", (d_out, l.rank))
        lora[l.name] = (B, A)
    return lora


# ------------------------------------------------------------------------------------------------ digests

def tensor_digest(tensors: dict[str, torch.Tensor], extra: object = None) -> str:
    """sha256 over named tensors (dtype, shape, bytes) and a JSON-able extra."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def adapter_digest(adapter: Adapter) -> str:
    tensors = {f"lora/{l}/{n}": t for l, (B, A) in adapter.lora.items() for n, t in (("A", A), ("B", B))}
    tensors |= {f"emb/{c.name}": c.embeddings for c in adapter.concepts}
    return tensor_digest(tensors, [adapter.fingerprint, [_concept_id(c) for c in adapter.concepts]])


def held_token(name: str, digest: str) -> str:
    """How train.tune lists an adapter the server holds: a hash of name and digest. The client that holds that
    adapter recognises it; no one else learns a digest to claim it with ("cached" needs the digest itself)."""
    return "h:" + hashlib.sha256(f"{name}:{digest}".encode()).hexdigest()


def _concept_id(c) -> list[str]:
    """What names a concept besides its tensors (a trigger only where there is one: older digests stay valid)."""
    return [c.name, c.class_word, *([c.trigger] if c.trigger else [])]


# ------------------------------------------------------------------------------------------------ parts

def encode_tune(fingerprint: str, round_: int, config: FusionConfig, known: list[str]) -> RecordDict:
    m = pb.TuneRequest(base_fingerprint=fingerprint, round=round_, known=sorted(known))
    _put_config(m, config)
    return _pack(RecordDict(), "tune", m)


def _put_config(m, config: FusionConfig) -> None:
    """The part of the fusion config a client needs, into a TuneRequest or FusedManifest."""
    m.one_shot, m.gram_dtype, m.placement = config.one_shot, config.gram_dtype, config.placement or "attention"
    m.sampling.CopyFrom(pb.Sampling(steps=config.sample_steps, seed=config.sample_seed, guidance=config.guidance,
                                    heldout=config.uses_heldout))


def config_of(m) -> FusionConfig:
    """What a TuneRequest / FusedManifest asks the client to compute (defaults where an older server left it unset)."""
    d = FusionConfig()
    s = m.sampling if m.HasField("sampling") else None
    try:
        return FusionConfig(one_shot=m.one_shot, gram_dtype=m.gram_dtype or d.gram_dtype,
                            placement=m.placement or "attention",
                            sample_steps=s.steps if s else d.sample_steps, sample_seed=s.seed if s else d.sample_seed,
                            guidance=s.guidance if s else d.guidance, heldout=s.heldout if s else False)
    except ValueError as e:
        raise WireError(f"server: {e}") from None


def decode_tune(rd: RecordDict, where: str = "server") -> pb.TuneRequest:
    return _proto(rd, "tune", pb.TuneRequest, where)


def encode_notice(kind: str, reason: str, round_: int = 0) -> RecordDict:
    return _pack(RecordDict(), "notice", pb.Notice(kind=kind, reason=reason, round=round_))


def decode_notice(rd: RecordDict, where: str = "server") -> pb.Notice:
    return _proto(rd, "notice", pb.Notice, where)


def encode_concept(rd: RecordDict, adapter: Adapter, data_digest: str = "", cached: bool = False,
                   client_version: str = "") -> RecordDict:
    """A client's adapter; with `cached`, the manifest only (the server already holds it, same digest)."""
    if len(adapter.concepts) != 1:
        raise WireError(f"a client sends one concept, this adapter holds {len(adapter.concepts)}")
    c = adapter.concepts[0]
    tensors: Tensors = {}
    m = pb.ConceptManifest(name=c.name, class_word=c.class_word, base_fingerprint=adapter.fingerprint,
                           adapter_digest=adapter_digest(adapter), data_digest=data_digest,
                           n_layers=int(c.embeddings.shape[0]), embedding_dim=int(c.embeddings.shape[-1]),
                           cached=cached, client_version=client_version, trigger=c.trigger)
    if not cached:
        m.lora.extend(_put_lora(tensors, adapter.lora))
        m.embeddings.CopyFrom(_put(tensors, f"emb/{c.name}", c.embeddings))
    return _pack(rd, "concept", m, tensors)


def concept_manifest(rd: RecordDict, client: str) -> pb.ConceptManifest:
    """The manifest alone, checked for name, version and base: enough to refuse before reading tensors."""
    m = _proto(rd, "concept", pb.ConceptManifest, client)
    _plain(m.name, m.class_word, client)
    return m


def _plain(name: str, class_word: str, where: str) -> None:
    """Names become folders, keys and log lines on both sides: fullmatch, and class words bounded."""
    try:
        check_name(name, where)
        check_class_word(class_word, f"{where} (concept {name!r})")
    except ValueError as e:
        raise WireError(str(e)) from None


def decode_concept(rd: RecordDict, base: BaseManifest, client: str) -> tuple[pb.ConceptManifest, Adapter | None]:
    m = concept_manifest(rd, client)
    where = f"{client} (concept {m.name!r})"
    check_same_base(where, m.base_fingerprint, base.fingerprint, WireError)
    if m.cached:
        return m, None
    tensors = _tensors(rd, "concept", where, adapter_cap(base))
    lora = _get_lora(tensors, m.lora, base.layer_dims(), where, MAX_RANK)
    emb = _get(tensors, m.embeddings, f"{where}, embeddings", _emb_shape(base, m.trigger))
    adapter = Adapter(m.base_fingerprint, [Concept(m.name, m.class_word, emb.float(), _trigger(m.trigger, where))],
                      {k: (B.float(), A.float()) for k, (B, A) in lora.items()})
    if adapter_digest(adapter) != m.adapter_digest:
        raise WireError(f"{where}: adapter digest does not match its tensors")
    return m, adapter


def _emb_shape(base: BaseManifest, trigger: str) -> tuple[int, int, int]:
    return (base.n_layers, 0 if trigger else N_TOKENS, base.embedding_dim)


def _trigger(trigger: str, where: str) -> str:
    if not trigger:
        return ""
    try:
        return check_trigger(trigger)
    except ValueError as e:
        raise WireError(f"{where}: {e}") from None


def adapter_cap(base: BaseManifest) -> int:
    dims = base.layer_dims().values()
    return sum(MAX_RANK * (i + o) * 8 for i, o in dims) + base.n_layers * N_TOKENS * base.embedding_dim * 8 + (1 << 16)


def stats_cap(base: BaseManifest, stage: int, one_shot: bool = False, heldout: bool = False) -> int:
    return sum(packed_len(s.dim) * 8 for s in stats_sites(base, stage, one_shot, heldout).values()) + (1 << 16)


def stats_sites(base: BaseManifest, stage: int, one_shot: bool = False, heldout: bool = False) -> dict[str, Site]:
    """Statistics key -> site of what one stage's reply carries: every site of the stage, and with `heldout` the
    held-out share of each spatial one (stats.heldout_key)."""
    sites = base.stage_sites(stage, one_shot)
    return {s.name: s for s in sites} | {heldout_key(s.name): s for s in sites if heldout and s.stage == 3}


def upload_cap(base: BaseManifest, one_shot: bool = False, heldout: bool = False) -> int:
    """The most one reply may carry (train.tune: adapter + stage-1 statistics; or a later stage's statistics),
    plus room for the manifests: what the server's gateway lets one reply push before refusing the rest."""
    stats = max(stats_cap(base, 1, one_shot, heldout), *(stats_cap(base, s, heldout=heldout) for s in (2, 3)))
    return adapter_cap(base) + stats + (1 << 20)


def encode_stats(rd: RecordDict, stage: int, concept: str, fingerprint: str, stats: Stats,
                 from_cache: bool = False, dtype: str = GRAM_DTYPE) -> RecordDict:
    tensors: Tensors = {}
    m = pb.StagePayload(stage=stage, concept=concept, base_fingerprint=fingerprint, from_cache=from_cache)
    for key, g in sorted(stats.items()):
        enc, rank, t = encode_gram(g, dtype)
        site, held_out = site_of_key(key)
        m.sites.append(pb.SiteStats(site=site, dim=int(g.gram.shape[0]), rows=int(g.rows), encoding=enc, rank=rank,
                                    tensor=_put(tensors, f"gram/{key}", t, dtype), heldout=held_out))
    return _pack(rd, "stats", m, tensors)


def decode_stats(rd: RecordDict, base: BaseManifest, stage: int, concept: str, client: str,
                 one_shot: bool = False, heldout: bool = False) -> tuple[pb.StagePayload, Stats]:
    """Every site of the stage exactly once (with `heldout`, each spatial site's held-out share too), each Gram's
    layout checked (its content: Fusion.check_stats); nothing partial comes back."""
    m = _proto(rd, "stats", pb.StagePayload, client)
    where = f"{client} (concept {concept!r}, stage {stage})"
    if m.stage != stage or m.concept != concept:
        raise WireError(f"{where}: payload is for stage {m.stage}, concept {m.concept!r}")
    check_same_base(f"{where}: the statistics", m.base_fingerprint, base.fingerprint, WireError)
    got = [heldout_key(s.site) if s.heldout else s.site for s in m.sites]
    # a client that records no held-out share (an older one) is answered at the fixed ε on those sites
    want = stats_sites(base, stage, one_shot, heldout and any(s.heldout for s in m.sites))
    if sorted(got) != sorted(want) or len(set(got)) != len(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise WireError(f"{where}: sites do not match the base manifest (missing {missing[:3]}, unexpected "
                        f"{extra[:3]}{', duplicates' if len(set(got)) != len(got) else ''})")
    tensors = _tensors(rd, "stats", where, stats_cap(base, stage, one_shot, heldout))
    stats: Stats = {}
    for s, key in zip(m.sites, got):
        site = want[key]
        w = f"{where}, site {key}"
        if s.dim != site.dim:
            raise WireError(f"{w}: dimension {s.dim}, the base's is {site.dim}")
        if not 1 <= s.rows <= MAX_ROWS:
            raise WireError(f"{w}: row count {s.rows} out of range 1..{MAX_ROWS}")
        try:
            stats[key] = decode_gram(s.encoding, s.rank, _get(tensors, s.tensor, w), site.dim, int(s.rows), w)
        except GramError as e:
            raise WireError(str(e)) from None
    return m, stats


@dataclass
class Fused:
    manifest: pb.FusedManifest
    lora: Lora
    concepts: list[Concept]
    adapter_file: bytes | None


def encode_fused(stage: int, lora: Lora, concepts: list[Concept], fingerprint: str, round_: int,
                 config: FusionConfig = FusionConfig(), adapter_file: bytes | None = None) -> RecordDict:
    """Down to clients: a fused LoRA with every concept's embeddings, or (stage 4) the final adapter file."""
    tensors: Tensors = {}
    m = pb.FusedManifest(stage=stage, base_fingerprint=fingerprint, round=round_)
    _put_config(m, config)
    if adapter_file is not None:
        m.adapter_file.CopyFrom(_put(tensors, "file/adapter", torch.frombuffer(bytearray(adapter_file), dtype=torch.uint8)))
    else:
        m.lora.extend(_put_lora(tensors, lora))
        for c in concepts:
            m.concepts.append(pb.ConceptEntry(name=c.name, class_word=c.class_word, trigger=c.trigger,
                                              embeddings=_put(tensors, f"emb/{c.name}", c.embeddings)))
    blob = safetensors_save(tensors)
    m.digest = _digest(blob, m)
    return _pack(RecordDict(), "fused", m, blob=blob)


def _digest(blob: bytes, m: pb.FusedManifest) -> str:
    """What a fused payload is, for the clients' statistics cache and as a check on the way."""
    head = json.dumps([m.stage, m.base_fingerprint, [_concept_id(c) for c in m.concepts],
                       *([m.sampling.steps, m.sampling.seed, m.sampling.guidance] if m.HasField("sampling") else [])]
                      ).encode()
    return hashlib.sha256(head + b"\n" + blob).hexdigest()


def decode_fused(rd: RecordDict, base: BaseManifest, where: str = "server") -> Fused:
    """What the server sent, checked against this client's base (shapes, finiteness, fingerprint, digest)."""
    m = _proto(rd, "fused", pb.FusedManifest, where)
    check_same_base(f"{where}: the fused result", m.base_fingerprint, base.fingerprint, WireError)
    blob = _blob(rd, "fused", where)
    if len(blob) > MAX_ADAPTER_FILE:
        raise WireError(f"{where}: fused payload of {len(blob)} bytes is over the cap")
    if _digest(blob, m) != m.digest:
        raise WireError(f"{where}: fused payload does not match its digest")
    tensors = _tensors(rd, "fused", where)
    if m.HasField("adapter_file"):
        data = _get(tensors, m.adapter_file, where, dtypes=("uint8",)).numpy().tobytes()
        return Fused(m, {}, [], data)
    lora = _get_lora(tensors, m.lora, base.layer_dims(), where, None)
    for c in m.concepts:  # the client exports these names as files: checked here, before anything is written
        _plain(c.name, c.class_word, f"{where}, a concept")
    concepts = [Concept(c.name, c.class_word,
                        _get(tensors, c.embeddings, f"{where}, concept {c.name}", _emb_shape(base, c.trigger)).float(),
                        _trigger(c.trigger, f"{where}, concept {c.name}"))
                for c in m.concepts]
    return Fused(m, lora, concepts, None)
