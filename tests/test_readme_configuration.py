"""The README's configuration tables against `service/settings.py`: every `QAAS_` variable they list
is a setting, every setting is in the README, and each default they state is the one the service uses."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _rows() -> dict[str, str]:
    """`QAAS_X` -> the default cell as written, from every table row that starts with variables."""
    rows: dict[str, str] = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `QAAS_"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`(QAAS_[A-Z0-9_]+)`", cells[0])
        defaults = [d.strip() for d in cells[1].split(" / ")] if len(names) > 1 else [cells[1]]
        if len(defaults) == 1:  # one default for them all
            defaults *= len(names)
        assert len(defaults) == len(names), f"one default per variable, or one for all, in: {line}"
        rows.update(zip(names, defaults, strict=True))
    return rows


def _field(variable: str) -> str:
    return variable.removeprefix("QAAS_").lower()


def _value(cell: str) -> Any:
    """What a default cell says, or `...` when it describes a computed default (checked apart)."""
    if cell in ("unset", "unset (off)"):
        return None
    if cell == "empty":
        return ""
    sized = re.fullmatch(r"([\d.]+) (KiB|MiB|GiB)", cell)
    if sized:
        return int(float(sized.group(1)) * UNITS[sized.group(2)])
    literal = re.match(r"`([^`]*)`", cell)
    if literal and not literal.group(1).startswith("<"):  # `<data dir>/work` is computed
        return literal.group(1)
    return ...


def test_every_variable_in_the_readme_is_a_setting_and_every_setting_is_in_the_readme() -> None:
    documented = {_field(v) for v in _rows()}
    fields = set(Settings.model_fields)
    assert documented - fields == set(), "the README lists variables the service does not read"
    text = README.read_text(encoding="utf-8")
    missing = [f"QAAS_{name.upper()}" for name in sorted(fields) if f"`QAAS_{name.upper()}`" not in text]
    assert not missing, f"settings the README does not mention: {missing}"


@pytest.mark.parametrize("variable", sorted(_rows()))
def test_the_default_the_readme_states_is_the_services(variable: str, tmp_path: Path) -> None:
    cell = _rows()[variable]
    name = _field(variable)
    default = Settings.model_fields[name].default
    stated = _value(cell)
    if stated is ...:
        settings = Settings(data_dir=tmp_path)
        computed = {
            "database_url": settings.resolved_database_url == f"sqlite:///{tmp_path / 'qaas.db'}",
            "broker_url": settings.resolved_broker_url.startswith("filesystem://") and settings.is_embedded,
            "storage_dir": settings.resolved_storage_dir == tmp_path / "storage",
            "work_dir": settings.resolved_work_dir == tmp_path / "work",
            "job_file_bytes": settings.resolved_job_file_bytes
            == 2 * max(settings.max_model_bytes, settings.max_dataset_bytes) + (1 << 30),
        }
        assert name in computed, f"{variable}: teach this test what {cell!r} means"
        assert default is None and computed[name], (variable, cell)
    elif isinstance(default, bool):
        assert stated in ("0", "1") and default == (stated == "1"), (variable, cell, default)
    elif isinstance(default, Path):
        assert Path(stated) == default, (variable, cell, default)
    elif isinstance(default, int | float) and isinstance(stated, str):
        assert float(stated) == default, (variable, cell, default)
    else:
        assert stated == default, (variable, cell, default)


def test_the_limits_the_readme_names_in_words_are_the_codes() -> None:
    """Numbers in the README's sentences that are constants in the code (their behaviour is tested
    where they act: tests/security/test_upload_files.py, test_upload_limits.py, the engine's tests)."""
    from core.judge import DEFAULT_FLOOR
    from core.recipe import Recipe
    from service.limits import OTHER_BODY_LIMIT
    from service.models.service import MAX_FILES_PER_UPLOAD
    from service.quotas import FILE_OVERHEAD_BYTES
    from worker.engine.auto import FASTER_MARGIN, NOT_SLOWER_CONFIRMATIONS

    search_seconds = next(f.default for f in dataclasses.fields(Recipe) if f.name == "max_search_seconds")
    assert FILE_OVERHEAD_BYTES % 1024 == 0 and OTHER_BODY_LIMIT % (1 << 20) == 0 and NOT_SLOWER_CONFIRMATIONS == 2
    text = " ".join(README.read_text(encoding="utf-8").split())
    for sentence in (
        f"each file charged its size plus {FILE_OVERHEAD_BYTES // 1024} KiB",
        f"other request bodies are capped at {OTHER_BODY_LIMIT >> 20} MiB",
        f"at most {MAX_FILES_PER_UPLOAD:,} files per upload",
        f"at least {FASTER_MARGIN:.0%} faster than float",
        f"floor {DEFAULT_FLOOR}",
        "in two full-count timings in a row",
        f"`max_search_seconds` (default {search_seconds:g})",
    ):
        assert sentence in text, f"the README should say {sentence!r}, as the code does"
