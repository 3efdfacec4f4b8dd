"""The server's run settings, as Flower run config.

`server/flwr_app/pyproject.toml` declares every key with its default under `[tool.flwr.app.config]`; `mos-server`
passes the operator's choices with `flwr run --run-config`, the way any Flower app is configured, and the
ServerApp reads them from `context.run_config`. Keys are Flower's style (kebab-case); values are TOML scalars.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from mos.shared.fusion.config import FusionConfig

# run-config key -> FusionConfig field
FUSION_KEYS = {"method": "method", "one-shot": "one_shot", "eps": "eps", "sample-steps": "sample_steps",
               "sample-seed": "sample_seed", "guidance": "guidance", "gram-dtype": "gram_dtype",
               "placement": "placement", "kv-eps": "kv_eps"}
HELDOUT_VALUES = {"base": None, "true": True, "false": False}  # run-config "heldout" -> FusionConfig.heldout


@dataclass(frozen=True)
class Settings:
    out: str
    state_dir: str
    rounds: int = 1
    min_clients: int = 2
    stage_timeout: float = 600.0
    base: str = "tiny"
    preview: bool = True
    preview_steps: int = 20
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def run_config(self) -> dict[str, Any]:
        own = {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self) if f.name != "fusion"}
        fusion = {key: getattr(self.fusion, attr) for key, attr in FUSION_KEYS.items()}
        fusion["placement"] = fusion["placement"] or ""  # TOML has no null: "" is the base's default
        fusion["eps"] = -1.0 if fusion["eps"] is None else fusion["eps"]  # ... and eps < 0 is λ by GCV
        fusion["kv-eps"] = -1.0 if fusion["kv-eps"] is None else fusion["kv-eps"]  # < 0: the base's default
        fusion["heldout"] = next(k for k, v in HELDOUT_VALUES.items() if v is self.fusion.heldout)
        return own | fusion

    @classmethod
    def from_run_config(cls, rc: dict[str, Any]) -> "Settings":
        """From Flower's run config; a key missing or of the wrong type is a clear error."""
        def get(key: str, typ: type) -> Any:
            if key not in rc:
                raise ValueError(f"run config lacks {key!r} (server/flwr_app/pyproject.toml declares every key)")
            v = rc[key]
            if typ is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
                raise ValueError(f"run config {key}={v!r}: expected {typ.__name__}")
            return v

        types = {"out": str, "state-dir": str, "rounds": int, "min-clients": int, "stage-timeout": float, "base": str,
                 "preview": bool, "preview-steps": int}
        own = {k.replace("-", "_"): get(k, t) for k, t in types.items()}
        ftypes = {f.name: f.type.split(" | ")[0] for f in fields(FusionConfig)}
        values = {attr: get(key, {"str": str, "bool": bool, "int": int, "float": float}[ftypes[attr]])
                  for key, attr in FUSION_KEYS.items()}
        values["placement"] = values["placement"] or None  # "": the base's default
        values["eps"] = None if values["eps"] < 0 else values["eps"]  # < 0: λ per site by GCV
        values["kv_eps"] = None if values["kv_eps"] < 0 else values["kv_eps"]  # < 0: the base's default
        heldout = get("heldout", str)
        if heldout not in HELDOUT_VALUES:
            raise ValueError(f"run config heldout={heldout!r}: expected one of {', '.join(HELDOUT_VALUES)}")
        return cls(**own, fusion=FusionConfig(**values, heldout=HELDOUT_VALUES[heldout]))
