"""The progress `qaas quantize` and `job.wait(progress=True)` show: a live bar on a terminal, one line
per change of stage elsewhere (logs, CI), both naming auto's candidate k of n."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from qaas_client import JobUpdate
from qaas_client.progress import ProgressView
from tests.client.conftest import scripted
from tests.client.test_events import Service, event, job, sse

JOB_ID = "3f0e5a1c-8d2b-4c7e-9a61-2b7d0c4e9f10"
TRYING = JobUpdate("running", "quantizing", 0.55, candidate=2, candidates=5, candidate_name="dynamic")


def test_on_a_terminal_a_bar_shows_the_percentage_the_stage_and_the_candidate() -> None:
    screen = io.StringIO()
    with ProgressView(JOB_ID, Console(file=screen, force_terminal=True, width=120, color_system=None)) as view:
        view.update(JobUpdate("running", "calibrating", 0.2))
        view.update(TRYING)
    shown = screen.getvalue()
    assert "━" in shown, shown  # the bar itself
    last = [line for line in shown.splitlines() if "job " in line][-1]  # the bar as it was left
    assert f"job {JOB_ID[:8]}" in last and " 55%" in last and "quantizing (candidate 2/5: dynamic)" in last, last
    assert f"job {JOB_ID}:" not in shown  # not the log lines


def test_elsewhere_one_line_per_change_of_stage() -> None:
    log = io.StringIO()
    with ProgressView(JOB_ID, Console(file=log, force_terminal=False, width=200)) as view:
        for update in (
            JobUpdate("queued", "queued", 0.0),
            JobUpdate("running", "calibrating", 0.1),
            JobUpdate("running", "calibrating", 0.3),  # same stage: no new line
            TRYING,
            JobUpdate("succeeded", "done", 1.0),
        ):
            view.update(update)
    assert log.getvalue().splitlines() == [
        f"job {JOB_ID}: queued 0%",
        f"job {JOB_ID}: calibrating 10%",
        f"job {JOB_ID}: quantizing (candidate 2/5: dynamic) 55%",
        f"job {JOB_ID}: succeeded 100%",
    ]


def test_wait_with_progress_draws_the_bar_on_stderr(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # stderr counts as a terminal, as in a shell
    monkeypatch.setenv("COLUMNS", "120")

    def service() -> Service:
        stream = sse(
            ("status", "1.0", event("running", "calibrating", 0.3)), ("end", "2.2", job("succeeded", "done", 1.0))
        )
        return Service([stream], [job("succeeded", "done", 1.0)])

    with scripted(service()) as client:
        running = client.get_job("j1")
        running.raw = job("running", "calibrating", 0.3)
        assert running.wait(progress=True).status == "succeeded"
    shown = capsys.readouterr().err
    assert "━" in shown and "100%" in shown and "succeeded" in shown, shown
    with scripted(service()) as client:
        quiet = client.get_job("j1")
        quiet.raw = job("running", "calibrating", 0.3)
        assert quiet.wait().status == "succeeded"
    assert capsys.readouterr().err == ""  # no bar unless asked for
