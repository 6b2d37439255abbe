"""Benchmark: issue #32's identity and operations endpoints under concurrent clients.

Prints figures and a final ``SUMMARY {json}`` line; asserts nothing. Sets itself up like
``bench_chat.py``: a fresh database ``bench_identity`` on the embedded PostgreSQL (or
``BENCH_DATABASE_URL``), its own Redis database (``BENCH_REDIS_URL``, default
``redis://127.0.0.1:6379/11``), and the Procfile's ``web`` process (uvicorn, 2 workers, its
port replaced; ``METRICS_TOKEN`` set). Two tenants on a plan with 100,000 seats (every SCIM
create takes the seat lock) and no request rate limit:
``benchid`` with ``--members`` SCIM-provisioned members, and ``benchid2``. Each tenant has an
all-scopes API key of its owner; a staff user with a confirmed TOTP device has a verified
session made in the database (as ``tests/conftest.py`` ``verified_staff_client`` does; the
login and 2FA pages themselves are not part of what is timed).

For each of ``--levels`` (default 1, 10, 50) concurrent clients (asyncio + httpx, one process),
each workload runs ``--duration`` seconds; per request kind: count, throughput, p50/p95 latency
and every non-2xx status by code (5xx target 0):

1. ``scim-list``: GET /scim/v2/Users?filter=userName eq "<member>", GET /scim/v2/Users paged
   (random ``startIndex``, ``count=50``) and GET /scim/v2/Groups, in turn;
2. ``scim-churn``: POST /scim/v2/Users of a new person, then PATCH it ``active: false``; the
   memberships of the level's people left in the database afterwards (expected: created - deactivated);
   then the race: ``--race-clients`` clients POST the same userName at once, ``--race-rounds``
   times with a person without an account and as often with one who has an account, in each
   tenant (the first's plan limits seats, so its creates take the seat lock; the second's does
   not): per round the 201s, the 409 ``uniqueness``, anything else, and the memberships in the
   database (target: exactly one 201 and one membership);
3. ``sso``: GET /api/v1/sso and PUT /api/v1/sso (a display name and role mapping no other PUT
   writes, so every successful PUT changes something); afterwards the final settings must be one of
   the written ones and the ``tenant.sso_settings_changed`` audit events must number the successful
   PUTs; before it, ``--race-clients`` PUTs at once on the second tenant, which has no settings row yet;
4. ``metrics``: GET /metrics with the token (the state gauges of 2 tenants; the state read is
   cached 15 s, so most scrapes read the cache: bench_metrics_state.py has the uncached cost);
5. ``ops``: GET /admin/ops/ as verified staff.

The clients share the machine with the server: on a small machine they take a share of its CPU.
Usage: ``.venv/bin/python tests/bench/bench_identity.py [--duration 20] [--levels 1,10,50]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ["DEBUG"] = "false"
os.environ.setdefault("LOG_LEVEL", "WARNING")
# Own Redis database: outside tests the cache and broker keys are not prefixed per run.
os.environ["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
os.environ["CACHE_KEY_PREFIX"] = "benchidentity"
os.environ["EMBEDDING_PRELOAD"] = "false"
os.environ["METRICS_TOKEN"] = "bench-metrics-token"  # noqa: S105 (a bench's own throwaway token)

from tests.bench.live import free_port, percentiles, start_procfile, stop, wait_http  # noqa: E402

DATABASE = "bench_identity"
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"
PATCH_SCHEMA = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
SCIM_TYPE = "application/scim+json"
MEMBER_DOMAIN = "members.bench.example"


@dataclass
class Target:
    """Where and as whom the clients call: the port, each tenant's host header and key, the
    staff session cookie."""

    port: int
    host_a: str
    key_a: str
    host_b: str
    key_b: str
    staff_cookie: str
    members: list[str]

    def tenant(self, key: str | None = None, host: str | None = None, *, scim: bool = False) -> dict[str, str]:
        headers = {"Host": f"{host or self.host_a}:{self.port}", "Authorization": f"Bearer {key or self.key_a}"}
        if scim:
            headers["Content-Type"] = SCIM_TYPE
        return headers


@dataclass
class OpStats:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, status: str, ms: float) -> None:
        self.latencies_ms.append(ms)
        self.statuses[status] = self.statuses.get(status, 0) + 1


Record = Callable[[str, str, float], None]
Step = Callable[[int, int, Any, Record], Awaitable[None]]


async def timed(client: Any, record: Record, op: str, method: str, url: str, **kwargs: Any) -> Any:
    """Send one request, record its status (``error:<Exception>`` when none came) and latency."""
    started = time.perf_counter()
    try:
        response = await client.request(method, url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a failed request is a result to count
        record(op, f"error:{type(exc).__name__}", (time.perf_counter() - started) * 1000)
        return None
    record(op, str(response.status_code), (time.perf_counter() - started) * 1000)
    return response


async def run_level(target: Target, clients: int, duration: float, step: Step) -> tuple[dict[str, OpStats], float]:
    """``clients`` coroutines repeating ``step(client, iteration, http, record)`` until
    ``duration`` seconds have passed; returns the per-kind statistics and the seconds taken."""
    import httpx

    stats: dict[str, OpStats] = {}

    def record(op: str, status: str, ms: float) -> None:
        stats.setdefault(op, OpStats()).add(status, ms)

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{target.port}", limits=limits, timeout=120) as http:
        started = time.perf_counter()
        deadline = started + duration

        async def loop(n: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                await step(n, i, http, record)
                i += 1

        await asyncio.gather(*(loop(n) for n in range(clients)))
        return stats, time.perf_counter() - started


def level_summary(stats: dict[str, OpStats], seconds: float) -> dict[str, Any]:
    out = {}
    for op, s in sorted(stats.items()):
        p50, p95 = percentiles(s.latencies_ms)
        non2xx = {code: n for code, n in sorted(s.statuses.items()) if not code.startswith("2")}
        out[op] = {"requests": len(s.latencies_ms), "rps": round(len(s.latencies_ms) / seconds, 1),
                   "p50_ms": round(p50, 1), "p95_ms": round(p95, 1), "non_2xx": non2xx,
                   "5xx": sum(n for code, n in non2xx.items() if code.startswith("5"))}
    return out


def print_level(name: str, clients: int, summary: dict[str, Any]) -> None:
    for op, row in summary.items():
        print(f"   {name:<11} {clients:>4} {op:<26} {row['requests']:>7} {row['rps']:>7.1f} {row['p50_ms']:>8.1f} "
              f"{row['p95_ms']:>8.1f} {row['5xx']:>5}  {row['non_2xx'] or '-'}", flush=True)


# --- Workloads -------------------------------------------------------------------------------

def scim_list_step(target: Target) -> Step:
    async def step(n: int, i: int, http: Any, record: Record) -> None:
        headers = target.tenant()
        kind = (n + i) % 3
        if kind == 0:
            email = random.choice(target.members)  # noqa: S311 (load pattern, not security)
            response = await timed(http, record, "GET /Users?filter", "GET", "/scim/v2/Users",
                                   params={"filter": f'userName eq "{email}"'}, headers=headers)
            if response is not None and response.status_code == 200 and response.json()["totalResults"] != 1:
                record("filter found != 1", "wrong", 0.0)
        elif kind == 1:
            start = random.randint(1, len(target.members))  # noqa: S311
            await timed(http, record, "GET /Users?startIndex&count=50", "GET", "/scim/v2/Users",
                        params={"startIndex": start, "count": 50}, headers=headers)
        else:
            await timed(http, record, "GET /Groups", "GET", "/scim/v2/Groups", headers=headers)
    return step


def scim_churn_step(target: Target, level: int, made: dict[str, int]) -> Step:
    async def step(n: int, i: int, http: Any, record: Record) -> None:
        headers = target.tenant(scim=True)
        email = f"churn-l{level}-c{n}-{i}@{MEMBER_DOMAIN}"
        response = await timed(http, record, "POST /Users", "POST", "/scim/v2/Users", headers=headers,
                               json={"schemas": [USER_SCHEMA], "userName": email, "externalId": f"ext-{email}"})
        if response is None or response.status_code != 201:
            return
        made["created"] += 1
        user_id = response.json()["id"]
        response = await timed(http, record, "PATCH /Users/{id} active=false", "PATCH", f"/scim/v2/Users/{user_id}",
                               headers=headers, json={"schemas": [PATCH_SCHEMA], "Operations": [
                                   {"op": "replace", "path": "active", "value": False}]})
        if response is not None and 200 <= response.status_code < 300:
            made["deactivated"] += 1
    return step


def sso_step(target: Target, written: set[str], ok_puts: list[str]) -> Step:
    async def step(n: int, i: int, http: Any, record: Record) -> None:
        headers = target.tenant()
        if i % 2 == 0:
            await timed(http, record, "GET /api/v1/sso", "GET", "/api/v1/sso", headers=headers)
            return
        name = f"IdP c{n} {i} {random.getrandbits(32):08x}"
        written.add(name)
        response = await timed(http, record, "PUT /api/v1/sso", "PUT", "/api/v1/sso", headers=headers, json={
            "display_name": name, "groups_claim": "groups", "role_mapping": {f"group-{n}-{i}": "operator"}})
        if response is not None and response.status_code == 200:
            ok_puts.append(name)
    return step


def metrics_step(target: Target) -> Step:
    async def step(n: int, i: int, http: Any, record: Record) -> None:
        response = await timed(http, record, "GET /metrics", "GET", "/metrics", headers={
            "Host": f"localhost:{target.port}", "Authorization": f"Bearer {os.environ['METRICS_TOKEN']}"})
        if response is not None and response.status_code == 200 and "portal_queue_depth" not in response.text:
            record("metrics without state", "wrong", 0.0)
    return step


def ops_step(target: Target) -> Step:
    async def step(n: int, i: int, http: Any, record: Record) -> None:
        response = await timed(http, record, "GET /admin/ops/", "GET", "/admin/ops/", headers={
            "Host": f"localhost:{target.port}", "Cookie": target.staff_cookie}, follow_redirects=False)
        if response is not None and response.status_code == 200 and "Operations" not in response.text:
            record("ops page without title", "wrong", 0.0)
    return step


# --- Races -----------------------------------------------------------------------------------

async def same_user_race(target: Target, clients: int, email: str, *, key: str, host: str) -> dict[str, int]:
    """``clients`` POST /Users of ``email`` at once to the tenant of ``host``; counts per outcome."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{target.port}", limits=limits, timeout=120) as http:
        # Open every connection first, so the POSTs leave together.
        await asyncio.gather(*(http.get("/healthz") for _ in range(clients)))
        go = asyncio.Event()

        async def post() -> str:
            await go.wait()
            try:
                response = await http.post("/scim/v2/Users", headers=target.tenant(key, host, scim=True),
                                           json={"schemas": [USER_SCHEMA], "userName": email})
            except Exception as exc:  # noqa: BLE001
                return f"error:{type(exc).__name__}"
            if response.status_code == 409:
                return f"409 {response.json().get('scimType')}"
            return str(response.status_code)

        tasks = [asyncio.create_task(post()) for _ in range(clients)]
        await asyncio.sleep(0.05)
        go.set()
        outcomes = await asyncio.gather(*tasks)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


async def sso_first_race(target: Target, clients: int) -> tuple[dict[str, int], list[str]]:
    """``clients`` PUT /api/v1/sso at once on the second tenant (no settings row yet)."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    names = [f"first race {n}" for n in range(clients)]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{target.port}", limits=limits, timeout=120) as http:
        await asyncio.gather(*(http.get("/healthz") for _ in range(clients)))
        go = asyncio.Event()

        async def put(name: str) -> str:
            await go.wait()
            try:
                response = await http.put("/api/v1/sso", headers=target.tenant(target.key_b, target.host_b),
                                          json={"display_name": name})
            except Exception as exc:  # noqa: BLE001
                return f"error:{type(exc).__name__}"
            return str(response.status_code)

        tasks = [asyncio.create_task(put(name)) for name in names]
        await asyncio.sleep(0.05)
        go.set()
        outcomes = await asyncio.gather(*tasks)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts, [name for name, outcome in zip(names, outcomes, strict=True) if outcome == "200"]


# --- Database reads (the bench's own connection) ---------------------------------------------

def memberships_of(tenant: Any, *, email: str | None = None, prefix: str | None = None) -> int:
    from tenants.models import Membership

    rows = Membership.objects.filter(tenant=tenant)
    if email is not None:
        rows = rows.filter(user__email__iexact=email)
    if prefix is not None:
        rows = rows.filter(user__email__startswith=prefix)
    return rows.count()


def sso_audit_events(tenant: Any) -> int:
    from django_tenants.utils import schema_context

    from compliance.models import AuditEvent

    with schema_context(tenant.schema_name):
        return AuditEvent.objects.filter(action="tenant.sso_settings_changed").count()


def sso_display_name(tenant: Any) -> str | None:
    from tenants.models import SsoConfig

    configs = list(SsoConfig.objects.filter(tenant=tenant).values_list("display_name", flat=True))
    return configs[0] if len(configs) == 1 else f"{len(configs)} rows"


# --- Setup -----------------------------------------------------------------------------------

def build(members: int) -> tuple[Any, Any, dict[str, Any]]:
    """The two tenants, their keys, ``members`` SCIM members in the first, the staff session."""
    from django.db import connection
    from django.test import Client
    from django_otp.plugins.otp_totp.models import TOTPDevice

    from tenants.models import Domain, Plan, User
    from tenants.principal import Principal
    from tenants.roles import PERMISSIONS
    from tenants.scim.services import scim_user_create
    from tenants.services.keys import api_key_create
    from tenants.services.provisioning import tenant_create

    system = Principal.system("bench")
    # The first tenant's seats are limited (so every create takes the seat lock) but never reached,
    # the second's are not (creates take no lock); no request rate limit (the load is the point).
    plan = Plan.objects.create(code="bench-identity", name="Bench identity", max_members=100_000)
    a = tenant_create(actor=system, slug="benchid", name="Bench identity", owner_email="owner@bench.example",
                      plan=plan).tenant
    unlimited = Plan.objects.create(code="bench-identity-unlimited", name="Bench identity, unlimited seats")
    b = tenant_create(actor=system, slug="benchid2", name="Bench identity 2", owner_email="owner2@bench.example",
                      plan=unlimited).tenant
    keys = {}
    for tenant in (a, b):
        keys[tenant.pk] = api_key_create(principal=Principal.system("bench", tenant=tenant), tenant=tenant,
                                         name="bench identity", scopes=list(PERMISSIONS)).secret
    started = time.perf_counter()
    emails = []
    provisioner = Principal.system("bench", tenant=a)
    for n in range(members):
        email = f"member{n:04d}@{MEMBER_DOMAIN}"
        scim_user_create(principal=provisioner, tenant=a, user_name=email, external_id=f"ext-{n}")
        emails.append(email)
    print(f"{members} members provisioned in {time.perf_counter() - started:.1f} s (service calls)", flush=True)
    staff = User.objects.create_user(email="staff@bench.example", password=None, is_staff=True, name="Bench staff")
    device = TOTPDevice.objects.create(user=staff, name="bench", confirmed=True)
    client = Client(HTTP_HOST="localhost")
    client.force_login(staff)
    session = client.session
    session["otp_device_id"] = device.persistent_id
    session.save()
    info = {
        "host_a": Domain.objects.get(tenant=a, is_primary=True).domain,
        "host_b": Domain.objects.get(tenant=b, is_primary=True).domain,
        "key_a": keys[a.pk], "key_b": keys[b.pk],
        "staff_cookie": f"sessionid={client.cookies['sessionid'].value}", "members": emails,
    }
    connection.set_schema_to_public()  # type: ignore[attr-defined]  # django-tenants' wrapper
    return a, b, info


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per workload and level")
    parser.add_argument("--levels", default="1,10,50", help="concurrent clients")
    parser.add_argument("--members", type=int, default=200, help="SCIM members in the tenant")
    parser.add_argument("--race-clients", type=int, default=20)
    parser.add_argument("--race-rounds", type=int, default=5, help="same-userName races of each kind")
    parser.add_argument("--workloads", default="scim-list,scim-churn,sso,metrics,ops")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]

    from tests.bench.bench_retrieval import prepare_database

    prepare_database(DATABASE, reuse=False)
    import django

    django.setup()
    import redis
    from django.core.management import call_command
    from django.db import connections

    redis.Redis.from_url(os.environ["REDIS_URL"]).flushdb()  # the bench's own database
    print(f"Preparing {DATABASE} (migrations)...", flush=True)
    call_command("migrate_schemas", interactive=False, verbosity=0)
    tenant_a, tenant_b, info = build(args.members)
    connections.close_all()  # the bench's own connection is not part of what is measured

    log_dir = ROOT / "var" / "bench_identity"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    web = wait_http(start_procfile("web", log_dir / "web.log", port=port, extra_env={"PUBLIC_PORT": str(port)}),
                    port, log_dir / "web.log")
    target = Target(port=port, **info)
    procfile_web = next(x for x in (ROOT / "Procfile").read_text().splitlines() if x.startswith("web:"))
    print(f"web :{port} ({procfile_web}); {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}; "
          f"levels {levels}, {args.duration:g} s each; logs in {log_dir}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    checks: dict[str, Any] = {}
    ok_puts: list[str] = []
    written: set[str] = set()
    try:
        # Warm-up: each worker's connections, caches and imports (not recorded).
        for workload_step in (scim_list_step(target), sso_step(target, set(), []), metrics_step(target),
                              ops_step(target)):
            asyncio.run(run_level(target, 4, 2.0, workload_step))
        sso_puts_before = len(ok_puts)
        audit_before = sso_audit_events(tenant_a)
        print(f"\n   {'workload':<11} {'clients':>4} {'request':<26} {'count':>7} {'req/s':>7} {'p50 ms':>8} "
              f"{'p95 ms':>8} {'5xx':>5}  non-2xx by status", flush=True)
        if "sso" in workloads:
            counts, ok = asyncio.run(sso_first_race(target, args.race_clients))
            final_b = sso_display_name(tenant_b)
            events_b = sso_audit_events(tenant_b)
            checks["sso_first_put_race"] = {"clients": args.race_clients, "outcomes": counts,
                                            "final_is_a_successful_put": final_b in ok, "audit_events": events_b,
                                            "successful_puts": len(ok)}
            connections.close_all()
        for name in workloads:
            results[name] = {}
            for clients in levels:
                made = {"created": 0, "deactivated": 0}
                if name == "scim-list":
                    step = scim_list_step(target)
                elif name == "scim-churn":
                    step = scim_churn_step(target, clients, made)
                elif name == "sso":
                    step = sso_step(target, written, ok_puts)
                elif name == "metrics":
                    step = metrics_step(target)
                else:
                    step = ops_step(target)
                stats, seconds = asyncio.run(run_level(target, clients, args.duration, step))
                summary = level_summary(stats, seconds)
                print_level(name, clients, summary)
                results[name][str(clients)] = summary
                if name == "scim-churn":
                    left = memberships_of(tenant_a, prefix=f"churn-l{clients}-")
                    expected = made["created"] - made["deactivated"]
                    checks.setdefault("churn", {})[str(clients)] = {**made, "memberships_left": left,
                                                                  "expected_left": expected}
                    print(f"      churn at {clients}: {made['created']} created, {made['deactivated']} deactivated, "
                          f"{left} of their memberships left in the database (expected "
                          f"{made['created'] - made['deactivated']})", flush=True)
                    connections.close_all()
        if "scim-churn" in workloads:
            from tenants.models import User

            races = []
            for tenant, key, host, seats in ((tenant_a, target.key_a, target.host_a, "seat limit"),
                                             (tenant_b, target.key_b, target.host_b, "no seat limit")):
                for kind in ("new account", "existing account"):
                    for r in range(args.race_rounds):
                        email = f"race-{tenant.slug}-{kind.split()[0]}-{r}@{MEMBER_DOMAIN}"
                        if kind == "existing account":
                            User.objects.create_user(email=email, password=None)
                        connections.close_all()
                        counts = asyncio.run(same_user_race(target, args.race_clients, email, key=key, host=host))
                        rows = memberships_of(tenant, email=email)
                        races.append({"kind": f"{kind}, {seats}", "email": email, "outcomes": counts,
                                      "memberships": rows})
            checks["same_username_race"] = races
        if "sso" in workloads:
            final_a = sso_display_name(tenant_a)
            events = sso_audit_events(tenant_a) - audit_before
            checks["sso_concurrent_puts"] = {
                "successful_puts": len(ok_puts) - sso_puts_before, "audit_events": events,
                "final_is_a_written_one": final_a in written,
                "final_is_a_successful_put": final_a in ok_puts}
        connections.close_all()
    finally:
        stop(web)
        connections.close_all()

    print("\nCorrectness under concurrency", flush=True)
    if "sso_first_put_race" in checks:
        c = checks["sso_first_put_race"]
        print(f"   SSO, {c['clients']} PUTs at once on a tenant without settings: {c['outcomes']}; final state one "
              f"of the successful PUTs: {c['final_is_a_successful_put']}; audit events {c['audit_events']} for "
              f"{c['successful_puts']} successful changing PUTs", flush=True)
    if "sso_concurrent_puts" in checks:
        c = checks["sso_concurrent_puts"]
        print(f"   SSO, concurrent PUTs over all levels: {c['successful_puts']} successful (each changes the display "
              f"name), {c['audit_events']} audit events; final state one of the written ones: "
              f"{c['final_is_a_written_one']} (one of the successful: {c['final_is_a_successful_put']})", flush=True)
    for race in checks.get("same_username_race", []):
        created = race["outcomes"].get("201", 0)
        verdict = "OK" if created == 1 and race["memberships"] == 1 and \
            race["outcomes"].get("409 uniqueness", 0) == args.race_clients - 1 else "WRONG"
        print(f"   SCIM, {args.race_clients} POST /Users of the same userName ({race['kind']}): {race['outcomes']}; "
              f"memberships in the database: {race['memberships']} -> {verdict}", flush=True)
    fives = sum(row["5xx"] for by_level in results.values() for ops in by_level.values() for row in ops.values())
    print(f"   5xx responses over all workloads: {fives} (target 0)", flush=True)
    config = {"levels": levels, "duration_s": args.duration, "members": args.members, "cpus": os.cpu_count(),
              "web": procfile_web.split(":", 1)[1].strip(), "race_clients": args.race_clients}
    print("SUMMARY " + json.dumps({"config": config, "workloads": results, "checks": checks}), flush=True)


if __name__ == "__main__":
    main()
