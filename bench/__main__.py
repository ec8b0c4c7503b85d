"""`make bench` (`python -m bench`): runs the benchmarks under bench/, prints each figure beside its
baseline measured in the same run, and records them in bench/results/figures.json, each figure
with the run that measured it.

    python -m bench                       # everything
    python -m bench --only overhead,upload   # replaces those figures only; the others keep their runs
    python -m bench --quick               # small sizes, for development (writes bench/results/quick.json)
    python -m bench --readme              # writes the README's Performance table from figures.json

Targets are reported as met or missed; the exit status is 1 only when a benchmark crashed (its
figures are then recorded without a value, with the reason in "errors")."""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import ROOT, Context
from bench.results import (
    README,
    RESULTS_DIR,
    RESULTS_FILE,
    Figure,
    Measurement,
    Results,
    Run,
    commit,
    load_average,
    machine,
    now,
    readme_with,
    table,
)

# benchmark -> the figures it records, in the order the table shows them
BENCHMARKS: dict[str, tuple[str, ...]] = {
    "overhead": ("job_end_to_end_s",),
    "calibration_memory": ("calibration_peak_mb",),
    "api_load": ("api_job_poll_rps", "api_job_poll_p99_ms"),
    "upload": ("upload_mb_s", "upload_api_rss_growth_mb", "upload_direct_s3_mb_s"),
    "auto": ("auto_speedup", "auto_fidelity", "nncf_speedup"),
    "auto_fixtures": ("auto_fixture_speedup", "auto_fixture_search_s", "auto_fixture_nncf_speedup"),
    "sse": ("sse_job_poll_rps", "sse_job_poll_p50_ms"),
    "scale_out": ("upload_s3_mb_s", "jobs_per_minute_1", "jobs_per_minute_2"),
    "resend": ("resend_backlog_messages", "resend_duplicates", "resend_drain_s"),
    "big_models": ("big_model_peak_ratio",),
}
ALIASES = {
    "calibration": "calibration_memory",
    "memory": "calibration_memory",
    "api": "api_load",
    "load": "api_load",
    "events": "sse",
    "s3": "scale_out",
    "queue": "resend",
    "big": "big_models",
    "fixtures": "auto_fixtures",
}
ORDER = [figure for names in BENCHMARKS.values() for figure in names]


def _measure(name: str, ctx: Context, old: Results) -> tuple[dict[str, Measurement], bool]:
    """Run one benchmark; a crash records its figures without a value, with the reason."""
    try:
        module = importlib.import_module(f"bench.{name}")
        measured: dict[str, Measurement] = module.run(ctx)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        traceback.print_exc()
        error = f"{name} crashed: {type(exc).__name__}: {exc}"[:3000]
        measured = {}
        for key in BENCHMARKS[name]:
            before = old.figures.get(key)
            measured[key] = Measurement(
                what=before.what if before else key, unit=before.unit if before else "", value=None, errors=[error]
            )
        return measured, True
    differs = set(BENCHMARKS[name]) ^ set(measured)
    if differs:
        raise RuntimeError(f"bench.{name} must measure exactly {BENCHMARKS[name]}; differs in {sorted(differs)}")
    return measured, False


def write_readme(results: Results) -> bool:
    """Rewrite the README's generated block; True when it changed."""
    text = README.read_text(encoding="utf-8")
    updated = readme_with(text, results)
    if updated != text:
        README.write_text(updated, encoding="utf-8")
    return updated != text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true", help="small sizes, for development")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (models, logs)")
    ap.add_argument("--output", type=Path, help=f"default: {RESULTS_FILE.relative_to(ROOT)} (quick.json with --quick)")
    ap.add_argument("--readme", action="store_true", help="only write the README's table from the results file")
    args = ap.parse_args(argv)
    output = args.output or (RESULTS_DIR / "quick.json" if args.quick else RESULTS_FILE)
    if args.readme:
        changed = write_readme(Results.load(output))
        print(f"README.md {'updated' if changed else 'already matches'} {output.relative_to(ROOT)}")
        return 0
    names = list(BENCHMARKS)
    if args.only:
        names = [ALIASES.get(n.strip(), n.strip()) for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")

    given = argv if argv is not None else sys.argv[1:]
    command = "make bench" if not given else "python -m bench " + " ".join(given)
    old = Results.load(output)
    tmp = Path(tempfile.mkdtemp(prefix="qaas-bench-"))
    ctx = Context(quick=args.quick, tmp=tmp, log=lambda msg: print(msg, flush=True))
    facts = machine()
    head, dirty = commit()
    if dirty:
        print("note: the code has uncommitted changes; the figures will say so", flush=True)
    new: dict[str, Figure] = {}
    crashed = False
    print(f"QaaS benchmarks{' (quick)' if args.quick else ''}: {', '.join(names)}; scratch in {tmp}", flush=True)
    try:
        for name in names:
            print(f"\n== {name}", flush=True)
            load_before, started = load_average(), time.perf_counter()
            measured, broke = _measure(name, ctx, old)
            crashed |= broke
            run = Run(
                benchmark=name,
                command=command,
                commit=head,
                dirty=dirty,
                finished_at=now(),
                duration_s=round(time.perf_counter() - started, 1),
                quick=args.quick,
                load_before=load_before,
                load_after=load_average(),
                machine=facts,
            )
            new.update({key: Figure(**m.model_dump(), run=run) for key, m in measured.items()})
            print(f"   ({run.duration_s:.0f} s, load average {run.load_before[0]} -> {run.load_after[0]})", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results = old.merged(new, ORDER)
    results.save(output)
    print("\n" + table(new))
    shown = output.relative_to(ROOT) if output.is_relative_to(ROOT) else output
    print(f"\n{facts.describe()}. Written to {shown}.")
    if output == RESULTS_FILE:
        print("Run `make bench-readme` to write these figures into the README.")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
