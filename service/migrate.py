"""Entry point of the one-shot migration: `python -m service.migrate` runs `alembic upgrade head`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from service.database import make_engine
from service.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent


def alembic_config() -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Bring the database of `settings` to `revision` (the tests build their schema this way too)."""
    settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings)
    try:
        with engine.begin() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


if __name__ == "__main__":
    upgrade(get_settings())
