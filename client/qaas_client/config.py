"""Where the client finds the service: flags, then QAAS_URL / QAAS_API_KEY, then `qaas login`'s file."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from qaas_client.errors import QaasError

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "QAAS_URL"
KEY_ENV = "QAAS_API_KEY"


def config_path() -> Path:
    """`~/.config/qaas/config.json` on Linux (honours XDG_CONFIG_HOME), the platform's usual place elsewhere."""
    return Path(click.get_app_dir("qaas")) / "config.json"


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str | None


def load_saved() -> Connection | None:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise QaasError("invalid_config", f"Cannot read {path}: {exc}; run `qaas login` again.") from exc
    return Connection(str(data.get("url") or DEFAULT_URL), data.get("api_key") or None)


def resolve(url: str | None = None, api_key: str | None = None) -> Connection:
    """Each value from the first place that has it: the argument, the environment, the saved login.
    An empty `api_key` means "no key", without looking further."""
    saved = load_saved()
    if api_key is None:
        api_key = os.environ.get(KEY_ENV) or (saved.api_key if saved else None)
    return Connection(
        url=(url or os.environ.get(URL_ENV) or (saved.url if saved else None) or DEFAULT_URL).rstrip("/"),
        api_key=api_key or None,
    )


def save(connection: Connection) -> Path:
    """Writes the file readable by its owner only (0600, folder 0700), replacing it atomically."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    payload = json.dumps({"url": connection.url, "api_key": connection.api_key}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".config-", suffix=".tmp")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def forget() -> bool:
    path = config_path()
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed
