"""The figures the README quotes: generated from the committed results file, each with its own run."""

from __future__ import annotations

import ast
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

import bench.__main__ as cli
from bench.common import Context
from bench.results import (
    BEGIN,
    END,
    README,
    RESULTS_FILE,
    Baseline,
    Measurement,
    Results,
    readme_block,
    readme_figures,
    readme_with,
)


def _performance_section(text: str) -> str:
    start = text.index("\n## Performance")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_the_readme_table_is_the_committed_results() -> None:
    results = Results.load(RESULTS_FILE)  # also checks the file against the format
    assert results.figures, f"{RESULTS_FILE} holds no figures"
    shown = readme_figures(README.read_text(encoding="utf-8"))
    assert shown == readme_block(results), "README and bench/results/figures.json disagree: run `make bench-readme`"


def test_every_committed_figure_was_measured_in_a_full_size_run() -> None:
    for name, figure in Results.load(RESULTS_FILE).figures.items():
        assert figure.value is not None, (name, figure.errors)
        assert not figure.run.quick, f"{name} comes from a --quick run"
        assert figure.run.commit, name


def test_the_performance_section_states_no_figure_outside_the_generated_block() -> None:
    section = _performance_section(README.read_text(encoding="utf-8"))
    assert BEGIN in section and END in section
    prose = section[: section.index(BEGIN)] + section[section.index(END) + len(END) :]
    assert not re.search(r"\d", prose), "a number in the Performance prose is not traceable to a run: " + "".join(
        line for line in prose.splitlines(keepends=True) if re.search(r"\d", line)
    )


# What a sentence says when it reports a measurement: a throughput, or how many times faster, slower or
# more something was ("tenfold", "3x faster", "twice as fast"). Outside the generated table, such a
# figure cannot be traced to a run.
MEASURED = re.compile(
    r"\d[\d,.]*\s*(MB/s|GB/s|req/s|jobs/min)"
    r"|\b\w+fold\b"
    r"|\d[\d,.]*\s*(x|\u00d7)\s+(faster|slower|smaller|larger|less|more)\b"
    r"|\b(twice|half|(?-i:[a-z]+) times) as (fast|slow|quick|much|many|large|big|small)\b"
    r"|\b(?-i:[a-z]+) times (faster|slower|more|less|smaller|larger|bigger)\b",
    re.IGNORECASE,
)
ROOT = README.parent


def test_the_readme_states_no_measurement_outside_the_generated_block() -> None:
    text = README.read_text(encoding="utf-8")
    prose = text[: text.index(BEGIN)] + text[text.index(END) + len(END) :]
    found = [line for line in prose.splitlines() if MEASURED.search(line)]
    assert not found, f"figures outside bench/results/figures.json: {found}"


def _docstrings(package: str) -> Iterator[tuple[str, str]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield f"{path.relative_to(ROOT)}:{getattr(node, 'name', 'module')}", doc


@pytest.mark.parametrize("package", ["service", "worker", "bench", "client"])
def test_docstrings_state_no_measurement(package: str) -> None:
    found = [f"{where}: {match.group(0)!r}" for where, doc in _docstrings(package) for match in MEASURED.finditer(doc)]
    assert not found, f"docstrings quoting figures that no results file holds: {found}"


def test_the_measurement_pattern_catches_what_the_issue_found() -> None:
    for claim in (
        "A single `cp` of a gigabyte varied tenfold here",
        "measured anywhere from 350 to 3,750 MB/s on this machine",
        "288 req/s at p99 389 ms",
        "Two workers are not twice as fast",
        "dynamic Conv is 6x slower than float",
        "int8 runs 1.4\u00d7 faster",
        "ConvInteger is many times slower than float",
    ):
        assert MEASURED.search(claim), claim
    for fact in (
        "every upload was written twice",
        "twice as long after each further attempt",
        "at most RUNS_GROWTH times more",
    ):
        assert not MEASURED.search(fact), fact


def _fake_benchmark(monkeypatch: pytest.MonkeyPatch, name: str, figures: dict[str, float], fail: bool = False) -> None:
    def run(ctx: Context) -> dict[str, Measurement]:
        if fail:
            raise RuntimeError("the service did not start")
        return {
            key: Measurement(what=f"{key} figure", unit="s", value=v, baseline=Baseline(what="plain", value=2 * v))
            for key, v in figures.items()
        }

    module = types.ModuleType(f"bench.{name}")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, f"bench.{name}", module)
    monkeypatch.setitem(cli.BENCHMARKS, name, tuple(figures))


def _first_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **benchmarks: dict[str, float]) -> Path:
    """`python -m bench` with only these fake benchmarks, writing to a results file of the test's own."""
    output = tmp_path / "figures.json"
    monkeypatch.setattr(cli, "BENCHMARKS", {})
    for name, figures in benchmarks.items():
        _fake_benchmark(monkeypatch, name, figures)
    assert cli.main(["--output", str(output)]) == 0
    return output


def test_a_partial_run_replaces_its_figures_and_keeps_the_others_with_their_own_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cli, "ORDER", ["a", "b", "c"])
    output = _first_run(monkeypatch, tmp_path, first={"a": 1.0}, second={"b": 3.0, "c": 4.0})
    before = Results.load(output)
    assert list(before.figures) == ["a", "b", "c"]
    assert before.figures["a"].run.benchmark == "first" and before.figures["b"].run.benchmark == "second"
    assert before.figures["a"].run.command == f"python -m bench --output {output}"

    _fake_benchmark(monkeypatch, "second", {"b": 5.0, "c": 6.0})
    assert cli.main(["--only", "second", "--output", str(output)]) == 0
    after = Results.load(output)
    assert list(after.figures) == ["a", "b", "c"]
    assert after.figures["a"] == before.figures["a"]  # value and run untouched
    assert after.figures["b"].value == 5.0 and after.figures["b"].baseline.value == 10.0  # type: ignore[union-attr]
    assert after.figures["b"].run.command == f"python -m bench --only second --output {output}"
    assert after.figures["b"].run.finished_at >= before.figures["b"].run.finished_at
    for figure in after.figures.values():
        run = figure.run
        assert run.machine.onnxruntime and len(run.load_before) == len(run.load_after) == 3


def test_a_crashed_benchmark_records_its_figures_without_a_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    output = _first_run(monkeypatch, tmp_path, first={"a": 1.0})
    _fake_benchmark(monkeypatch, "first", {"a": 1.0}, fail=True)
    assert cli.main(["--output", str(output)]) == 1
    figure = Results.load(output).figures["a"]
    assert figure.value is None and figure.what == "a figure"
    assert figure.errors == ["first crashed: RuntimeError: the service did not start"]
    assert "| a figure | n/a (errors: first crashed" in readme_block(Results.load(output))


def test_the_readme_block_is_rewritten_from_the_results(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    output = _first_run(monkeypatch, tmp_path, first={"a": 1234.5})
    text = f"# Title\n\n## Performance\n\nprose\n\n{BEGIN}\nstale table\n{END}\n\nmore prose\n"
    written = readme_with(text, Results.load(output))
    assert written.startswith("# Title\n\n## Performance\n\nprose\n\n") and written.endswith("\n\nmore prose\n")
    assert "stale table" not in written
    assert "| a figure | 1,234 s | plain: 2,469 s |  |" in written
    with pytest.raises(ValueError, match="exactly one block"):
        readme_with("no block here", Results.load(output))
