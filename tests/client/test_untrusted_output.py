"""What the CLI shows of a service's answers: its strings as they are, never Rich markup."""

from __future__ import annotations

import io
from typing import Any

from click.testing import CliRunner
from rich.console import Console

from qaas_client import JobUpdate, Model, Report
from qaas_client.cli import cli
from qaas_client.progress import ProgressView
from qaas_client.render import models_table, summary, usage_grid
from tests.client.hostile import Hostile

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
