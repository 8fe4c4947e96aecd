"""Migrations: the ledger's schema is brought to the newest alembic revision when it is opened.
SQLAlchemy and alembic are loaded only when a database is behind."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Engine


def migrations_dir() -> Path:
    packaged = Path(__file__).resolve().parent.parent / "_migrations"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "migrations"


def head_revision() -> str:
    """The newest migration's revision: revisions are the numbers their files are named by, in order."""
    return max(path.name.split("_", 1)[0] for path in (migrations_dir() / "versions").glob("[0-9]*_*.py"))


def migration_engine(url: str, pragmas: tuple[str, ...]) -> Engine:
    """A SQLAlchemy engine on the ledger for alembic (and schema checks): the same pragmas as the
    ledger's own connections, and BEGIN IMMEDIATE, so one process migrates at a time."""
    from sqlalchemy import create_engine, event  # noqa: PLC0415 - loaded only to migrate

    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi: Any, _record: Any) -> None:
        dbapi.isolation_level = None  # we issue BEGIN ourselves
        for pragma in pragmas:
            dbapi.execute(pragma)

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def upgrade(db: Any) -> None:
    """Bring the database to the newest migration. Only called for a database that is not there:
    loading alembic and SQLAlchemy costs a third of a second on every command."""
    from alembic import command  # noqa: PLC0415 - imported only when there is work for it
    from alembic.config import Config  # noqa: PLC0415
    from sqlalchemy.exc import DBAPIError  # noqa: PLC0415

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    engine = db.migration_engine()
    try:
        with engine.begin() as conn:  # BEGIN IMMEDIATE: one process migrates at a time
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    except DBAPIError as exc:  # the driver's own error, as the ledger's connections raise it
        raise exc.orig if isinstance(exc.orig, sqlite3.Error) else exc from None
    finally:
        engine.dispose()
