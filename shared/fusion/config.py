"""How a fusion runs: one object for every setting, shared by `mos fuse`, `mos-server` and the clients.

The clients need the part of it that decides what they compute (one-shot or staged, how Grams travel, how
stage-3 statistics are sampled); it travels in the protocol's TuneRequest and FusedManifest, so a federated
round computes exactly what `mos fuse` computes with the same config, defaults or not.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

METHODS = ("gradient", "weight")
GRAM_DTYPES = ("float32", "float64")

# The product's ridge: λ = ε·tr(ΣG)/d per input site with ε = 1e-2; eps=None (`--eps gcv`) picks λ per site by
# generalized cross-validation from the Grams and the per-concept terms (solver.py, "Choosing lam per site").
# GCV is not the default because it counts every recorded row as an independent sample: real rows are tokens of a
# few images and steps of a few trajectories, so it sees little overfitting and picks λ near the floor. On two tuned
# tiny-base concepts it picked ε <= 1e-3 at most sites and retention error was 0.037 / 0.086 (alice / bob) against
# 0.019 / 0.029 at ε = 1e-2 (0.039 / 0.088 at 1e-8). On synthetic SD1.5-size layer problems with independent rows
# (bench/ridge.py) it is at or below the reference's LBFGS on fresh rows everywhere (docs/figures.md).
FUSION_EPS: float | None = 1e-2
GCV = "gcv"

# The cross-attention k/v stage's ridge where it was measured to need its own. Its rows are a handful of token
# states per concept (the concept's tokens and the end token), and two concepts' states differ little, so a small
# ridge fits their different targets through the tiny difference between them: on the world base the fused
# mid-block to_k came out 4.4x the base weight's norm (each concept's own change: 0.4x and 0.06x), which failed the
# demo round's bound check, and such a fused k/v moves every token's keys. ε = 0.1 at stage 2 keeps the fused k/v
# within the concepts' reach and kept alice / bob / carol at 0.96 / 0.83 / 0.73 of the pictures against
# 0.90 / 0.75 / 0.73 (docs/world.md, "Trials of the sixteenth session"). Elsewhere `eps` (unmeasured there).
KV_EPS = {"world": 0.1}


# Stage 3's λ per spatial site can be chosen on held-out rows (the default on the toy bases): each concept also samples
# its first statistics prompts once more from other seeds, and the server keeps, per site, the λ on GCV's grid (up to ε
# = 1) whose fused layer best reproduces every concept on those fresh rows (solver.py, "Choosing lam per site on
# held-out rows"). Spatial rows are steps of a few trajectories, so a second set of trajectories is what "fresh" means
# there; the text encoder's and k/v sites' rows are the concept's tokens in the fixed statistics prompts, with nothing
# fresh to hold out, and keep the fixed ε. On the world base's three concepts it kept alice / bob / carol at 0.94 /
# 0.81–0.83 / 0.77–0.79 of the pictures against 0.94 / 0.81 / 0.71 at ε = 1e-2, and tied on tiny (docs/world.md,
# docs/figures.md). It costs stage 3 one trajectory per prompt sampled more and a second Gram a spatial site: on the toy
# bases a fraction of a megabyte, so it is their default; on SD1.5 it would double the largest upload (query.spatial,
# ~99 MB more per client: ~250 MB against the 150 MB budget of docs/protocol.md) for a gain not yet measured there, so
# real bases keep ε unless asked (`--eps heldout`).
HELDOUT = "heldout"
HELDOUT_BASES = ("tiny", "world")


def heldout_by_default(base_spec: str) -> bool:
    return base_spec.partition(":")[0] in HELDOUT_BASES


def parse_eps(text: str) -> float | None:
    """A number fixes ε; "gcv" picks λ per site by GCV (None)."""
    if text.strip().lower() == GCV:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"ridge factor {text!r}: a number >= 0, or {GCV!r}") from None


# --eps left unset: ε = 1e-2, and held-out λ where the base's default says so
RIDGE_DEFAULT: tuple[float | None, bool | None] = (FUSION_EPS, None)


def parse_ridge(text: str) -> tuple[float | None, bool]:
    """The --eps value as (eps, heldout): "heldout" chooses stage 3's λ on held-out rows, ε = 1e-2 elsewhere; a
    number fixes ε at every site; "gcv" picks λ per site by GCV."""
    if text.strip().lower() == HELDOUT:
        return FUSION_EPS, True
    return parse_eps(text), False


@dataclass(frozen=True)
class FusionConfig:
    method: str = "gradient"     # gradient fusion, or the paper's weight-fusion baseline (LoRA deltas averaged)
    one_shot: bool = False       # every statistic from each concept's own model, in one exchange
    eps: float | None = FUSION_EPS  # ridge: λ = ε·tr(ΣG)/d per input site; None = λ per site by GCV
    sample_steps: int = 20       # stage 3 records spatial inputs while sampling this many steps ...
    sample_seed: int = 0         # ... from these starting latents ...
    guidance: float = 7.5        # ... at this classifier-free guidance
    gram_dtype: str = "float32"  # how clients send Grams: float32 (half the bytes) or float64 (exact)
    placement: str | None = None  # layers fused (sd/sites.py); None: the base's default, as tuning uses
    kv_eps: float | None = None  # ridge factor of the k/v sites (stage 2); None: the base's (KV_EPS), else eps
    heldout: bool | None = None  # stage 3: λ per site chosen on held-out trajectories (eps: the other stages');
    #                              None: the base's default (heldout_by_default)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown fusion method {self.method!r}: {', '.join(METHODS)}")
        if self.gram_dtype not in GRAM_DTYPES:
            raise ValueError(f"Gram dtype {self.gram_dtype!r}: use {' or '.join(GRAM_DTYPES)}")
        if not 1 <= self.sample_steps <= 1000:
            raise ValueError(f"stage-3 sampling steps must be 1..1000, not {self.sample_steps}")
        if not 0 <= self.guidance <= 100 or not 0 <= self.sample_seed < 2**32:
            raise ValueError(f"guidance {self.guidance} (0..100) or seed {self.sample_seed} (0..2^32) out of range")
        if self.placement not in (None, "attention", "transformer", "wide"):
            raise ValueError(f"placement {self.placement!r}: use attention, transformer or wide")
        for name, eps in (("ε", self.eps), ("ε of the k/v stage", self.kv_eps)):
            if eps is not None and not eps >= 0:
                raise ValueError(f"ridge factor {name} must be >= 0, not {eps}")

    def as_dict(self) -> dict:
        return asdict(self)

    def resolved(self, base_spec: str) -> "FusionConfig":
        """With the placement the base's recipe tunes (when unset: the fusion then covers every tuned layer), the
        base's k/v ridge and its held-out default (when unset)."""
        from mos.shared.sd.architectures import default_placement

        placement = self.placement or default_placement(base_spec)
        kv_eps = self.kv_eps if self.kv_eps is not None else KV_EPS.get(base_spec)
        heldout = self.heldout if self.heldout is not None else heldout_by_default(base_spec)
        return replace(self, placement=placement, kv_eps=kv_eps, heldout=heldout)

    @property
    def uses_heldout(self) -> bool:
        """Stage 3 records a held-out share and its sites' λ are chosen on it: staged gradient fusion only. One-shot
        statistics all come from each concept's own model; there held-out λ doubled the tiny base's retention
        error (0.027 against 0.015 at ε = 1e-2), where staged it tied (docs/figures.md)."""
        return bool(self.heldout) and not self.one_shot and self.method == "gradient"

    def eps_at(self, stage: int) -> float | None:
        """The ridge factor of a site of this stage (None: λ by GCV)."""
        return self.kv_eps if stage == 2 and self.kv_eps is not None else self.eps
