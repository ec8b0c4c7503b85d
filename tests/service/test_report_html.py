"""The HTML report: numbers a person looks for, escaping of user strings, and a real browser's view."""

from __future__ import annotations

import copy
import html
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from service.jobs.schemas import JobOut
from service.reports import render_report_html
from tests.browser import chromium, rendered_dom, run_chromium, visible_text

EVIL = "<script>alert('x')</script>"


def _result() -> dict[str, Any]:
    return {
        "original": {
            "size_bytes": 4_000_000,
            "latency_ms": {
                "p50": 12.3456,
                "p90": 14.0,
                "p99": 19.5,
                "mean": 12.9,
                "std": 1.1,
                "min": 11.0,
                "max": 21.25,
            },
            "throughput_per_s": 77.5,
            "accuracy": 0.7612,
            "top5_accuracy": 0.9301,
            "session_create_ms": 35.0,
            "batch_size": 1,
            "runs": 50,
        },
        "quantized": {
            "size_bytes": 1_000_000,
            "latency_ms": {
                "p50": 4.321,
                "p90": 5.0,
                "p99": 7.75,
                "mean": 4.5,
                "std": 0.4,
                "min": 4.0,
                "max": 8.0,
            },
            "throughput_per_s": 222.2,
            "accuracy": 0.7534,
            "top5_accuracy": 0.9288,
            "session_create_ms": 20.0,
            "batch_size": 1,
            "runs": 50,
        },
        "comparison": {
            "size_ratio": 0.25,
            "speedup_p50": 2.857,
            "outputs": [
                {
                    "name": "logits",
                    "cosine": 0.998765,
                    "sqnr_db": 31.4,
                    "max_abs_error": 0.25,
                    "mean_abs_error": 0.0125,
                    "top1_agreement": 0.9876,
                },
                {
                    "name": f"aux{EVIL}",
                    "cosine": 0.91,
                    "sqnr_db": 9.5,
                    "max_abs_error": 3.5,
                    "mean_abs_error": 0.5,
                    "top1_agreement": None,
                },
            ],
            "accuracy": {
                "metric": "top1",
                "original": 0.7612,
                "quantized": 0.7534,
                "delta": -0.0078,
                "top5_original": 0.9301,
                "top5_quantized": 0.9288,
                "samples": 500,
            },
        },
        "warnings": [f"Output 'aux{EVIL}' is poorly reproduced by the quantized model."],
        "timings_s": {"quantizing": 3.5, "evaluating": 12.25},
        "peak_memory_bytes": 256 * 1024 * 1024,
        "preprocessing_steps": ["quant_pre_process with skip_symbolic_shape=True", f"step {EVIL}"],
        "machine": {
            "cpu_model": f"Fake CPU {EVIL}",
            "cpu_features": {"avx2": True, "avx512_vnni": False},
            "onnxruntime": "1.31.1",
            "threads": 2,
            "memory_bytes": 8 * 1024**3,
        },
        "evaluation": {
            "inputs": "dataset",
            "samples": 500,
            "latency_runs": 50,
            "interleaved": True,
            "accuracy_tolerance": 0.01,
            "fidelity_thresholds": {"cosine": 0.99, "sqnr_db": 20.0, "sqnr_cap_db": 200.0},
        },
    }


def _job(**overrides: Any) -> dict[str, Any]:
    job = {
        "id": "0f3c-job",
        "status": "succeeded",
        "stage": "done",
        "progress": 1.0,
        "model_id": "model-42",
        "recipe": {"mode": "static", "per_channel": True, "nodes_to_exclude": [EVIL]},
        "created_at": "2025-01-01T00:00:00Z",
        "finished_at": "2025-01-01T00:02:00Z",
        "error": None,
        "result": _result(),
    }
    job.update(overrides)
    return job


# The numbers a reader looks for, as the page prints them.
EXPECTED = [
    "12.35 ms",  # original p50
    "4.32 ms",  # quantized p50
    "2.86x",  # speedup
    "3.81 MiB",  # original size
    "976.56 KiB",  # quantized size
    "4.00x smaller",
    "76.12%",
    "75.34%",
    "-0.78 pts",
    "93.01%",  # top-5
    "0.998765",  # cosine
    "31.4 dB",
    "98.76%",  # top-1 agreement
    "222.2 samples/s",
    "256.00 MiB",  # peak memory
    "3.50 s",  # a timing
]


def test_full_report_shows_the_numbers_and_escapes_user_strings() -> None:
    page = render_report_html(_job())
    for text in EXPECTED:
        assert text in page, text
    assert "<script" not in page
    assert html.escape(EVIL) in page
    # Warnings come before the measurements.
    assert page.index("1 warning") < page.index("Median latency")
    for section in (
        "Latency",
        "Fidelity per output",
        "Size and accuracy",
        "Recipe",
        "Pre-processing steps",
        "Machine",
        "Timings",
    ):
        assert f"<h2>{section}</h2>" in page, section
    assert page.count("<svg") >= 4


def test_page_is_self_contained() -> None:
    page = render_report_html(_job())
    without_svg_ns = page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in without_svg_ns and "https://" not in without_svg_ns
    for needle in ("<script", "<link", "<img", "@import", "url(", " src="):
        assert needle not in page, needle


def test_failed_job_shows_its_error() -> None:
    job = _job(
        status="failed",
        result=None,
        error={
            "code": "quantization_failed",
            "message": f"ONNX Runtime said {EVIL}",
            "detail": {"node": "a&b"},
        },
    )
    page = render_report_html(job)
    assert "quantization_failed" in page
    assert "ONNX Runtime said &lt;script&gt;" in page
    assert "a&amp;b" in page
    assert "<script" not in page
    assert "Latency</h2>" not in page


def test_running_job_shows_progress() -> None:
    page = render_report_html(_job(status="running", stage="calibrating", progress=0.37, result=None))
    assert "running" in page and "calibrating" in page and "37% done" in page
    assert "Latency</h2>" not in page


def test_sparse_result_does_not_break_the_page() -> None:
    result = _result()
    result["comparison"]["accuracy"] = None
    result["comparison"]["outputs"] = [
        {
            "name": "y",
            "cosine": None,
            "sqnr_db": 200.0,
            "max_abs_error": 0.0,
            "mean_abs_error": 0.0,
            "top1_agreement": None,
        }
    ]
    result["quantized"]["latency_ms"] = None
    for key in ("machine", "timings_s", "peak_memory_bytes", "preprocessing_steps", "warnings"):
        del result[key]
    result["evaluation"] = {}
    page = render_report_html(_job(result=result))
    assert "n/a" in page
    assert "No warnings" in page
    assert "Accuracy needs an evaluation dataset with labels" in page


def _outside_flags(page: str) -> int:
    return page.count('<strong class="bad">outside budget</strong>')


def _row(name: str, faithful: bool, value: float, **numbers: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "class_scores",
        "metric": "agreement",
        "value": value,
        "min": 0.99,
        "budgeted": True,
        "faithful": faithful,
        "top1_agreement": value,
        **numbers,
    }


def test_the_report_shows_the_verdicts_the_result_records_and_decides_none() -> None:
    """The report has no thresholds of its own: each output's verdict and the accuracy's are the engine's,
    recorded in the result. Here the output with the worse cosine is the faithful one, because the engine
    judged it by agreement: the page follows the engine."""
    result = _result()
    result["comparison"]["outputs"] = [
        _row("logits", True, 1.0, cosine=0.985, sqnr_db=15.0),
        _row("aux", False, 0.97, cosine=0.999, sqnr_db=40.0),
    ]
    verdict = {"within_budget": False, "metric": "agreement", "fidelity": 0.97, "accuracy_tolerance": 0.005}
    result["comparison"]["fidelity"] = verdict
    result["comparison"]["accuracy"]["within_tolerance"] = False
    page = render_report_html(_job(result=result))
    assert _outside_flags(page) == 1
    flag = page.index('<strong class="bad">outside budget</strong>')
    assert page.index("<td>logits</td>") < page.index("<td>aux</td>") < flag  # the flag is aux's
    assert '<div class="big bad">75.34%</div>' in page  # the engine said: beyond tolerance
    assert '<div class="big bad">outside budget</div>' in page
    result["comparison"]["accuracy"]["within_tolerance"] = True  # the same 0.78-point drop, judged within
    result["comparison"]["outputs"][1]["faithful"] = True
    result["comparison"]["fidelity"] = {**verdict, "within_budget": True}
    page = render_report_html(_job(result=result))
    assert _outside_flags(page) == 0 and '<div class="big good">within budget</div>' in page
    assert '<div class="big">75.34%</div>' in page  # within tolerance, and not better either


def test_a_result_stored_before_the_verdicts_gets_the_verdicts_its_engine_made() -> None:
    """Results stored by the previous version carry thresholds, not verdicts (`fidelity_thresholds`,
    `accuracy_tolerance`): the one reader of stored results (core.result.upgrade_stored) turns them into
    the verdicts that engine made (the aux output: cosine 0.91 and SQNR 9.5 dB under 0.99 and 20 dB)."""
    page = render_report_html(_job())
    assert _outside_flags(page) == 1
    assert page.index('<strong class="bad">outside budget</strong>') > page.index("aux&lt;script")
    assert '<div class="big">75.34%</div>' in page  # 0.78 points is within that result's 1 point
    result = _result()
    result["evaluation"]["accuracy_tolerance"] = 0.005
    assert '<div class="big bad">75.34%</div>' in render_report_html(_job(result=result))
    result["evaluation"] = {}
    page = render_report_html(_job(result=result))
    assert _outside_flags(page) == 0 and "outside budget" not in page  # nothing recorded: nothing judged


def test_a_result_stored_by_an_older_version_is_shown_as_stored() -> None:
    """A result that is not today's JobResult (here: sizes under an old key, no comparison) still
    gives a page: the raw result, escaped, with a note saying why it is not laid out."""
    old = {"original": {"size": 4_000_000}, "quantized": {"size": 1_000_000}, "note": EVIL}
    page = render_report_html(_job(result=old))
    assert "The result, as stored" in page and "older version" in page
    assert "&quot;size&quot;: 4000000" in page and html.escape(EVIL) in page and "<script" not in page
    assert "<h2>Latency</h2>" not in page and "This job has no result" not in page
    assert "<h2>Recipe</h2>" in page  # the job's own fields are still shown


def test_the_page_of_a_job_as_the_api_serves_it_is_the_page_of_its_stored_json() -> None:
    """The API hands the report the job as `GET /v1/jobs/{id}` serves it: the same page as the stored JSON."""
    job = JobOut.model_validate(
        _job(
            calibration_dataset_id=None,
            evaluation_dataset_id=None,
            evaluation={"latency_runs": 50, "warmup_runs": 5, "threads": None, "batch_size": 1},
            attempts=1,
            started_at="2025-01-01T00:00:01Z",
        )
    )
    page = render_report_html(job.model_dump(mode="json"))
    assert page == render_report_html(job.model_dump(mode="json", exclude_unset=True))
    for text in EXPECTED:
        assert text in page, text


def test_the_report_imports_no_engine() -> None:
    code = (
        "import sys, service.reports.html\n"
        "heavy = [m for m in ('onnxruntime', 'worker', 'service.jobs') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# ----------------------------------------------------------------------------- a real browser


def test_report_renders_in_a_real_browser(tmp_path: Path) -> None:
    exe = chromium()
    job = _job()
    job["result"] = copy.deepcopy(job["result"])
    page = tmp_path / "report.html"
    page.write_text(render_report_html(job), encoding="utf-8")
    dom = rendered_dom(exe, page, tmp_path)
    text = visible_text(dom)
    for expected in EXPECTED:
        assert expected in text, expected
    assert EVIL in text  # shown as text ...
    assert "<script" not in dom  # ... never parsed as an element
    assert dom.count("<svg") >= 4

    shot = tmp_path / "report.png"
    run_chromium(exe, tmp_path, "--window-size=1100,1800", f"--screenshot={shot}", page.as_uri())
    assert shot.stat().st_size > 10_000


def _auto_job(verdict: str) -> dict[str, Any]:
    job = _job()
    job["recipe"] = {"mode": "auto"}
    trial = {"stage": "candidate", "recipe": {"mode": "static"}, "latency_runs": 10, "error": None}
    job["result"]["quantization"] = {
        "auto": {
            "verdict": verdict,
            "objective": "latency",
            "chosen": "dynamic int8, 1 node(s) in float" if verdict == "quantized" else "float16",
            "effective_recipe": {"mode": "dynamic", "nodes_to_exclude": ["layer0.ffn_down"]},
            "candidates": [
                {**trial, "name": "dynamic int8", "p50_ms": 5.0, "speedup": 2.0, "size_bytes": 1000, "fidelity": 0.96},
                {
                    **trial,
                    "name": "float16",
                    "p50_ms": 10.2,
                    "speedup": 0.98,
                    "size_bytes": 2000,
                    "fidelity": 0.9999,
                    "within_budget": True,
                },
                {**trial, "name": EVIL, "error": {"code": "quantization_failed", "message": "broke"}},
            ],
            "steps": [
                {
                    **trial,
                    "stage": "step",
                    "name": "dynamic int8, 1 node(s) in float",
                    "p50_ms": 5.6,
                    "speedup": 1.8,
                    "size_bytes": 1100,
                    "fidelity": 0.9931,
                    "within_budget": True,
                },
            ],
            "search_seconds": 12.5,
            "sensitivity": [
                {
                    "candidate": "dynamic int8",
                    "method": "dynamic_simulation",
                    "top": [
                        {"node": "layer0.ffn_down", "op_type": "MatMul", "score": 0.148},
                        {"node": "layer0.q", "op_type": "MatMul", "score": 0.0001},
                    ],
                }
            ],
        }
    }
    job["result"]["comparison"]["fidelity"] = {
        "within_budget": True,
        "metric": "cosine",
        "fidelity": 0.9931,
        "accuracy_tolerance": 0.01,
    }
    return job


def test_auto_report_leads_with_the_verdict_and_plots_the_search() -> None:
    page = render_report_html(_auto_job("quantized"))
    assert page.index('id="verdict"') < page.index("1 warning") < page.index("Median latency")
    assert "Quantized.</strong> Chose dynamic int8, 1 node(s) in float" in page
    assert "<h2>The search</h2>" in page and "Latency against fidelity" in page
    assert page.count("<circle") >= 4  # three measured points and the ring around the chosen one
    assert "Most sensitive nodes of dynamic int8" in page and "layer0.ffn_down (MatMul)" in page
    assert "&quot;nodes_to_exclude&quot;" in page
    assert "<script" not in page and html.escape(EVIL) in page


def test_keep_float_is_the_first_thing_the_report_says() -> None:
    page = render_report_html(_auto_job("keep_float"))
    body = page[page.index("</header>") :]
    first = re.sub(r"<[^>]+>", " ", body[: body.index("</section>")])
    assert " ".join(first.split()).startswith("Keep float. No model within your fidelity budget beats the float model")


def test_the_search_section_shows_the_preflight_per_op_type_and_what_it_did_not_try() -> None:
    job = _auto_job("keep_float")
    job["result"]["quantization"]["auto"]["preflight"] = {
        "verdict": "Conv 2.1x; HardSwish blocks 0.7x: int8 will not help here (best QDQ 0.93x predicted)",
        "int8_helps": False,
        "speedups": {"qdq": 0.93, "qoperator": 0.91, "s8s8": 0.45},
        "ops": [
            {"op_type": "Conv", "nodes": 7, "float_ms": 2.0, "share": 0.6, "speedups": {"qdq": 2.1, "s8s8": 0.5}},
            {"op_type": EVIL, "nodes": 7, "float_ms": 1.0, "share": 0.3, "speedups": {"qdq": 0.7, "s8s8": 0.7}},
            {
                "op_type": "Clip",
                "nodes": 2,
                "float_ms": 0.3,
                "share": 0.1,
                "speedups": {"s8s8": 0.9},
                "free_in": ["qdq"],
            },
        ],
        "pruned": [{"name": "static QDQ, per-channel, MinMax", "predicted_speedup": 0.93, "reason": "slower"}],
        "nodes": 20,
        "nodes_timed": 16,
        "layers": 5,
        "layers_cached": 5,
        "cpu_model": "Intel(R) Xeon(R) Platinum 8480+",
        "onnxruntime": "1.32.0",
        "seconds": 0.02,
    }
    page = render_report_html(job)
    search = page[page.index("<h2>The search</h2>") :]
    assert "Pre-flight on this CPU: <strong>Conv 2.1x; HardSwish blocks 0.7x: int8 will not help here" in search
    assert search.index("Pre-flight") < search.index("Latency against fidelity")  # before the search it pruned
    table = search[search.index("<th>op type</th>") : search.index("</table>")]
    assert ">QDQ</th>" in table and ">S8S8</th>" in table and ">dynamic</th>" not in table  # kinds measured
    assert "<td>Conv</td>" in table and "2.10x" in table and "whole model, predicted" in table
    assert '<td>Clip</td><td class="num">2</td><td class="num">10.0%</td><td class="num">free</td>' in table
    assert html.escape(EVIL) in table and "<script" not in page
    assert "5 from the cache" in search and "Intel(R) Xeon(R) Platinum 8480+" in search
    assert "Not tried, predicted slower than float: static QDQ, per-channel, MinMax (0.93x)" in search
