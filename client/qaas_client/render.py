"""What the CLI prints: the summary of a quantized model and the tables of models, datasets and jobs.

Cells are `Text`, never markup: they hold the service's strings (names, warnings), which must show as
they are whatever console prints them; `[bold]x[/]` in a warning is text, not a style."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

from qaas_client.client import Job
from qaas_client.types import Dataset, Model, Report


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _when(stamp: str) -> str:
    """`2026-11-30T03:04:05.123Z` as `2026-11-30 03:04` (UTC, as the service gives it)."""
    return stamp[:16].replace("T", " ")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def fidelity_line(report: Report) -> list[str]:
    lines = []
    for out in report.outputs:
        parts = [f"cosine {_num(out.cosine, '.5f')}", f"SQNR {_num(out.sqnr_db, '.1f')} dB"]
        if out.top1_agreement is not None:
            parts.append(f"top-1 agreement {out.top1_agreement:.1%}")
        if out.faithful is False:
            parts.append("outside the fidelity budget")
        lines.append(f"{out.name}: " + ", ".join(parts))
    return lines or ["-"]


class _Grid:
    """Two columns, a bold label and its value, both shown as plain text."""

    def __init__(self) -> None:
        self.table = Table.grid(padding=(0, 2))
        self.table.add_column(style="bold")
        self.table.add_column()

    def add_row(self, label: str, value: str) -> None:
        self.table.add_row(Text(label), Text(value))


def summary(report: Report) -> Table:
    """The figures a user checks first: size, speed, fidelity, accuracy and what went wrong."""
    grid = _Grid()
    ratio = f" ({report.size_ratio:.2f}x)" if report.size_ratio is not None else ""
    grid.add_row("size", f"{size(report.original_size_bytes)} -> {size(report.quantized_size_bytes)}{ratio}")
    if report.original_p50_ms is not None and report.quantized_p50_ms is not None:
        speed = f", speedup {report.speedup_p50:.2f}x" if report.speedup_p50 is not None else ""
        grid.add_row("latency", f"p50 {report.original_p50_ms:.3f} ms -> {report.quantized_p50_ms:.3f} ms{speed}")
    grid.add_row("fidelity", "\n".join(fidelity_line(report)))
    if report.accuracy is not None:
        acc = report.accuracy
        grid.add_row("accuracy", f"{acc.metric}: {acc.original:.4f} -> {acc.quantized:.4f} (delta {acc.delta:+.4f})")
    else:
        grid.add_row("accuracy", "- (no labels in the evaluation data)")
    if report.auto_verdict or report.auto_chosen:
        verdict = f"{report.auto_verdict}; " if report.auto_verdict else ""
        grid.add_row("auto", f"{verdict}chose {report.auto_chosen or '-'}")
    grid.add_row("warnings", "\n".join(f"- {w}" for w in report.warnings) if report.warnings else "none")
    return grid.table


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """Ids are never cut or wrapped, however narrow the terminal: they are what users copy."""
    out = Table(box=None, header_style="bold", pad_edge=False)
    for name in columns:
        if name == "ID":
            out.add_column(name, no_wrap=True, min_width=36)
        else:  # a narrow terminal folds cells rather than hide their ends
            out.add_column(name, min_width=min(len(name), 8), overflow="fold")
    for row in rows:
        out.add_row(*(Text("-" if v is None else str(v)) for v in row))
    return out


def models_table(models: Iterable[Model]) -> Table:
    return table(
        ("ID", "NAME", "SIZE", "OPSET", "INPUTS", "CREATED"),
        (
            (m.id, m.name, size(m.size_bytes), m.opset, ", ".join(i.name for i in m.inputs), _when(m.created_at))
            for m in models
        ),
    )


def datasets_table(datasets: Iterable[Dataset]) -> Table:
    return table(
        ("ID", "NAME", "FORMAT", "SAMPLES", "SIZE", "LABELS", "CREATED"),
        (
            (
                d.id,
                d.name,
                d.format,
                d.num_samples,
                size(d.size_bytes),
                "yes" if d.has_labels else "no",
                _when(d.created_at),
            )
            for d in datasets
        ),
    )


def jobs_table(jobs: Iterable[Job]) -> Table:
    def status(job: Job) -> str:
        return job.status if job.done else f"{job.status} {job.stage} {job.progress:.0%}"

    def speedup(job: Job) -> str | None:
        value = ((job.raw.get("result") or {}).get("comparison") or {}).get("speedup_p50")
        return f"{value:.2f}x" if value else None

    return table(
        ("ID", "STATUS", "MODE", "SPEEDUP", "CREATED"),
        ((j.id, status(j), j.recipe.get("mode"), speedup(j), _when(str(j.raw["created_at"]))) for j in jobs),
    )


def usage_grid(tenant: str, storage: dict[str, int], jobs: dict[str, int], models: int, datasets: int) -> Table:
    grid = _Grid()
    grid.add_row("tenant", tenant)
    grid.add_row("storage", f"{size(storage['total_bytes'])} of {size(storage['quota_bytes'])}")
    grid.add_row("stored", f"{models} models, {datasets} datasets")
    active = jobs.get("queued", 0) + jobs.get("running", 0)
    counts = ", ".join(f"{jobs.get(s, 0)} {s}" for s in ("queued", "running", "succeeded", "failed", "cancelled"))
    grid.add_row("jobs", f"{counts} ({active} of {jobs.get('active_quota', '-')} active allowed)")
    return grid.table
