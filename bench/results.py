"""The committed benchmark results, bench/results/figures.json, and the README table made from them.

One entry per figure, each carrying the run that measured it (machine, commit, ONNX Runtime
version, load average, time, command): a partial run (`--only`) replaces the figures it measured
and leaves every other figure with its own run. A new benchmark adds figures; the format stays."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.common import ROOT

RESULTS_DIR = ROOT / "bench" / "results"
RESULTS_FILE = RESULTS_DIR / "figures.json"  # committed; everything else under bench/results/ is scratch
README = ROOT / "README.md"
BEGIN = "<!-- bench:begin: made by `make bench-readme` from bench/results/figures.json; do not edit -->"
END = "<!-- bench:end -->"

# A figure is one number, or one number per label (e.g. per sample count, per model).
Value = float | dict[str, float | None] | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Machine(_Strict):
    cpu: str
    cores: int
    memory_gb: float
    os: str
    python: str
    onnxruntime: str
    numpy: str

    def describe(self) -> str:
        return (
            f"{self.cpu}, {self.cores} cores, {self.memory_gb} GB RAM, {self.os}, Python {self.python}, "
            f"ONNX Runtime {self.onnxruntime}"
        )


class Run(_Strict):
    """Where, when and from which code one benchmark measured its figures."""

    benchmark: str
    command: str
    commit: str | None
    dirty: bool | None = Field(description="uncommitted changes to the code (results and docs aside)")
    finished_at: str  # ISO 8601, UTC
    duration_s: float
    quick: bool
    # 1, 5 and 15-minute load averages just before and just after: the machine may be shared.
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    machine: Machine


class Baseline(_Strict):
    what: str
    value: Value
    note: str = ""


class Measurement(_Strict):
    """What a benchmark reports for one figure; `value` is ours, `baseline` the same work done
    another way in the same run."""

    what: str  # the README row's label
    unit: str
    value: Value
    baseline: Baseline | None = None
    ratio: float | None = None  # value / baseline where that is the point of the figure
    target: str = ""
    met: bool | None = None
    errors: list[str] = []
    details: dict[str, Any] = {}


class Figure(Measurement):
    run: Run


class Results(_Strict):
    format: Literal[1] = 1
    figures: dict[str, Figure] = {}

    @classmethod
    def load(cls, path: Path = RESULTS_FILE) -> Results:
        if not path.exists():
            return cls()
        return cls.model_validate_json(path.read_text())

    def save(self, path: Path = RESULTS_FILE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")

    def merged(self, new: dict[str, Figure], order: Iterable[str] = ()) -> Results:
        """These results with `new` figures replacing (or adding to) the old; the others untouched.
        Figures come in `order` first, then any others in their old order."""
        figures = {**self.figures, **new}
        ordered = {k: figures[k] for k in order if k in figures}
        ordered.update({k: v for k, v in figures.items() if k not in ordered})
        return Results(figures=ordered)


# -- facts about the run -----------------------------------------------------------------------------


def machine() -> Machine:
    import numpy
    import onnxruntime
    import psutil

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return Machine(
        cpu=cpu or platform.processor() or "unknown",
        cores=os.cpu_count() or 0,
        memory_gb=round(psutil.virtual_memory().total / (1 << 30), 1),
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        onnxruntime=onnxruntime.__version__,
        numpy=numpy.__version__,
    )


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def commit() -> tuple[str | None, bool | None]:
    """HEAD, and whether the code differs from it (results files and Markdown do not count)."""
    head = _git("rev-parse", "--short=12", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results", ":!*.md")
    return head, None if status is None else bool(status)


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# -- the table -----------------------------------------------------------------------------------------


def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) < 10:
        return f"{value:.2f}"
    if abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def fmt(value: Value, unit: str) -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, dict):
        return f"{_number(value)} {unit}".strip()
    # Named entries (models) carry their names; counts (32 / 128 / 512) are named by the figure's text.
    named = not all(key.isdigit() for key in value)
    text = " / ".join(f"{key} {_number(v)}" if named else _number(v) for key, v in value.items())
    return f"{text} {unit}".strip()


def _baseline_cell(f: Measurement) -> str:
    if f.baseline is None:
        return ""
    cell = f"{f.baseline.what}: {fmt(f.baseline.value, f.unit)}"
    if f.ratio is not None:
        cell += f" (ratio **{f.ratio:.2f}**)"
    if f.baseline.note:
        cell += f"; {f.baseline.note}"
    return cell


def _target_cell(f: Measurement) -> str:
    if not f.target:
        return ""
    verdict = {True: "met", False: "**missed**", None: "not measured"}[f.met]
    return f"{f.target}: {verdict}"


def _ours_cell(f: Measurement) -> str:
    cell = fmt(f.value, f.unit)
    if f.errors:
        cell += " (errors: " + "; ".join(e.replace("|", "/").replace("\n", " ")[:200] for e in f.errors) + ")"
    return cell


def table(figures: dict[str, Figure]) -> str:
    """The figures as a Markdown table (README and console alike)."""
    lines = ["| Figure | QaaS | Baseline (same run) | Target |", "|---|---|---|---|"]
    for f in figures.values():
        lines.append(f"| {f.what} | {_ours_cell(f)} | {_baseline_cell(f)} | {_target_cell(f)} |")
    return "\n".join(lines)


def provenance(figures: dict[str, Figure]) -> str:
    """Which run measured which figures: one row per run, the machine(s) below."""
    runs: dict[str, tuple[Run, list[str]]] = {}
    for name, f in figures.items():
        key = f.run.model_dump_json()
        runs.setdefault(key, (f.run, []))[1].append(f"`{name}`")
    lines = [
        "| Figures | Commit | ONNX Runtime | Finished (UTC) | Load average before → after (1 min) | Took | Command |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, names in runs.values():
        commit = f"`{run.commit}`{' + uncommitted changes' if run.dirty else ''}" if run.commit else "unknown"
        when = run.finished_at.replace("T", " ").replace("+00:00", "")
        load = f"{run.load_before[0]:.2f} → {run.load_after[0]:.2f}"
        lines.append(
            f"| {', '.join(names)} | {commit} | {run.machine.onnxruntime} | {when} | {load} | "
            f"{run.duration_s:.0f} s | `{run.command}`{' (quick sizes)' if run.quick else ''} |"
        )
    machines: dict[str, list[str]] = {}
    for run, names in runs.values():
        machines.setdefault(run.machine.describe(), []).extend(names)
    if len(machines) == 1:
        lines.append(f"\nMachine: {next(iter(machines))}.")
    else:
        lines.append("\nMachines: " + "; ".join(f"{m} ({', '.join(n)})" for m, n in machines.items()) + ".")
    return "\n".join(lines)


def readme_block(results: Results) -> str:
    if not results.figures:
        return f"{BEGIN}\nNo figures recorded yet: run `make bench`.\n{END}"
    return f"{BEGIN}\n{table(results.figures)}\n\n{provenance(results.figures)}\n{END}"


_BLOCK = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)


def readme_with(text: str, results: Results) -> str:
    """`text` (the README) with its generated block replaced by one made from `results`."""
    if len(_BLOCK.findall(text)) != 1:
        raise ValueError(f"the README must hold exactly one block from {BEGIN!r} to {END!r}")
    block = readme_block(results)
    return _BLOCK.sub(lambda _: block, text)


def readme_figures(text: str) -> str:
    """The generated block as it stands in `text`."""
    found = _BLOCK.search(text)
    if found is None:
        raise ValueError(f"the README holds no block from {BEGIN!r} to {END!r}")
    return found.group(0)
