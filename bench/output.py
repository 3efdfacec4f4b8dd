"""What every bench ends with: its result as JSON, with the command line that made it, written and printed."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def write(result: dict, out: str | Path, script: str, show: bool = True) -> Path:
    """Add `command` (how to run it again), write `out` (folders made) and, with `show`, print the JSON."""
    result = {**result, "command": " ".join(["python", script, *sys.argv[1:]])}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if show:
        print(json.dumps(result, indent=2))
    return path
