"""Benchmark: the portal under API load and streaming chat at once, and its PostgreSQL backends.

Prints figures; asserts nothing. Sets itself up like ``bench_chat.py``: a fresh database
``bench_load`` on the embedded PostgreSQL (or ``BENCH_DATABASE_URL``), its own Redis database
(``BENCH_REDIS_URL``, default ``redis://127.0.0.1:6379/13``), the scripted model server of
``tests.scripted_llm`` in a process of its own (``--rate`` tokens/s, ``--tokens`` per answer), then
``daphne`` and one Celery worker (thread pool, ``--worker-concurrency`` threads, as the Procfile
has) as subprocesses, with the Procfile's pool sizes unless ``--web-pool``/``--worker-pool`` say
otherwise. One tenant, its owner's all-scopes API key, a small indexed collection.

1. Load (locust as a library, in a child process of its own: locust patches the standard library
   with gevent on import). For ``--duration`` seconds:
   - ``--api-clients`` API clients, each repeating GET /api/v1/me, GET /api/v1/agents, GET /api/v1/tools,
     GET /api/v1/approvals?status=pending, GET /api/v1/budgets, GET /api/v1/usage/summary,
     GET /api/v1/invoices,
     POST /api/v1/knowledge/search (hybrid, the collection) and GET /api/v1/sessions with a
     think time of ``--think`` seconds on average;
   - ``--streams`` SSE clients, each sending a message with ``"stream": true`` to a session of its
     own and reading the turn's events to the end, again and again.
   Printed: responses with a 5xx status (target 0; 503 counted apart), p50/p95 per endpoint, the
   relay ratio of the streams (tokens received / tokens the scripted server sent for those
   turns; target >= 99 %), and the most PostgreSQL backends of the database seen by a sample
   every 0.5 s, against the configured pool total (web + worker pools).
2. WebSocket relay (pool settings): ``--ws-levels`` (default 100 and 300) sessions at once over
   the chat socket (``?format=json``), one turn each: relay ratio and turns that did not complete.
3. ``--baseline``: the load of 1 against the settings before the pool (``DATABASE_POOL=false``,
   ``DATABASE_CONN_MAX_AGE=60``: a connection per thread). The code is today's, so a request that
   finds PostgreSQL out of connections is counted as a 503 (before: a 500).

The machine is shared with whatever else runs; measure on a quiet one for figures to keep
(docs/perf/). Usage: ``.venv/bin/python tests/bench/bench_load.py [--duration 120]
[--api-clients 200] [--streams 100] [--baseline] [--ws-levels 100,300]``; a smoke run:
``--duration 20 --api-clients 40 --streams 20 --ws-levels 20``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

def _own_environment() -> None:
    """The bench's settings (again after importing bench_chat, which sets its own)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["DEBUG"] = "false"
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    # Own Redis database: outside tests the broker's queues are not prefixed.
    os.environ["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    os.environ["CACHE_KEY_PREFIX"] = "benchload"
    # Not on a start-up thread while the load runs: the warm-up search loads it in daphne.
    os.environ["EMBEDDING_PRELOAD"] = "false"


_own_environment()

DATABASE = "bench_load"
MODEL = "bench-stream"
TOKEN_CHARS = 4  # the scripted tokens are " t00".." t99"
QUESTION = "How long is the refund window for a purchase?"
# The Procfile's pool sizes (web, celery) and what today's settings were before the pool.
PROCFILE_WEB_POOL = 20
PROCFILE_WORKER_POOL = 16
BASELINE_ENV = {"DATABASE_POOL": "false", "DATABASE_CONN_MAX_AGE": "60"}


# --- Child process: the locust load -----------------------------------------------------------

def locust_phase(config_path: str) -> None:
    """``--locust-phase CONFIG``: run the load described by CONFIG (JSON) and write the results
    next to it (``<CONFIG>.out``). Runs in its own process: importing locust monkey-patches the
    standard library with gevent."""
    import gevent
    from locust import HttpUser, between, constant, events, task
    from locust.env import Environment

    cfg: dict[str, Any] = json.loads(Path(config_path).read_text())
    base = f"http://127.0.0.1:{cfg['port']}"
    headers = {"Host": f"{cfg['host']}:{cfg['port']}", "Authorization": f"Bearer {cfg['key']}"}
    status_counts: dict[str, dict[str, int]] = {}
    streams: list[dict[str, Any]] = []
    think = float(cfg["think"])

    @events.request.add_listener
    def _count(name: str, response: Any = None, exception: Any = None, **_: Any) -> None:
        code = str(getattr(response, "status_code", 0) or 0) if response is not None else "error"
        status_counts.setdefault(name, {})
        status_counts[name][code] = status_counts[name].get(code, 0) + 1

    class ApiClient(HttpUser):
        host = base
        fixed_count = int(cfg["api_clients"])
        wait_time = between(think / 2, think * 1.5)

        @task
        def me(self) -> None:
            self.client.get("/api/v1/me", headers=headers, name="GET /me")

        @task
        def agents(self) -> None:
            self.client.get("/api/v1/agents", headers=headers, name="GET /agents")

        @task
        def search(self) -> None:
            self.client.post("/api/v1/knowledge/search", headers=headers, name="POST /knowledge/search",
                             json={"query": "refund window", "collection_ids": [cfg["collection_id"]], "top_k": 5})

        @task
        def sessions(self) -> None:
            self.client.get("/api/v1/sessions", headers=headers, name="GET /sessions")

        @task
        def tools(self) -> None:
            self.client.get("/api/v1/tools", headers=headers, name="GET /tools")

        @task
        def approvals(self) -> None:
            self.client.get("/api/v1/approvals?status=pending", headers=headers, name="GET /approvals")

        @task
        def budgets(self) -> None:
            self.client.get("/api/v1/budgets", headers=headers, name="GET /budgets")

        @task
        def usage_summary(self) -> None:
            self.client.get("/api/v1/usage/summary?group_by=agent", headers=headers, name="GET /usage/summary")

        @task
        def invoices(self) -> None:
            self.client.get("/api/v1/invoices", headers=headers, name="GET /invoices")

    class Streamer(HttpUser):
        host = base
        fixed_count = int(cfg["streams"])
        wait_time = constant(0.2)

        def on_start(self) -> None:
            response = self.client.post("/api/v1/sessions", headers=headers, json={"agent_id": cfg["agent_id"]},
                                        name="POST /sessions")
            self.session_id = response.json()["id"] if response.status_code == 201 else None

        @task
        def stream(self) -> None:
            if self.session_id is None:
                self.on_start()
                return
            marker = uuid.uuid4().hex[:12]
            seen: dict[str, Any] = {"marker": marker, "chars": 0, "final": "", "status": 0}
            started = time.perf_counter()
            try:
                with self.client.post(f"/api/v1/sessions/{self.session_id}/messages", headers=headers,
                                      json={"content": f"[bench:{marker}] {QUESTION}", "stream": True},
                                      stream=True, name="POST /sessions/{id}/messages (SSE)",
                                      catch_response=True) as response:
                    seen["status"] = response.status_code
                    if response.status_code != 200:
                        response.failure(f"status {response.status_code}")
                    else:
                        event = ""
                        for line in response.iter_lines(decode_unicode=True):
                            if line.startswith("event: "):
                                event = line[7:]
                            elif line.startswith("data: ") and event == "token.delta":
                                seen["chars"] += len(json.loads(line[6:]).get("text") or "")
                            elif line.startswith("data: ") and event in (
                                    "turn.completed", "turn.failed", "turn.cancelled", "error"):
                                seen["final"] = event
                        response.success()
            except Exception as exc:  # noqa: BLE001 - a broken stream is a result to count
                seen["final"] = f"exception: {type(exc).__name__}"
            seen["seconds"] = time.perf_counter() - started
            streams.append(seen)

    env = Environment(user_classes=[ApiClient, Streamer], events=events)
    runner = env.create_local_runner()
    runner.start(user_count=ApiClient.fixed_count + Streamer.fixed_count, spawn_rate=float(cfg["spawn_rate"]))
    gevent.spawn_later(float(cfg["duration"]), runner.quit)
    runner.greenlet.join()
    endpoints = {}
    for (name, method), entry in env.stats.entries.items():
        endpoints[f"{name}"] = {"method": method, "requests": entry.num_requests, "failures": entry.num_failures,
                                "p50": entry.get_response_time_percentile(0.5),
                                "p95": entry.get_response_time_percentile(0.95),
                                "rps": entry.total_rps}
    Path(config_path + ".out").write_text(json.dumps(
        {"endpoints": endpoints, "statuses": status_counts, "streams": streams}))


# --- Parent: servers, sampling, figures -------------------------------------------------------

class BackendSampler:
    """Counts the database's client backends in pg_stat_activity every ``interval`` seconds, per
    application name (``PGAPPNAME`` of each server process), on a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        import psycopg
        from django.conf import settings

        db: dict[str, Any] = settings.DATABASES["default"]
        self.conn = psycopg.connect(host=db["HOST"], port=db["PORT"] or None, user=db["USER"],
                                    password=db["PASSWORD"] or None, dbname=db["NAME"], autocommit=True)
        self.interval = interval
        self.samples: list[dict[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rows = self.conn.execute(
                "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND backend_type = 'client backend' AND pid <> pg_backend_pid() GROUP BY 1").fetchall()
            self.samples.append({str(name): int(n) for name, n in rows})
            self._stop.wait(self.interval)

    def __enter__(self) -> BackendSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.conn.close()

    def peak(self, app: str | None = None) -> int:
        """Most backends seen at once, of one application name or (``None``) of the servers'."""
        if app is not None:
            return max((s.get(app, 0) for s in self.samples), default=0)
        return max((sum(n for name, n in s.items() if name.startswith("bench-")) for s in self.samples), default=0)


def start_servers(args: argparse.Namespace, env: dict[str, str], log_dir: Path,
                  label: str) -> tuple[Any, list[Any], int]:
    """daphne and one Celery worker with ``env`` on top of the bench's; returns them and the port."""
    from tests.bench.live import free_port, start_daphne, start_workers

    saved = dict(os.environ)
    try:
        port = free_port()
        os.environ.update(env)
        os.environ.update({"PGAPPNAME": "bench-web", "DATABASE_POOL_MAX_SIZE": str(args.web_pool)})
        daphne = start_daphne(port, log_dir / f"daphne-{label}.log")
        os.environ.update({"PGAPPNAME": "bench-celery", "DATABASE_POOL_MAX_SIZE": str(args.worker_pool),
                           "DATABASE_POOL_TIMEOUT_SECONDS": "30"})
        workers = start_workers(1, args.worker_concurrency, log_dir / f"celery-{label}.log")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return daphne, workers, port


def run_load(args: argparse.Namespace, *, port: int, host: str, key: str, agent_id: int, collection_id: int,
             server: Any, label: str, pool_total: int | None) -> None:
    """Section 1 or 2: the locust load against the running servers; prints its figures."""
    from tests.bench.bench_chat import percentiles

    config = {"port": port, "host": host, "key": key, "agent_id": agent_id, "collection_id": collection_id,
              "api_clients": args.api_clients, "streams": args.streams, "duration": args.duration,
              "think": args.think, "spawn_rate": args.spawn_rate}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(config, handle)
    with BackendSampler() as sampler:
        subprocess.run([sys.executable, __file__, "--locust-phase", handle.name], cwd=ROOT, check=True,  # noqa: S603
                       timeout=args.duration + 300)
    out = json.loads(Path(handle.name + ".out").read_text())
    served = server.served
    print(f"\n{label}: {args.api_clients} API clients (think {args.think:g} s) + {args.streams} SSE streams "
          f"for {args.duration:.0f} s", flush=True)
    print(f"   {'endpoint':<40} {'requests':>9} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'5xx':>6} {'503':>6}")
    total_5xx = 0
    for name, row in sorted(out["endpoints"].items()):
        statuses = out["statuses"].get(name, {})
        fives = sum(n for code, n in statuses.items() if code.isdigit() and int(code) >= 500)
        total_5xx += fives
        print(f"   {name:<40} {row['requests']:>9} {row['rps']:>7.1f} {row['p50']:>8.0f} {row['p95']:>8.0f} "
              f"{fives:>6} {statuses.get('503', 0):>6}")
    others: dict[str, int] = {}
    for statuses in out["statuses"].values():
        for code, n in statuses.items():
            if not code.startswith("2"):
                others[code] = others.get(code, 0) + n
    streams = out["streams"]
    finals: dict[str, int] = {}
    for s in streams:
        finals[s["final"] or f"status {s['status']}"] = finals.get(s["final"] or f"status {s['status']}", 0) + 1
    received = sum(s["chars"] / TOKEN_CHARS for s in streams if s["marker"] in served)
    sent = sum(args.tokens for s in streams if s["marker"] in served)
    durations = [s["seconds"] * 1000 for s in streams if s["final"] == "turn.completed"]
    print(f"   5xx responses: {total_5xx} (target 0); non-2xx by status: {others or 'none'}")
    print(f"   SSE turns: {len(streams)} ({finals}); relay ratio {100 * received / max(sent, 1):.2f} % "
          f"({received:.0f} of {sent} tokens; target >= 99 %)"
          + (f"; turn p50/p95 {percentiles(durations)[0]:.0f}/{percentiles(durations)[1]:.0f} ms"
             if len(durations) > 1 else ""))
    pool = (f" (configured pool total {pool_total}: web {args.web_pool} + worker {args.worker_pool})"
            if pool_total else " (no pool)")
    print(f"   PostgreSQL backends, most seen in {len(sampler.samples)} samples every 0.5 s: {sampler.peak()}{pool}; "
          f"web {sampler.peak('bench-web')}, worker {sampler.peak('bench-celery')}", flush=True)


def warm_up(port: int, host: str, key: str, collection_id: int) -> None:
    """One search before the timed load: daphne loads the embedding model on the first."""
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 (our own server)
        f"http://127.0.0.1:{port}/api/v1/knowledge/search", method="POST",
        data=json.dumps({"query": "refund", "collection_ids": [collection_id]}).encode(),
        headers={"Host": f"{host}:{port}", "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:  # noqa: S310
        response.read()


def run_ws_level(port: int, setup: Any, server: Any, sessions: int, tokens: int) -> None:
    """Section 3: ``sessions`` chat sockets, one turn each, all sent at once; relay ratio."""
    import asyncio

    from tests.bench import bench_chat

    ids = bench_chat.sessions_create(setup, setup.agents["no retrieval"], sessions)
    # Turns queue behind the worker's threads; allow for the wait before a socket hears anything.
    bench_chat.RECV_TIMEOUT_S = 180.0

    async def converse() -> list[Any]:
        sockets = [await bench_chat._open(port, setup, sid) for sid in ids]
        try:
            return await bench_chat.run_round(port, setup, sockets, spread=1.0)
        finally:
            for ws in sockets:
                await ws.close()

    seen = asyncio.run(converse())
    served = server.served
    done = [s for s in seen if s.marker in served]
    received = sum(s.chars / TOKEN_CHARS for s in done)
    failures = [s.final for s in seen if s.final != "turn.completed"]
    print(f"   {sessions:>4} sockets: relay ratio {100 * received / max(tokens * len(done), 1):.2f} % "
          f"({received:.0f} of {tokens * len(done)} tokens), {len(failures)} turn(s) not completed"
          + (f": {sorted(set(failures))}" if failures else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load per run")
    parser.add_argument("--api-clients", type=int, default=200)
    parser.add_argument("--streams", type=int, default=100, help="concurrent SSE chat streams")
    parser.add_argument("--think", type=float, default=1.0, help="API clients' mean wait between requests, s")
    parser.add_argument("--spawn-rate", type=float, default=50.0, help="clients started per second")
    parser.add_argument("--rate", type=float, default=20.0, help="scripted tokens per second")
    parser.add_argument("--tokens", type=int, default=60, help="tokens per scripted answer")
    parser.add_argument("--first-token-ms", type=float, default=200.0)
    parser.add_argument("--worker-concurrency", type=int, default=64, help="Celery threads (the Procfile's 64)")
    parser.add_argument("--web-pool", type=int, default=PROCFILE_WEB_POOL, help="daphne's DATABASE_POOL_MAX_SIZE")
    parser.add_argument("--worker-pool", type=int, default=PROCFILE_WORKER_POOL,
                        help="the Celery worker's DATABASE_POOL_MAX_SIZE")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the load with the settings before the pool (no pool, CONN_MAX_AGE=60)")
    parser.add_argument("--ws-levels", default="100,300", help="WebSocket relay levels ('' to skip)")
    parser.add_argument("--locust-phase", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.locust_phase:
        locust_phase(args.locust_phase)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import tests.bench.bench_chat  # noqa: F401  (sets its own environment on import)

    _own_environment()
    from tests.bench.bench_retrieval import prepare_database

    prepare_database(DATABASE, reuse=False)
    import django

    django.setup()
    import redis
    from django.core.management import call_command
    from django_tenants.utils import schema_context

    from billing.models import Budget
    from knowledge.models import Collection
    from tenants.principal import Principal
    from tenants.roles import PERMISSIONS
    from tenants.services.keys import api_key_create
    from tests.bench.bench_chat import RemoteLLM, build_world, stop

    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()  # the bench's own database
    print(f"Preparing {DATABASE} (migrations)...", flush=True)
    call_command("migrate_schemas", interactive=False, verbosity=0)
    log_dir = ROOT / "var" / "bench_load"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = RemoteLLM(model=MODEL, first_token_ms=args.first_token_ms, rate=args.rate, tokens=args.tokens,
                       log=log_dir / "scripted.log")
    try:
        setup = build_world(server.api_base, MODEL)
        key = api_key_create(principal=Principal.system("bench", tenant=setup.tenant), tenant=setup.tenant,
                             name="bench load", scopes=list(PERMISSIONS)).secret
        with schema_context(setup.schema):
            collection_id = Collection.objects.get().pk
            # Every streamed turn reserves and settles against a tenant budget (alert-only: the
            # load must not be refused), so the load includes budget enforcement.
            Budget.objects.get_or_create(name="bench load", defaults={
                "scope": Budget.Scope.TENANT, "period": Budget.Period.MONTH, "limit_tokens": 10**12,
                "action": Budget.Action.ALERT, "alert_thresholds": [0.8, 1.0]})
        from django.db import connection

        connection.close()  # the bench's own connection is not part of what is measured
        runs = [("1. Load with the pool", {"DATABASE_POOL": "true"}, args.web_pool + args.worker_pool)]
        if args.baseline:
            runs.append(("3. Baseline: the same load without the pool (CONN_MAX_AGE=60)", BASELINE_ENV, None))
        levels = [int(x) for x in args.ws_levels.split(",") if x.strip()]
        print(f"Scripted model: first token after {args.first_token_ms:.0f} ms, {args.rate:g} tokens/s, "
              f"{args.tokens} tokens; celery --pool threads --concurrency {args.worker_concurrency}; logs in {log_dir}",
              flush=True)
        for label, env, pool_total in runs:
            daphne, workers, port = start_servers(args, env, log_dir, "pool" if pool_total else "baseline")
            try:
                warm_up(port, setup.host, key, collection_id)
                run_load(args, port=port, host=setup.host, key=key, agent_id=setup.agents["no retrieval"],
                         collection_id=collection_id, server=server, label=label,
                         pool_total=pool_total)
                if pool_total and levels:
                    print(f"\n2. WebSocket relay ({args.tokens} tokens at {args.rate:g}/s per turn, pool settings)",
                          flush=True)
                    for sessions in levels:
                        run_ws_level(port, setup, server, sessions, args.tokens)
            finally:
                for worker in workers:
                    stop(worker)
                stop(daphne)
    finally:
        server.stop()
        from django.db import connections

        connections.close_all()


if __name__ == "__main__":
    main()
