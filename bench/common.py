"""What every benchmark shares: its context (sizes, folders) and helpers. A benchmark module has
`FIGURES` (the names of the figures it measures) and `run(ctx) -> dict[str, Measurement]`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20


@dataclass
class Context:
    quick: bool
    tmp: Path  # a private temporary folder for this run (removed at the end)
    log: Any = print

    def dir(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def run_json(argv: list[str], *, timeout: float, cwd: Path = ROOT) -> tuple[dict[str, Any], float]:
    """Run a Python helper that prints one JSON line last; returns it and the wall time from spawn to exit."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited with {proc.returncode}: {proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(argv[:3])} printed no JSON: {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    return json.loads(lines[-1]), wall


def mb(value: float | None) -> float | None:
    return None if value is None else round(value / MB, 1)
