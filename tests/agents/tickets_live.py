"""``manage.py tickets_serve`` (the demo ticket service) as a process for a test: started on a free
port with its own SQLite file, stopped afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.live import REPO, STARTUP_TIMEOUT_S, _free_port, _stop


@contextmanager
def tickets_serve(directory: Path) -> Iterator[str]:
    """Runs the ticket service with tickets in ``directory/tickets.sqlite3``; yields its base URL
    (``http://127.0.0.1:<port>``) once ``GET /healthz`` answers."""
    port = _free_port()
    log = directory / "tickets_serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603 (fixed argument list)
            [
                sys.executable,
                "manage.py",
                "tickets_serve",
                "--port",
                str(port),
                "--db",
                str(directory / "tickets.sqlite3"),
            ],
            cwd=REPO,
            env=dict(os.environ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"tickets_serve exited with {process.returncode}:\n{log.read_text(errors='replace')}"
                )
            with suppress(OSError), urllib.request.urlopen(f"{base}/healthz", timeout=2) as response:  # noqa: S310
                if response.status == 200 and json.load(response) == {"status": "ok"}:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tickets_serve did not answer within {STARTUP_TIMEOUT_S}s:\n{log.read_text(errors='replace')}"
                )
            time.sleep(0.2)  # polling the server's start-up, not asserting on time
        yield base
    finally:
        _stop(process)
