"""`make bench` (`python -m bench`): runs the benchmarks under bench/, prints a table of each figure
beside its baseline measured in the same run, and writes bench/results/latest.json.

    python -m bench                       # everything (about 6 minutes on 2 cores)
    python -m bench --only overhead,upload
    python -m bench --quick               # small sizes, for development (writes bench/results/quick.json)

Targets are reported as met or missed; the exit status is 1 only when a benchmark crashed (its
figures are then null and the reason is in "errors")."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from bench.common import ROOT, Context, Outcome, Row

RESULTS = Path(__file__).resolve().parent / "results"
# name -> the keys of latest.json it fills (null when it crashes)
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "overhead": ("overhead_ratio",),
    "calibration_memory": ("calibration_peak_mb", "ort_calibration_peak_mb", "calibration_flatness"),
    "api_load": ("api_rps", "api_p99_ms", "api_hello_rps"),
    "upload": ("upload_mb_s", "upload_rss_growth_mb"),
    "scale_out": ("upload_s3_mb_s", "jobs_per_minute_1", "jobs_per_minute_2"),
}
ALIASES = {
    "calibration": "calibration_memory",
    "memory": "calibration_memory",
    "api": "api_load",
    "load": "api_load",
    "s3": "scale_out",
}


def machine() -> dict[str, Any]:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    import numpy
    import onnxruntime

    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / (1 << 30), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "commit": commit,
    }


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{text} {unit}".strip()


def table(rows: list[Row]) -> str:
    head = ("Figure", "Ours", "Baseline", "Ratio", "Target", "Result")
    body = []
    for r in rows:
        base = f"{_fmt(r.baseline, r.unit)} ({r.baseline_name})" if r.baseline_name else ""
        if r.baseline is None and r.baseline_name:
            base = f"n/a ({r.baseline_name})"
        ratio = f"{r.ratio:.2f}" if r.ratio is not None and r.unit != "x" else ""
        result = {True: "met", False: "MISSED", None: "" if not r.target else "n/a"}[r.met]
        body.append((r.figure, _fmt(r.ours, r.unit), base, ratio, r.target, result))
    widths = [max(len(str(x[i])) for x in (head, *body)) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(head), line, *(fmt(b) for b in body)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="small sizes, for development")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (models, logs)")
    ap.add_argument("--output", type=Path, help="default: bench/results/latest.json (quick.json with --quick)")
    args = ap.parse_args(argv)
    names = list(BENCHMARKS)
    if args.only:
        names = [ALIASES.get(n.strip(), n.strip()) for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    output = args.output or RESULTS / ("quick.json" if args.quick else "latest.json")

    started = time.perf_counter()
    given = argv if argv is not None else sys.argv[1:]
    command = "make bench" if not given else "python -m bench " + " ".join(given)
    tmp = Path(tempfile.mkdtemp(prefix="qaas-bench-"))
    ctx = Context(quick=args.quick, tmp=tmp, log=lambda msg: print(msg, flush=True))
    report: dict[str, Any] = {}
    if args.only and output.exists():  # a partial run updates the figures it measured, keeps the others
        try:
            report = json.loads(output.read_text())
        except ValueError:
            report = {}
    report.setdefault("benchmarks", {})
    # Errors are kept as "<benchmark>: ...": a re-run benchmark's old errors are dropped.
    errors = [e for e in report.get("errors", []) if e.split(":", 1)[0] not in names]
    rows: list[Row] = []
    crashed = False
    load_start = os.getloadavg()
    print(f"QaaS benchmarks{' (quick)' if args.quick else ''}: {', '.join(names)}; scratch in {tmp}", flush=True)
    try:
        for name in names:
            print(f"\n== {name}", flush=True)
            t = time.perf_counter()
            load_before = os.getloadavg()[0]
            module = importlib.import_module(f"bench.{name}")
            try:
                outcome: Outcome = module.run(ctx)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                crashed = True
                traceback.print_exc()
                outcome = Outcome(figures={k: None for k in BENCHMARKS[name]}, errors=[f"{name}: {exc}"[:3000]])
            for key in BENCHMARKS[name]:
                outcome.figures.setdefault(key, None)
            report.update(outcome.figures)
            errors += [e if e.startswith(f"{name}:") else f"{name}: {e}" for e in outcome.errors]
            rows += outcome.rows
            duration = time.perf_counter() - t
            report["benchmarks"][name] = {
                "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "duration_s": round(duration, 1),
                "quick": args.quick,
                "command": command,
                # 1-minute load average before and after: the machine may be shared with other work.
                "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            }
            print(f"   ({duration:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report["errors"] = errors
    report["quick"] = args.quick
    report["machine"] = machine()
    report["load_average"] = {
        "start": [round(x, 2) for x in load_start],
        "end": [round(x, 2) for x in os.getloadavg()],
    }
    report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report["duration_s"] = round(time.perf_counter() - started, 1)
    report["command"] = command
    # Top-level fields describe the last run; a partial run (--only) keeps the other figures, and
    # each benchmark's own entry under "benchmarks" says when and by which command it was measured.
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + table(rows))
    if errors:
        print("\nErrors:\n" + "\n".join(f"  - {e}" for e in errors))
    m = report["machine"]
    shown = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output
    load = report["load_average"]["start"][0]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; load average {load} at start; "
        f"{report['duration_s']:.0f} s in all. Written to {shown}"
    )
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
