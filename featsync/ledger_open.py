"""Opening a ledger: the engine for a URL (a missing database driver said as such),
a look's read-only open of an SQLite ledger (a private copy in memory), and the
upgrade of an older schema."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url

from featsync.errors import Fatal
from featsync.schema import ADDED_COLUMNS, SCHEMA_VERSION, meta, metadata
from featsync.sqlitefiles import folder_missing, private_copy, read_only_uri

BUSY_TIMEOUT_MS = 10_000  # SQLite waits this long for a lock within one statement


# Query parameters of a database URL that may carry a secret (psycopg's password=,
# PyMySQL's passwd=, an ODBC connection string's PWD=, a token, a key)
SECRET_PARAMS = ("pass", "pwd", "secret", "token", "key", "odbc_connect", "cred", "auth")


def shown_url(url: str) -> str:
    """A database URL as messages may show it: the password and any query parameter
    that may hold a secret replaced by ***."""
    try:
        u = make_url(url)
    except Exception:  # not a URL at all: nothing of it is shown
        return "(the [ledger] url, which is not a valid URL)"
    hidden = {k: "***" for k in u.query if any(word in k.lower() for word in SECRET_PARAMS)}
    shown = u.update_query_dict(hidden).render_as_string(hide_password=True)
    return shown.replace("%2A%2A%2A", "***")  # as the password's


def busy_timeout(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.close()


def read_only(url: str, where: str) -> Engine | None:
    """Open an SQLite ledger file only to look (status, a dry run, a report):
    nothing written, nothing created. The look reads a private copy in memory
    (sqlitefiles.private_copy: one consistent state however long the look, whatever
    a daemon writes meanwhile); a ledger of an older schema is upgraded in that copy
    only. A missing file is an empty ledger, unless its folder is missing too: then
    the URL is wrong, and that is said. None for other databases: they are opened
    as usual (and not written to by a look)."""
    u = make_url(url)
    db = u.database
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:":
        return None
    missing = folder_missing(f"ledger {where}", db, "[ledger] url")
    if missing is not None:
        raise missing
    # Whether the file exists is asked once: a first sync may make it at any moment.
    exists = os.path.exists(db)
    try:
        copy = private_copy(db, BUSY_TIMEOUT_MS) if exists else None
    except sqlite3.Error as exc:
        raise Fatal(f"cannot open ledger {where}: {exc}") from exc
    try:
        if copy is None and exists:  # too big to copy: read in place
            uri = read_only_uri(db)
            engine = sa.create_engine(
                "sqlite://",
                creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
            )
            sa.event.listen(engine, "connect", busy_timeout)
        else:
            mem = copy or sqlite3.connect(":memory:", check_same_thread=False)
            engine = sa.create_engine(
                "sqlite://", poolclass=sa.pool.StaticPool, creator=lambda: mem
            )
        with engine.begin() as conn:
            # No file, or one a first sync is making (none but featsync's tables, made
            # one by one, and no schema version yet): an empty ledger.
            made = set(sa.inspect(conn).get_table_names()) if copy is not None else set()
            fresh = not exists or (copy is not None and made <= set(metadata.tables))
            if copy is not None or not exists:
                metadata.create_all(conn)  # in memory only: an empty or a copied one
            found = conn.execute(
                sa.select(meta.c.value).where(meta.c.key == "schema_version")
            ).scalar()
            if found is None and fresh:
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
                found = str(SCHEMA_VERSION)
            version = schema_number(found)
            if copy is not None and 0 < version < SCHEMA_VERSION:
                upgrade(conn)  # the copy; the file stays as it is
                version = SCHEMA_VERSION
    except sa.exc.SQLAlchemyError as exc:
        raise Fatal(f"cannot open ledger {where}: {reason(exc)}") from exc
    if version == 0:
        raise Fatal(f"ledger {where} is no featsync ledger (it has no schema version)")
    if version != SCHEMA_VERSION:
        newer = version > SCHEMA_VERSION
        raise Fatal(
            f"ledger {where} has schema version {found}; this featsync "
            f"{'understands only up to' if newer else 'reads'} {SCHEMA_VERSION}: "
            + ("upgrade featsync" if newer else "run `featsync reconcile` once to upgrade it")
        )
    return engine


def upgrade(conn: Connection) -> None:
    """Bring a ledger of an older schema up to this one, in place (new columns are
    empty: their meaning starts now)."""
    tables = {t for t, _c, _s in ADDED_COLUMNS}
    have = {(t, c["name"]) for t in tables for c in sa.inspect(conn).get_columns(t)}
    for table, column, sql_type in ADDED_COLUMNS:
        if (table, column) not in have:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS history_action_at ON history (action, at)")
    conn.execute(
        meta.update().where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION))
    )


# The database driver SQLAlchemy imports for a URL, and the package that brings it
DRIVER_PACKAGES = {
    "psycopg2": "psycopg2-binary",
    "psycopg": "psycopg[binary]",
    "asyncpg": "asyncpg",
    "pg8000": "pg8000",
    "pymysql": "PyMySQL",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "mariadb": "mariadb",
    "oracledb": "oracledb",
    "cx_Oracle": "cx_Oracle",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}


def create_engine(url: str) -> Engine:
    """sa.create_engine, with a missing database driver said as such: which ledger,
    which module, and the package that brings it (SQLAlchemy itself raises a bare
    ModuleNotFoundError)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        missing = folder_missing(f"ledger {shown_url(url)}", u.database, "[ledger] url")
        if missing is not None:
            raise missing
    try:
        return sa.create_engine(url)
    except ImportError as exc:
        where = shown_url(url)
        module = (exc.name or "").split(".")[0] or "?"
        package = DRIVER_PACKAGES.get(module, module)
        raise Fatal(
            f"ledger {where}: its database driver, the Python module {module!r}, is not "
            f"installed; install it (`pip install '{package}'`) or use an sqlite:/// ledger"
        ) from None


def schema_number(found: object) -> int:
    """The schema version a ledger's meta table holds (0: none, or not a number)."""
    try:
        return int(str(found)) if found is not None else 0
    except ValueError:
        return 0


def reason(exc: sa.exc.SQLAlchemyError) -> str:
    """The driver's own message, without SQLAlchemy's SQL text and parameters."""
    orig = getattr(exc, "orig", None)
    return f"{type(orig or exc).__name__}: {orig or exc}"
