"""The job report as one self-contained HTML page: inline CSS and SVG plots, nothing fetched.

It lays out the result and never judges it: every verdict shown (an output outside the fidelity budget, a
drop beyond tolerance, the model within budget) is one the engine recorded in the result (`core.judge`).
Every string that came from a user or a model (names, recipe values, messages) goes through
`_e` (HTML escaping, quotes included) before it reaches the page.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from core.result import (
    AccuracyComparison,
    AutoSearch,
    AutoTrial,
    JobResult,
    LatencyStats,
    Machine,
    ModelMetrics,
    OutputFidelity,
)

ORIGINAL_COLOR = "#3b6fb6"
QUANTIZED_COLOR = "#e07b00"
POOR_COLOR = "#c0392b"
SQNR_PLOT_MAX_DB = 80.0  # SQNR bars are clipped here (identical outputs are reported at the result's cap)

_CSS = (
    """
:root { --fg:#1d2330; --muted:#5b6475; --line:#dde2ea; --bg:#f6f8fb; --card:#fff;
        --orig:$ORIG; --quant:$QUANT; --bad:$BAD; --warn-bg:#fff6e0; --warn-line:#f0b429; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color:var(--fg); background:var(--bg); }
main { max-width: 1040px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.sub { color: var(--muted); font-size: 13px; margin: 0; }
.sub code { font-size: 12px; }
.status { display:inline-block; padding: 2px 10px; border-radius: 999px; font-size: 13px; font-weight: 600;
          vertical-align: middle; margin-left: 8px; color: #fff; background: #6b7280; }
.status.succeeded { background: #2f855a; } .status.failed { background: var(--bad); }
.status.running { background: #2b6cb0; } .status.cancelled { background: #6b7280; }
.box { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 14px 18px;
       margin: 14px 0; }
.warnings { background: var(--warn-bg); border-color: var(--warn-line); }
.warnings h2 { border: 0; margin: 0 0 6px; font-size: 16px; }
.warnings ul { margin: 0; padding-left: 20px; } .warnings li { margin: 4px 0; }
.error { border-color: var(--bad); background: #fdeeee; }
.error h2 { border: 0; margin: 0 0 6px; font-size: 16px; color: var(--bad); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); gap: 12px;
         margin-top: 16px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .big { font-size: 26px; font-weight: 650; margin: 2px 0; }
.card .detail { font-size: 13px; color: var(--muted); }
.good { color: #2f855a; } .bad { color: var(--bad); }
table { border-collapse: collapse; width: 100%; background: var(--card); font-size: 14px; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase;
     letter-spacing: .03em; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { width: 34%; text-transform: none; font-size: 14px; letter-spacing: 0; }
table.stats tbody th { text-transform: none; font-size: 14px; letter-spacing: 0; }
h3.sub { font-size: 13px; margin: 0 0 6px; }
.two { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 16px; }
.legend { font-size: 13px; color: var(--muted); margin: 4px 0 8px; }
.swatch { display:inline-block; width: 11px; height: 11px; border-radius: 2px; vertical-align: -1px;
          margin: 0 4px 0 10px; }
.chips span { display: inline-block; padding: 1px 8px; margin: 2px 4px 2px 0; border-radius: 999px;
              font-size: 12px; border: 1px solid var(--line); }
.chips .on { background: #e6f4ea; border-color: #9ad0a9; }
.chips .off { color: #8a93a3; text-decoration: line-through; }
svg { display: block; max-width: 100%; height: auto; }
svg text { font: 12px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: #1d2330; }
svg .muted { fill: #5b6475; }
pre { white-space: pre-wrap; word-break: break-word; font-size: 12px; background: #f0f2f6; padding: 8px;
      border-radius: 6px; margin: 6px 0 0; }
ol.steps { margin: 0; padding-left: 22px; } ol.steps li { margin: 3px 0; }
.progress { height: 10px; background: #e5e9f0; border-radius: 5px; overflow: hidden; max-width: 420px; }
.progress div { height: 100%; background: #2b6cb0; }
.verdict { font-size: 16px; } .verdict p { margin: 0; }
.verdict.good { border-color: #9ad0a9; background: #eef8f1; }
.verdict.keep { border-color: var(--warn-line); background: var(--warn-bg); }
footer { color: var(--muted); font-size: 12px; margin-top: 36px; }
""".replace("$ORIG", ORIGINAL_COLOR)
    .replace("$QUANT", QUANTIZED_COLOR)
    .replace("$BAD", POOR_COLOR)
)


# ----------------------------------------------------------------------------- formatting


def _e(value: Any) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, Mapping):
            return None
        data = data.get(key)
    return data


NA = "n/a"


def fmt_bytes(value: Any) -> str:
    n = _num(value)
    if n is None:
        return NA
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_ms(value: Any) -> str:
    n = _num(value)
    if n is None:
        return NA
    if n >= 100:
        return f"{n:.1f} ms"
    if n >= 1:
        return f"{n:.2f} ms"
    return f"{n:.3f} ms"


def fmt_pct(value: Any, digits: int = 1) -> str:
    n = _num(value)
    return NA if n is None else f"{n * 100:.{digits}f}%"


def fmt_points(delta: Any) -> str:
    """An accuracy difference in percentage points, signed."""
    n = _num(delta)
    return NA if n is None else f"{n * 100:+.2f} pts"


def fmt_x(value: Any) -> str:
    n = _num(value)
    return NA if n is None else f"{n:.2f}x"


def fmt_float(value: Any, digits: int = 4) -> str:
    n = _num(value)
    if n is None:
        return NA
    if n != 0 and (abs(n) < 1e-3 or abs(n) >= 1e6):
        return f"{n:.3e}"
    return f"{n:.{digits}f}"


def fmt_db(value: Any) -> str:
    n = _num(value)
    return NA if n is None else f"{n:.1f} dB"


def fmt_seconds(value: Any) -> str:
    n = _num(value)
    if n is None:
        return NA
    return f"{n * 1000:.0f} ms" if n < 1 else f"{n:.2f} s"


def fmt_value(value: Any) -> str:
    """A recipe/fact value in plain words (already escaped)."""
    if value is None:
        return '<span class="sub">default</span>'
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _e(f"{value:g}")
    if isinstance(value, list | tuple):
        return _e(", ".join(str(v) for v in value)) if value else '<span class="sub">none</span>'
    if isinstance(value, Mapping):
        if all(not isinstance(v, Mapping | list | tuple) for v in value.values()):
            return "<br>".join(
                f'<span class="sub">{_e(str(k).replace("_", " "))}:</span> {fmt_value(v)}' for k, v in value.items()
            )
        return "<pre>" + _e(json.dumps(value, indent=2, sort_keys=True, default=str)) + "</pre>"
    return _e(value)


# ----------------------------------------------------------------------------- SVG plots


def _svg(width: int, height: int, body: Iterable[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="{_e(label)}">' + "".join(body) + "</svg>"
    )


def _line(x1: float, y1: float, x2: float, y2: float, color: str, width: float = 1, dash: str | None = None) -> str:
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
        f'stroke-width="{width}"{dashed}/>'
    )


def _text(x: float, y: float, content: str, *, anchor: str = "start", cls: str = "", weight: str = "") -> str:
    attrs = f' class="{cls}"' if cls else ""
    attrs += f' font-weight="{weight}"' if weight else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{attrs}>{_e(content)}</text>'


# A group of horizontal bars: (title, [(series name, value, value label, color)]).
Bars = tuple[str, Sequence[tuple[str, float | None, str, str]]]


def hbar_chart(
    groups: Sequence[Bars],
    *,
    label: str,
    scale_max: float | None = None,
    width: int = 640,
    label_w: int = 150,
    threshold: tuple[float, str] | None = None,
) -> str:
    """Horizontal bars in groups. Each group: (title, [(series name, value, value label, color)]).
    Bars share one linear scale from 0 to `scale_max` (default: the largest value)."""
    right_pad, bar_h, gap, group_gap, top = 90, 16, 4, 14, 8
    max_chars = max(4, (label_w - 12) // 7)  # about 7 px per character at 12 px
    values = [v for _, bars in groups for _, v, _, _ in bars if v is not None]
    vmax = scale_max if scale_max is not None else max(values, default=1.0)
    vmax = vmax if vmax and vmax > 0 else 1.0
    plot_w = width - label_w - right_pad
    parts: list[str] = []
    y = top
    for title, bars in groups:
        group_h = len(bars) * (bar_h + gap) - gap
        short = title if len(title) <= max_chars else title[: max_chars - 1] + "…"
        parts.append(
            f"<g><title>{_e(title)}</title>"
            + _text(label_w - 10, y + group_h / 2 + 4, short, anchor="end", weight="600")
            + "</g>"
        )
        for _series, value, value_label, color in bars:
            if value is None:
                parts.append(_text(label_w + 4, y + bar_h - 4, value_label, cls="muted"))
            else:
                w = max(1.0, min(value, vmax) / vmax * plot_w)
                parts.append(
                    f'<rect x="{label_w}" y="{y:.1f}" width="{w:.1f}" height="{bar_h}" rx="2" fill="{color}"/>'
                )
                parts.append(_text(label_w + w + 6, y + bar_h - 4, value_label))
            y += bar_h + gap
        y += group_gap - gap
    height = int(y + 4)
    parts.insert(
        0,
        _line(label_w, top - 4, label_w, height - 6, "#9aa3b2"),
    )
    if threshold is not None and 0 < threshold[0] <= vmax:
        tx = label_w + threshold[0] / vmax * plot_w
        parts.append(
            f'<line x1="{tx:.1f}" y1="{top - 4}" x2="{tx:.1f}" y2="{height - 6}" stroke="{POOR_COLOR}" '
            'stroke-dasharray="4 3" stroke-width="1"/>'
        )
        parts.append(_text(tx + 3, height - 1, threshold[1], cls="muted"))
        height += 8
    return _svg(width, height, parts, label)


def latency_range_plot(models: Sequence[tuple[str, LatencyStats | None, str]], *, width: int = 900) -> str:
    """One row per model on a shared ms axis: a min-max whisker, a box from p50 to p90, a tick at
    p99 and a diamond at the mean."""
    label_w, right_pad, row_h, top, axis_h = 110, 30, 44, 10, 30
    stats = [(name, lat, color) for name, lat, color in models if lat is not None and _num(lat.p50) is not None]
    if not stats:
        return '<p class="sub">No latency was measured.</p>'
    vmax = max(_num(lat.max) or _num(lat.p99) or _num(lat.p50) or 0.0 for _, lat, _ in stats)
    vmax = _nice_ceiling(vmax if vmax > 0 else 1.0)
    plot_w = width - label_w - right_pad

    def x(v: float | None) -> float:
        return label_w + (0.0 if v is None else max(0.0, min(v, vmax)) / vmax * plot_w)

    parts: list[str] = []
    height = top + len(stats) * row_h + axis_h
    # Axis with five ticks.
    axis_y = top + len(stats) * row_h
    parts.append(f'<line x1="{label_w}" y1="{axis_y}" x2="{label_w + plot_w}" y2="{axis_y}" stroke="#9aa3b2"/>')
    for i in range(6):
        v = vmax * i / 5
        tx = x(v)
        parts.append(f'<line x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{axis_y + 4}" stroke="#eef1f5"/>')
        parts.append(_text(tx, axis_y + 17, fmt_ms(v), anchor="middle", cls="muted"))
    for i, (name, lat, color) in enumerate(stats):
        cy = top + i * row_h + row_h / 2
        lo, hi = _num(lat.min), _num(lat.max)
        p50, p90, p99, mean = _num(lat.p50), _num(lat.p90), _num(lat.p99), _num(lat.mean)
        parts.append(_text(label_w - 10, cy + 4, name, anchor="end", weight="600"))
        if lo is not None and hi is not None:
            parts.append(_line(x(lo), cy, x(hi), cy, color, 2))
            for v in (lo, hi):
                parts.append(_line(x(v), cy - 6, x(v), cy + 6, color, 2))
        box_hi = p90 if p90 is not None else p50
        bx, bw = x(p50), max(2.0, x(box_hi) - x(p50))
        parts.append(
            f'<rect x="{bx:.1f}" y="{cy - 10}" width="{bw:.1f}" height="20" fill="{color}" '
            f'fill-opacity="0.35" stroke="{color}" stroke-width="1.5"/>'
        )
        parts.append(_line(bx, cy - 12, bx, cy + 12, color, 3))
        if p99 is not None:
            parts.append(_line(x(p99), cy - 9, x(p99), cy + 9, color, 1.5, dash="2 2"))
        if mean is not None:
            mx = x(mean)
            parts.append(
                f'<path d="M{mx:.1f} {cy - 5} L{mx + 5:.1f} {cy} L{mx:.1f} {cy + 5} L{mx - 5:.1f} {cy} Z" '
                'fill="#1d2330"/>'
            )
    return _svg(width, height, parts, "Latency distribution of both models")


def _nice_ceiling(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= v (a round axis end)."""
    exp = math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if m * 10**exp >= v * 0.999999:
            return float(m * 10**exp)
    return float(10 ** (exp + 1))


# ----------------------------------------------------------------------------- sections

_LEGEND = (
    f'<p class="legend"><span class="swatch" style="background:{ORIGINAL_COLOR}"></span>original'
    f'<span class="swatch" style="background:{QUANTIZED_COLOR}"></span>quantized</p>'
)


def _header(job: Mapping[str, Any]) -> str:
    status = str(job.get("status") or "unknown")
    cls = status if status in ("succeeded", "failed", "running", "cancelled") else ""
    facts = [f"Job <code>{_e(job.get('id'))}</code>", f"model <code>{_e(job.get('model_id'))}</code>"]
    for key, name in (
        ("calibration_dataset_id", "calibration data"),
        ("evaluation_dataset_id", "evaluation data"),
    ):
        if job.get(key):
            facts.append(f"{name} <code>{_e(job.get(key))}</code>")
    target = job.get("target")
    if target and target != "any":
        names = ", ".join(map(str, target)) if isinstance(target, list) else str(target)
        facts.append(f"target <code>{_e(names)}</code>")
    times = []
    for key, name in (("created_at", "created"), ("started_at", "started"), ("finished_at", "finished")):
        if job.get(key):
            times.append(f"{name} {_e(job.get(key))}")
    mode = _get(job, "recipe", "mode")
    title = f"Quantization report{' — ' + str(mode) if mode else ''}"
    return (
        f'<header><h1>{_e(title)}<span class="status {cls}">{_e(status)}</span></h1>'
        f'<p class="sub">{" · ".join(facts)}</p>'
        + (f'<p class="sub">{" · ".join(times)}</p>' if times else "")
        + "</header>"
    )


def _warnings(warnings: Sequence[Any]) -> str:
    if not warnings:
        return (
            '<div class="box"><strong class="good">No warnings.</strong> '
            "Nothing in the measurements needs your attention.</div>"
        )
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    n = len(warnings)
    return f'<section class="box warnings"><h2>{n} warning{"s" if n != 1 else ""}</h2><ul>{items}</ul></section>'


def _card(label: str, big: str, detail: str, big_cls: str = "") -> str:
    cls = f' class="big {big_cls}"' if big_cls else ' class="big"'
    return (
        f'<div class="card"><div class="label">{_e(label)}</div><div{cls}>{big}</div>'
        f'<div class="detail">{detail}</div></div>'
    )


def _headline(result: JobResult) -> str:
    orig, quant, cmp_ = result.original, result.quantized, result.comparison
    cards = []
    ratio = _num(cmp_.size_ratio)
    smaller = ""
    if ratio is not None and ratio > 0:
        if ratio < 0.995:
            smaller = f"{1 / ratio:.2f}x smaller"
        elif ratio > 1.005:
            smaller = f"{ratio:.2f}x larger"
        else:
            smaller = "about the same size"
    cards.append(
        _card(
            "Size on disk",
            _e(fmt_bytes(quant.size_bytes)),
            f"from {_e(fmt_bytes(orig.size_bytes))} · ratio {_e(fmt_float(ratio, 3))}"
            + (f" · {_e(smaller)}" if smaller else ""),
            "good" if ratio is not None and ratio < 1 else "",
        )
    )
    speedup = _num(cmp_.speedup_p50)
    cards.append(
        _card(
            "Median latency (p50)",
            _e(fmt_ms(_p50(quant))),
            f"from {_e(fmt_ms(_p50(orig)))} · speedup {_e(fmt_x(speedup))}",
            "" if speedup is None else ("good" if speedup >= 1 else "bad"),
        )
    )
    acc = cmp_.accuracy
    if acc is not None:
        delta = _num(acc.delta)
        cards.append(
            _card(
                f"Accuracy ({acc.metric or 'top1'})",
                _e(fmt_pct(acc.quantized, 2)),
                f"from {_e(fmt_pct(acc.original, 2))} · delta {_e(fmt_points(delta))}",
                "bad" if acc.within_tolerance is False else "good" if delta is not None and delta >= 0 else "",
            )
        )
    else:
        cards.append(_card("Accuracy", NA, "no labelled evaluation data"))
    verdict = cmp_.fidelity
    if verdict is not None:
        value = "within budget" if verdict.within_budget else "outside budget"
        if verdict.metric == "top1_drop":  # labels and no fidelity floor: the drop is the budget
            detail = f"the top-1 drop decides (at most {verdict.accuracy_tolerance * 100:.2f} points)"
        else:
            detail = f"{_e(verdict.metric)} {_e(fmt_float(verdict.fidelity))} (worst budgeted output)"
        cards.append(
            _card(
                "Fidelity",
                _e(value),
                f"{detail} over {len(cmp_.outputs)} output(s)",
                "good" if verdict.within_budget else "bad",
            )
        )
    return f'<section class="cards">{"".join(cards)}</section>'


def _p50(metrics: ModelMetrics | None) -> float | None:
    return None if metrics is None or metrics.latency_ms is None else metrics.latency_ms.p50


_PERCENTILES: tuple[tuple[str, Callable[[LatencyStats], float]], ...] = (
    ("p50", lambda s: s.p50),
    ("p90", lambda s: s.p90),
    ("p99", lambda s: s.p99),
    ("mean", lambda s: s.mean),
)
_SPREAD: tuple[tuple[str, Callable[[LatencyStats], float]], ...] = (
    ("std", lambda s: s.std),
    ("min", lambda s: s.min),
    ("max", lambda s: s.max),
)
# Rows of the latency table beside the percentiles: shown when the engine recorded the fact for
# either model (field name, label, value, format).
_RUN_FACTS: tuple[tuple[str, str, Callable[[ModelMetrics], Any], Callable[[Any], str]], ...] = (
    (
        "throughput_per_s",
        "throughput",
        lambda m: m.throughput_per_s,
        lambda v: NA if _num(v) is None else f"{_num(v):,.1f} samples/s",
    ),
    ("batch_size", "batch size", lambda m: m.batch_size, lambda v: NA if v is None else str(v)),
    ("runs", "timed runs", lambda m: m.runs, lambda v: NA if v is None else str(v)),
    ("session_create_ms", "session creation", lambda m: m.session_create_ms, fmt_ms),
)


def _latency(result: JobResult) -> str:
    orig, quant = result.original, result.quantized
    lat_o, lat_q = orig.latency_ms, quant.latency_ms

    def stat(lat: LatencyStats | None, of: Callable[[LatencyStats], float]) -> float | None:
        return None if lat is None else of(lat)

    plot = latency_range_plot([("original", lat_o, ORIGINAL_COLOR), ("quantized", lat_q, QUANTIZED_COLOR)])
    bars = hbar_chart(
        [
            (
                key,
                [
                    ("original", _num(stat(lat_o, of)), fmt_ms(stat(lat_o, of)), ORIGINAL_COLOR),
                    ("quantized", _num(stat(lat_q, of)), fmt_ms(stat(lat_q, of)), QUANTIZED_COLOR),
                ],
            )
            for key, of in _PERCENTILES
        ],
        label="Latency percentiles of both models",
        width=480,
        label_w=60,
    )
    rows = []
    for key, of in (*_PERCENTILES, *_SPREAD):
        name = "p50 (median)" if key == "p50" else key
        rows.append(
            f'<tr><th>{name}</th><td class="num">{_e(fmt_ms(stat(lat_o, of)))}</td>'
            f'<td class="num">{_e(fmt_ms(stat(lat_q, of)))}</td></tr>'
        )
    for field, name, value, fmt in _RUN_FACTS:
        if field in orig.model_fields_set or field in quant.model_fields_set:
            rows.append(
                f'<tr><th>{name}</th><td class="num">{_e(fmt(value(orig)))}</td>'
                f'<td class="num">{_e(fmt(value(quant)))}</td></tr>'
            )
    legend = _LEGEND.replace("</p>", " · box: p50 to p90, whiskers: min to max, dashed tick: p99, diamond: mean</p>")
    return (
        "<section><h2>Latency</h2>"
        + legend
        + plot
        + '<div class="two" style="margin-top:14px"><div>'
        + bars
        + "</div><div>"
        '<table class="stats"><thead><tr><th></th><th class="num">original</th><th class="num">quantized</th>'
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div></div></section>"
    )


def _fidelity(result: JobResult) -> str:
    outputs = result.comparison.outputs
    if not outputs:
        return '<section><h2>Fidelity per output</h2><p class="sub">No output was compared.</p></section>'
    rows = []
    groups = []
    for o in outputs:
        sqnr = _num(o.sqnr_db)
        outside = o.budgeted and o.faithful is False
        verdict = (
            '<strong class="bad">outside budget</strong>'
            if outside
            else '<span class="good">within</span>'
            if o.budgeted and o.faithful
            else _e(o.problem or "not budgeted")
        )
        judged = f"{o.metric} ≥ {fmt_float(o.min)}" if o.metric and o.min is not None else NA
        rows.append(
            f"<tr><td>{_e(o.name)}</td><td>{_kind(o)}</td><td>{_e(judged)}</td>"
            f'<td class="num">{_e(fmt_float(o.value))}</td><td>{verdict}</td>'
            f'<td class="num">{_e(fmt_float(o.cosine, 6))}</td>'
            f'<td class="num">{_e(fmt_db(sqnr))}</td>'
            f'<td class="num">{_e(fmt_float(o.max_abs_error))}</td>'
            f'<td class="num">{_e(fmt_float(o.mean_abs_error))}</td>'
            f'<td class="num">{_e(fmt_pct(o.top1_agreement, 2))}</td></tr>'
        )
        shown = None if sqnr is None else max(0.0, sqnr)
        groups.append((o.name, [("sqnr", shown, fmt_db(sqnr), POOR_COLOR if outside else QUANTIZED_COLOR)]))
    chart = hbar_chart(groups, label="SQNR per output", scale_max=SQNR_PLOT_MAX_DB, threshold=None)
    return (
        "<section><h2>Fidelity per output</h2>"
        '<p class="sub">How closely the quantized model reproduces the original\'s outputs on the same '
        "inputs. Each output is judged by the metric its kind calls for (agreement of the argmax for "
        "classification and sequence outputs; for detections, the F1 of the rows above the score threshold "
        "matched between the models; mean cosine otherwise) against the budget's floor. The kind is given by the "
        "recipe or inferred from the operator that produces the output and the shape it has when run, and the "
        "page says which, and why. With labels and no fidelity floor in "
        "the recipe, the top-1 drop alone is the budget and no output counts. Cosine and SQNR are over all samples "
        "taken together (higher is better); top-1 agreement: how often both pick the same class.</p>"
        "<table><thead><tr><th>output</th><th>kind</th><th>judged by</th>"
        '<th class="num">value</th><th>verdict</th><th class="num">cosine</th><th class="num">SQNR</th>'
        '<th class="num">max abs error</th><th class="num">mean abs error</th>'
        f'<th class="num">top-1 agreement</th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
        f'<p class="legend">SQNR per output (bars clipped at {SQNR_PLOT_MAX_DB:.0f} dB; red: outside the '
        f"budget)</p>{chart}</section>"
    )


def _kind(o: OutputFidelity) -> str:
    """An output's kind, whether the recipe gave it or it was inferred and why, and its detections."""
    cell = _e(o.kind or NA)
    if o.kind_source:
        why = f"{o.kind_source}: {o.kind_reason}" if o.kind_reason else o.kind_source
        cell += f'<br><span class="sub">{_e(why)}</span>'
    d = o.detection
    if d is not None:
        found = (
            f"{d.reference_rows} detections above {d.score_threshold:g} in the original, {d.candidate_rows} in the "
            f"quantized model; {d.matched} matched (IoU ≥ {d.iou_threshold:g}, same class)"
        )
        if d.matched:
            found += f", mean IoU {fmt_float(d.mean_iou, 3)}, box error {fmt_pct(d.box_error)} of the box size"
        cell += f'<br><span class="sub">{_e(found)}</span>'
    return cell


def _pair(name: str, original: float | None, quantized: float | None, fmt: Callable[[Any], str]) -> Bars:
    """One group of an original/quantized bar chart."""
    return (
        name,
        [
            ("original", _num(original), fmt(original), ORIGINAL_COLOR),
            ("quantized", _num(quantized), fmt(quantized), QUANTIZED_COLOR),
        ],
    )


def _size_and_accuracy(result: JobResult) -> str:
    orig, quant = result.original, result.quantized
    size_chart = hbar_chart(
        [_pair("size", orig.size_bytes, quant.size_bytes, fmt_bytes)],
        label="Size on disk",
        width=480,
        label_w=80,
    )
    acc: AccuracyComparison | None = result.comparison.accuracy
    if acc is not None:
        groups = [_pair("top-1", acc.original, acc.quantized, _pct2)]
        if _num(acc.top5_original) is not None:
            groups.append(_pair("top-5", acc.top5_original, acc.top5_quantized, _pct2))
        samples = acc.samples
        acc_html = (
            hbar_chart(groups, label="Accuracy", scale_max=1.0, width=480, label_w=80)
            + f'<p class="sub">Delta {_e(fmt_points(acc.delta))}'
            + (f" on {_e(samples)} labelled samples" if samples is not None else "")
            + "</p>"
        )
    else:
        acc_html = '<p class="sub">Accuracy needs an evaluation dataset with labels.</p>'
    return (
        f'<section><h2>Size and accuracy</h2>{_LEGEND}<div class="two">'
        f'<div><h3 class="sub">Size on disk</h3>{size_chart}</div>'
        f'<div><h3 class="sub">Accuracy</h3>{acc_html}</div></div></section>'
    )


def _pct2(value: Any) -> str:
    return fmt_pct(value, 2)


def _kv_table(data: Mapping[str, Any], *, title: str, skip: Iterable[str] = ()) -> str:
    skipped = set(skip)
    rows = "".join(
        f"<tr><th>{_e(str(k).replace('_', ' '))}</th><td>{fmt_value(v)}</td></tr>"
        for k, v in data.items()
        if k not in skipped
    )
    if not rows:
        return ""
    return f'<section><h2>{_e(title)}</h2><table class="kv"><tbody>{rows}</tbody></table></section>'


def _steps(steps: Sequence[Any]) -> str:
    if not steps:
        return ""
    items = "".join(f"<li>{_e(s)}</li>" for s in steps)
    return f'<section><h2>Pre-processing steps</h2><div class="box"><ol class="steps">{items}</ol></div></section>'


def _machine(machine: Machine) -> str:
    facts = machine.model_dump(exclude_unset=True)
    if not facts:
        return ""
    chips = ""
    if machine.cpu_features:
        chips = (
            '<div class="chips">'
            + "".join(
                f'<span class="{"on" if on else "off"}">{_e(name)}</span>' for name, on in machine.cpu_features.items()
            )
            + "</div>"
        )
    rows = []
    for key, value in facts.items():
        if key == "cpu_features":
            rows.append(f"<tr><th>CPU features for int8</th><td>{chips}</td></tr>")
        elif key == "memory_bytes":
            rows.append(f"<tr><th>memory</th><td>{_e(fmt_bytes(value))}</td></tr>")
        else:
            rows.append(f"<tr><th>{_e(str(key).replace('_', ' '))}</th><td>{fmt_value(value)}</td></tr>")
    return f'<section><h2>Machine</h2><table class="kv"><tbody>{"".join(rows)}</tbody></table></section>'


def _measured_on(result: JobResult) -> str:
    """The job's models measured on each class or pool its target lists, side by side, and the model to
    ship on each (as the result records it)."""
    entries = result.measured_on
    if not entries:
        return ""
    rows, groups = [], []
    for m in entries:
        where = m.worker_class or m.target
        if m.status == "pending":
            status = f'<span class="sub">waiting for a worker of {_e(m.target)}</span>'
        elif m.status == "failed":
            status = f'<span class="bad">failed: {_e(m.error.message if m.error else "no reason recorded")}</span>'
        else:
            status = f"<strong>{_e(m.chosen)}</strong>" + (
                "" if m.within_budget is None else (" (within budget)" if m.within_budget else " (outside budget)")
            )
        rows.append(
            f"<tr><td>{_e(m.target)}</td><td>{_e(m.worker_class or NA)}</td><td>{_e(m.pool or '')}</td>"
            f'<td class="num">{_e(fmt_ms(_p50(m.original)))}</td><td class="num">{_e(fmt_ms(_p50(m.quantized)))}</td>'
            f'<td class="num">{_e(fmt_x(m.speedup_p50))}</td><td>{status}</td></tr>'
        )
        if m.status == "measured":
            groups.append(
                (
                    where,
                    [
                        ("original", _num(_p50(m.original)), fmt_ms(_p50(m.original)), ORIGINAL_COLOR),
                        ("quantized", _num(_p50(m.quantized)), fmt_ms(_p50(m.quantized)), QUANTIZED_COLOR),
                    ],
                )
            )
    chart = hbar_chart(groups, label="Median latency per worker class", label_w=190) if groups else ""
    return (
        '<section id="measured-on"><h2>Per worker class</h2>'
        '<p class="sub">The float and quantized models measured on a worker of each class or pool the job '
        "targets (the first is where the job ran), with the same settings and data; ship: the model to deploy "
        "there.</p>"
        f"{_LEGEND}{chart}"
        '<table style="margin-top:12px"><thead><tr><th>target</th><th>class</th><th>pool</th>'
        '<th class="num">float p50</th><th class="num">quantized p50</th><th class="num">speedup</th>'
        f"<th>ship</th></tr></thead><tbody>{''.join(rows)}</tbody></table></section>"
    )


def _timings(result: JobResult) -> str:
    rows = [
        f'<tr><th>{_e(key)}</th><td class="num">{_e(fmt_seconds(value))}</td></tr>'
        for key, value in result.timings_s.items()
    ]
    if result.peak_memory_bytes is not None:
        rows.append(
            f'<tr><th>peak memory of the job</th><td class="num">{_e(fmt_bytes(result.peak_memory_bytes))}</td></tr>'
        )
    if not rows:
        return ""
    return f'<section><h2>Timings</h2><table class="kv"><tbody>{"".join(rows)}</tbody></table></section>'


def _error(job: Mapping[str, Any]) -> str:
    err = job.get("error")
    if not isinstance(err, Mapping):
        return ""
    detail = err.get("detail")
    detail_html = "<pre>" + _e(json.dumps(detail, indent=2, sort_keys=True, default=str)) + "</pre>" if detail else ""
    return (
        f'<section class="box error"><h2>The job {_e(job.get("status") or "failed")}: '
        f"{_e(err.get('code') or 'error')}</h2><p>{_e(err.get('message'))}</p>{detail_html}</section>"
    )


def _not_ready(job: Mapping[str, Any]) -> str:
    status = job.get("status")
    if status not in ("queued", "running"):
        return ""
    progress = _num(job.get("progress")) or 0.0
    progress = max(0.0, min(1.0, progress))
    stage = job.get("stage") or status
    return (
        f'<section class="box"><p>This job is <strong>{_e(status)}</strong> (stage {_e(stage)}, '
        f"{progress * 100:.0f}% done). The measurements appear here when it succeeds.</p>"
        f'<div class="progress"><div style="width:{progress * 100:.1f}%"></div></div></section>'
    )


# ----------------------------------------------------------------------------- mode auto / compare

GOOD_COLOR = "#2f855a"
MUTED_COLOR = "#9aa3b2"


def _verdict(result: JobResult) -> str:
    """The first line of an auto or compare report: what was decided, in one sentence."""
    quantization = result.quantization
    auto = None if quantization is None else quantization.auto
    verdict = result.comparison.fidelity
    if auto is not None:
        speedup = _num(result.comparison.speedup_p50)
        value = None if verdict is None else _num(verdict.fidelity)
        metric = (None if verdict is None else verdict.metric) or "fidelity"
        measured = f"{fmt_x(speedup)} vs float" + (f", {metric} {fmt_float(value)}" if value is not None else "")
        if auto.verdict == "keep_float":
            text = (
                f"<strong>Keep float.</strong> No model within your fidelity budget beats the float model on "
                f"{_e(auto.objective or 'latency')} on this CPU. The artifact is {_e(auto.chosen)} "
                f"({_e(measured)})."
            )
            return f'<section class="box verdict keep" id="verdict"><p>{text}</p></section>'
        if verdict is not None and not verdict.within_budget:
            text = (
                f"<strong>Quantized, but outside the budget on the evaluation data.</strong> Chose {_e(auto.chosen)} "
                f"({_e(measured)}): the search's samples had it within budget, the whole evaluation data does not."
            )
            return f'<section class="box verdict keep" id="verdict"><p>{text}</p></section>'
        text = f"<strong>Quantized.</strong> Chose {_e(auto.chosen)}: {_e(measured)}, within budget."
        return f'<section class="box verdict good" id="verdict"><p>{text}</p></section>'
    if quantization is not None and quantization.mode == "compare" and verdict is not None:
        within = verdict.within_budget
        text = (
            f"<strong>{'Within' if within else 'Outside'} the fidelity budget.</strong> The uploaded model against "
            f"its float reference: {_e(verdict.metric)} {_e(fmt_float(verdict.fidelity))}."
        )
        return f'<section class="box verdict {"good" if within else "keep"}" id="verdict"><p>{text}</p></section>'
    return ""


def pareto_plot(trials: Sequence[AutoTrial], *, chosen: str | None, floor: float | None, width: int = 900) -> str:
    """Latency (x) against fidelity (y), one point per measured model, labelled with its size; in-budget
    points green, the chosen one ringed, the Pareto front (faster and more faithful) joined."""
    points = [
        (t, p50, fidelity)
        for t in trials
        if (p50 := _num(t.p50_ms)) is not None and (fidelity := _num(t.fidelity)) is not None
    ]
    if not points:
        return '<p class="sub">No candidate was measured.</p>'
    left, right, top, bottom = 70, 30, 14, 40
    height = 340
    xs = [p[1] or 0.0 for p in points]
    ys = [p[2] or 0.0 for p in points] + ([floor] if floor is not None else [])
    xmax = _nice_ceiling(max(xs) * 1.05 if max(xs) > 0 else 1.0)
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.08 or 0.01
    ylo, yhi = ylo - pad, yhi + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(v: float) -> float:
        return left + v / xmax * plot_w

    def y(v: float) -> float:
        return top + (yhi - v) / (yhi - ylo) * plot_h

    parts = [
        _line(left, top + plot_h, left + plot_w, top + plot_h, MUTED_COLOR),
        _line(left, top, left, top + plot_h, MUTED_COLOR),
    ]
    for i in range(6):
        v = xmax * i / 5
        parts.append(_text(x(v), top + plot_h + 16, fmt_ms(v), anchor="middle", cls="muted"))
        w = ylo + (yhi - ylo) * i / 5
        parts.append(_text(left - 6, y(w) + 4, fmt_float(w, 3), anchor="end", cls="muted"))
    parts.append(_text(left + plot_w / 2, height - 4, "median latency (p50)", anchor="middle", cls="muted"))
    if floor is not None and ylo <= floor <= yhi:
        parts.append(_line(left, y(floor), left + plot_w, y(floor), POOR_COLOR, 1, dash="4 3"))
        parts.append(_text(left + plot_w - 4, y(floor) - 4, f"budget {fmt_float(floor, 3)}", anchor="end", cls="muted"))
    front: list[tuple[float, float]] = []
    best = -math.inf
    for _, px, py in sorted(points, key=lambda p: (p[1], -(p[2] or 0.0))):
        if py is not None and px is not None and py > best:
            best = py
            front.append((x(px), y(py)))
    if len(front) > 1:
        path = " ".join(f"{'M' if i == 0 else 'L'}{fx:.1f} {fy:.1f}" for i, (fx, fy) in enumerate(front))
        parts.append(f'<path d="{path}" fill="none" stroke="{MUTED_COLOR}" stroke-dasharray="3 3"/>')
    for t, px, py in points:
        assert px is not None and py is not None
        color = GOOD_COLOR if t.within_budget else POOR_COLOR
        cx, cy = x(px), y(py)
        label = f"{t.name}: {fmt_ms(px)}, {fmt_float(py)}, {fmt_bytes(t.size_bytes)}"
        parts.append(
            f'<g><title>{_e(label)}</title><circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{color}" '
            f'fill-opacity="0.8"/></g>'
        )
        if t.name == chosen:
            parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" stroke="#1d2330" stroke-width="2"/>')
        parts.append(_text(cx + 8, cy - 6, fmt_bytes(t.size_bytes), cls="muted"))
    return _svg(width, height, parts, "Latency against fidelity of every model the search measured")


def _auto(result: JobResult) -> str:
    auto = None if result.quantization is None else result.quantization.auto
    if auto is None:
        return ""
    trials = [*auto.candidates, *auto.steps]
    budgeted = [o for o in result.comparison.outputs if o.budgeted]
    floor = _num(budgeted[0].min) if len({o.metric for o in budgeted}) == 1 else None
    rows = []
    for t in trials:
        status = (
            f'<span class="bad">failed: {_e(t.error.message)}</span>'
            if t.error is not None
            else ('<span class="good">within</span>' if t.within_budget else '<span class="bad">outside</span>')
        )
        mark = " ★" if t.name == auto.chosen else ""
        rows.append(
            f"<tr><td>{_e(t.name)}{mark}</td><td>{_e(t.stage)}</td>"
            f'<td class="num">{_e(fmt_ms(t.p50_ms))}</td><td class="num">{_e(fmt_x(t.speedup))}</td>'
            f'<td class="num">{_e(fmt_x(t.predicted_speedup))}</td>'
            f'<td class="num">{_e(fmt_bytes(t.size_bytes))}</td>'
            f'<td class="num">{_e(t.metric or "")} {_e(fmt_float(t.fidelity))}</td>'
            f'<td class="num">{_e(t.latency_runs)}</td><td>{status}</td></tr>'
        )
    recipe = auto.effective_recipe
    recipe_html = (
        "<pre>" + _e(json.dumps(recipe, indent=2, sort_keys=True)) + "</pre>"
        if recipe is not None
        else '<p class="sub">The artifact is the float model itself.</p>'
    )
    return (
        "<section><h2>The search</h2>"
        f'<p class="sub">{len(trials)} model(s) measured in {_e(fmt_seconds(auto.search_seconds))} '
        f"(objective {_e(auto.objective)}). Green: within the fidelity budget; the ringed point was chosen; "
        "dashed: the Pareto front. Labels: size on disk.</p>"
        + _preflight(auto)
        + pareto_plot(trials, chosen=auto.chosen, floor=floor)
        + '<table style="margin-top:12px"><thead><tr><th>model</th><th>stage</th><th class="num">p50</th>'
        '<th class="num">speedup</th><th class="num">predicted</th><th class="num">size</th>'
        '<th class="num">fidelity</th><th class="num">runs</th><th>budget</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        '<h3 class="sub" style="margin-top:14px">Recipe that reproduces the artifact as a plain job</h3>'
        + recipe_html
        + _sensitivity(auto)
        + "</section>"
    )


_KINDS = (("qdq", "QDQ"), ("qoperator", "QOperator"), ("s8s8", "S8S8"), ("dynamic", "dynamic"))


def _preflight(auto: AutoSearch) -> str:
    """The pre-flight's verdict, its speedups per op type and int8 kind, and the candidates it did not try."""
    pre = auto.preflight
    if pre is None:
        return ""
    kinds = [(key, name) for key, name in _KINDS if key in pre.speedups]
    head = "".join(f'<th class="num">{_e(name)}</th>' for _, name in kinds)

    def cells(speedups: Mapping[Any, float | None], free: Sequence[str] = ()) -> str:
        out = []
        for key, _ in kinds:
            value = speedups.get(key)
            cls = "num bad" if value is not None and value < 1 else "num"
            out.append(f'<td class="{cls}">{"free" if key in free else _e(fmt_x(value))}</td>')
        return "".join(out)

    rows = [
        f'<tr><td>{_e(op.op_type)}</td><td class="num">{_e(op.nodes)}</td>'
        f'<td class="num">{_e(fmt_pct(op.share))}</td>{cells(op.speedups, op.free_in)}</tr>'
        for op in pre.ops[:12]
    ]
    rows.append(f"<tr><th>whole model, predicted</th><td></td><td></td>{cells(pre.speedups)}</tr>")
    pruned = ", ".join(f"{p.name} ({fmt_x(p.predicted_speedup)})" for p in pre.pruned)
    cached = f", {pre.layers_cached} from the cache" if pre.layers_cached else ""
    return (
        f'<h3 class="sub" style="margin-top:14px">Pre-flight on this CPU: <strong>{_e(pre.verdict)}</strong></h3>'
        f'<p class="sub">Float against int8 per layer, {pre.layers} distinct layer(s) of {pre.nodes_timed} of '
        f"{pre.nodes} node(s){_e(cached)}, in {_e(fmt_seconds(pre.seconds))} on {_e(pre.cpu_model or 'this CPU')} "
        f"(ONNX Runtime {_e(pre.onnxruntime or '')}). Speedup over float per op type, with int8 neighbours: an op "
        "type the quantizer leaves in float pays the conversions around it; free: folded into the node before it.</p>"
        '<table><thead><tr><th>op type</th><th class="num">nodes</th><th class="num">float time</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        + (f'<p class="sub">Not tried, predicted slower than float: {_e(pruned)}.</p>' if pruned else "")
    )


def _sensitivity(auto: AutoSearch) -> str:
    charts = []
    for entry in auto.sensitivity:
        top = entry.top[:10]
        if not top:
            continue
        groups = [
            (
                f"{n.node} ({n.op_type})",
                [("score", _num(n.score), fmt_float(n.score, 3), QUANTIZED_COLOR)],
            )
            for n in top
        ]
        charts.append(
            f'<h3 class="sub" style="margin-top:14px">Most sensitive nodes of {_e(entry.candidate)} '
            f"({_e(entry.method)})</h3>"
            + hbar_chart(groups, label="Sensitivity of the top nodes", scale_max=None, label_w=260)
        )
    if not charts:
        return ""
    return (
        "".join(charts)
        + "<p class=\"sub\">Score: share of each channel's signal that quantizing the node's input loses, averaged "
        "over channels (0: nothing, 1: all). Full ranking in the sensitivity.json artifact.</p>"
    )


# ----------------------------------------------------------------------------- page


def _typed(fields: Mapping[str, Any]) -> tuple[Mapping[str, Any], JobResult | None, str]:
    """The job's own fields as the API serves them, its result read once as the typed JobResult (the page
    is the one place that reads it whole), and, for a stored result of another shape, the page's note
    about it (with the result as stored): such a result came from an older version and is shown, not
    refused."""
    stored = fields.get("result")
    if not isinstance(stored, dict):
        return fields, None, ""
    try:
        return fields, JobResult.from_stored(stored), ""
    except ValidationError as exc:
        return fields, None, _stored_as_is(stored, exc)


def _stored_as_is(stored: Any, exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "result"
    return (
        '<section class="box warnings" id="stored-result"><h2>The result, as stored</h2>'
        "<p>This result does not have the shape this version of QaaS reports on (it was probably stored by an "
        f"older version: <code>{_e(where)}</code>: {_e(first.get('msg'))}), so it is shown as it was "
        "recorded rather than laid out.</p>"
        "<pre>" + _e(json.dumps(stored, indent=2, sort_keys=True, default=str)) + "</pre></section>"
    )


def render_report_html(job: Mapping[str, Any]) -> str:
    """The page for one job (the contract's Job JSON, as `GET /v1/jobs/{id}` serves it): a full report when it has a
    result, its error or progress otherwise."""
    fields, result, stored_note = _typed(job)
    body = [_header(fields), _error(fields), _not_ready(fields)]
    if result is not None:
        body.append(_verdict(result))
        body.append(_warnings(result.warnings))
        body.append(_headline(result))
        body.append(_latency(result))
        body.append(_fidelity(result))
        body.append(_size_and_accuracy(result))
        body.append(_auto(result))
        body.append(_measured_on(result))
    elif stored_note:
        body.append(stored_note)
    elif fields.get("status") not in ("queued", "running") and not fields.get("error"):
        body.append('<div class="box">This job has no result.</div>')
    recipe = fields.get("recipe")
    if isinstance(recipe, Mapping):
        body.append(_kv_table(recipe, title="Recipe"))
    evaluation_settings = fields.get("evaluation")
    if result is not None:
        body.append(_steps(result.preprocessing_steps))
        if result.evaluation is not None:
            body.append(_kv_table(result.evaluation.model_dump(exclude_unset=True), title="How it was measured"))
        elif isinstance(evaluation_settings, Mapping):
            body.append(_kv_table(evaluation_settings, title="Evaluation settings"))
        body.append(_machine(result.machine))
        body.append(_timings(result))
    elif isinstance(evaluation_settings, Mapping):
        body.append(_kv_table(evaluation_settings, title="Evaluation settings"))
    footer = (
        "Generated by QaaS. Latency was measured with both models on the same machine, the same thread "
        "count and interleaved runs after warm-up; fidelity and accuracy on the same samples for both models."
        if result is not None
        else "Generated by QaaS."
    )
    title = f"QaaS report {fields.get('id') or ''}".strip()
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # Nothing may be fetched: this page is self-contained.
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}<footer>{footer}</footer></main></body></html>\n"
    )
