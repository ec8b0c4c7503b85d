"""What the CLI shows and saves of a service's answers: its strings as they are (never Rich markup),
and the HTML report `qaas report --open` hands the browser in a private file no one could plant."""

from __future__ import annotations

import io
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from rich.console import Console

from qaas_client import JobUpdate, Model, Report
from qaas_client.cli import cli
from qaas_client.progress import ProgressView
from qaas_client.render import models_table, summary, usage_grid
from tests.client.hostile import Answer, Hostile

STYLED = "[bold red]pwned[/]"
LINK = "[link=https://evil.test]click here[/link]"
UNBALANCED = "closing [/] with nothing open"


def shown(renderable: Any) -> str:
    console = Console(record=True, width=300, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def qaas(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_the_summary_shows_the_services_strings_literally() -> None:
    report = Report.from_json(
        {
            "comparison": {"outputs": [{"name": LINK, "cosine": 0.99}]},
            "warnings": [STYLED, UNBALANCED],
            "quantization": {"auto": {"verdict": "quantized", "chosen": "[italic]static[/italic]"}},
        }
    )
    text = shown(summary(report))  # markup in these strings would be eaten, or raise MarkupError
    for literal in (f"{LINK}: cosine", f"- {STYLED}", f"- {UNBALANCED}", "chose [italic]static[/italic]"):
        assert literal in text, text


def test_tables_show_names_literally() -> None:
    model = Model.from_json({"id": "m1", "name": STYLED, "inputs": [{"name": LINK}], "created_at": ""})
    assert STYLED in shown(models_table([model])) and LINK in shown(models_table([model]))
    grid = usage_grid(UNBALANCED, {"total_bytes": 0, "quota_bytes": 1}, {}, 0, 0)
    assert UNBALANCED in shown(grid)


def test_progress_shows_the_stage_and_candidate_names_literally() -> None:
    update = JobUpdate("running", "quantizing", 0.5, candidate=1, candidates=2, candidate_name=STYLED)
    for terminal in (True, False):
        screen = io.StringIO()
        console = Console(file=screen, force_terminal=terminal, width=200, color_system=None)
        with ProgressView("[red]job[/red]", console) as view:
            view.update(update)
        assert STYLED in screen.getvalue(), screen.getvalue()
        assert "[red]job" in screen.getvalue(), screen.getvalue()


def test_qaas_jobs_show_prints_the_error_message_and_code_literally(hostile: Hostile) -> None:
    hostile.job(
        "j1",
        status="failed",
        stage="quantizing",
        error={"code": "quantization_failed", "message": f"{STYLED} {UNBALANCED}", "detail": {}},
    )
    code, stdout, stderr = qaas("--url", hostile.url, "jobs", "show", "j1")
    assert code == 0, stderr
    assert f"error: {STYLED} {UNBALANCED} [quantization_failed]" in stdout, stdout


def test_qaas_report_open_writes_a_private_file_no_one_could_have_planted(
    tmp_path: Path, hostile: Hostile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temp directory is shared with the machine's other users: a file at a name they can guess
    (`/tmp/qaas-report-<job>.html`) may already be their link to a file of yours, which would be
    overwritten with the report, and a world-readable report shows them your figures."""
    shared_tmp = tmp_path / "tmp"
    shared_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (shared_tmp / "qaas-report-j1.html").symlink_to(victim)  # planted at the old, predictable name
    opened: list[str] = []

    def browser(uri: str) -> bool:
        opened.append(uri)
        return True

    monkeypatch.setattr("webbrowser.open", browser)
    hostile.job("j1")
    page = "<html><body>the report</body></html>"
    hostile.routes["/v1/jobs/j1/report.html"] = Answer(200, page.encode(), {"Content-Type": "text/html"})

    for _ in range(2):
        code, _, stderr = qaas("--url", hostile.url, "report", "j1", "--open")
        assert code == 0, stderr
    assert victim.read_text() == "keep me"
    files = [Path(uri.removeprefix("file://")) for uri in opened]
    assert len(files) == 2 and files[0] != files[1]  # a new name each time: nothing to guess
    for file in files:
        assert file.read_text() == page
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert stat.S_IMODE(file.parent.stat().st_mode) == 0o700 and file.parent.parent == shared_tmp
