"""Fixtures of the labelling-app tests: a database URL per engine (SQLite file; PostgreSQL when reachable)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

# .ci/run starts a PostgreSQL server and exports this; locally: a role that may CREATE DATABASE
PG_ENV = "MMALIGN_TEST_POSTGRES_URL"


def _postgres_database() -> Iterator[str]:
    url = os.environ.get(PG_ENV, "")
    if not url:
        pytest.skip(f"PostgreSQL tests need a server: set {PG_ENV}=postgresql://user:password@host/db "
                    f"(.ci/run starts one)")
    from sqlalchemy import create_engine, text

    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"mmalign_label_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:  # noqa: BLE001  (any connection failure means: no server to test against)
        admin.dispose()
        pytest.skip(f"PostgreSQL server at {PG_ENV} not reachable or may not create databases: {err}")
    base, _, _ = url.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each engine."""
    if request.param == "sqlite":
        from mmalign.label.store import sqlite_url

        yield sqlite_url(tmp_path)
    else:
        yield from _postgres_database()
