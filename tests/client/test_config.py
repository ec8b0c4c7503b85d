"""`qaas login`'s file and the order in which the URL and key are found."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from qaas_client import config


def test_the_saved_login_is_readable_by_its_owner_only(no_saved_login: Path) -> None:
    path = config.save(config.Connection("https://qaas.example", "qaas_12345678_secret"))
    assert path == no_saved_login / "qaas" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    config.save(config.Connection("https://other.example", None))  # replaced, still private
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.load_saved() == config.Connection("https://other.example", None)
    assert config.forget() and not path.exists()


def test_arguments_then_environment_then_saved_login_then_local(monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.resolve() == config.Connection(config.DEFAULT_URL, None)
    config.save(config.Connection("https://saved.example", "saved-key"))
    assert config.resolve() == config.Connection("https://saved.example", "saved-key")
    monkeypatch.setenv("QAAS_URL", "https://env.example/")
    monkeypatch.setenv("QAAS_API_KEY", "env-key")
    assert config.resolve() == config.Connection("https://env.example", "env-key")
    assert config.resolve("https://arg.example", "arg-key") == config.Connection("https://arg.example", "arg-key")
    assert config.resolve(api_key="").api_key is None  # an explicit empty key means none
