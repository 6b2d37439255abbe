"""manage.py demo_seed: an idempotent development data set.

Creates (or finds) a staff user with a TOTP device, plans, tenant ``demo`` at
``demo.<BASE_DOMAIN>`` with an owner, and an API key; writes the credentials to
``var/demo-credentials`` and the key to ``var/demo-api-key``. Running it again reuses what
exists, so the printed passwords and key stay valid. Development only: refuses to run with
``PORTAL_ENV=production``.

For chat it registers platform model endpoints ``local-smollm2-<tier>`` (light, standard, heavy)
on the embedded model server (``manage.py llm_serve``, the Procfile's ``llm``), builds the
collection "Handbook" in tenant ``demo`` from the fictional company handbook in
``agents/demo_docs/`` (indexed here, synchronously, so the demo answers as soon as the processes
start), and publishes the agent ``helpdesk`` on it.

For tools and approvals it adds the staff egress allow rule for exactly the demo ticket service
(``127.0.0.1:DEMO_TICKETS_PORT``, the Procfile's ``tickets``), the HTTP tools ``list_tickets``
(read) and ``create_ticket`` (write, needs approval) that call it, the active agent ``it-helpdesk``
using them and ``kb_search`` over the handbook, and a member with the ``approver`` role.
``it-helpdesk``'s ``tool_choice`` names ``create_ticket``: the embedded SmolLM2 model calls a tool
reliably only when the call is named (docs/local-model-tools.md).

Existing rows are left as they are: an endpoint, rule, tool or agent edited in the console is not
reset by a second run. The demo API key is replaced only when it lacks one of today's
permissions (a key made before tools and approvals existed).
"""

from __future__ import annotations

import json
import secrets
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django_otp.plugins.otp_totp.models import TOTPDevice
from django_tenants.utils import schema_context

from compliance.services import audit_event_create
from config.errors import NotAuthenticated
from tenants.models import EgressAllowRule, Membership, ModelEndpoint, Plan, Tenant, User
from tenants.principal import Principal
from tenants.roles import PERMISSIONS, Role
from tenants.services.keys import api_key_authenticate, api_key_create, api_key_revoke
from tenants.services.members import invitation_accept, invitation_accept_new_user, invitation_create
from tenants.services.provisioning import public_tenant_ensure, tenant_create

STAFF_EMAIL = "staff@example.com"
OWNER_EMAIL = "owner@example.com"
DEMO_SLUG = "demo"
LOCAL_ENDPOINT_PREFIX = "local-smollm2"
LOCAL_MODEL = "openai/smollm2"  # llm_serve's --model_alias, through litellm's OpenAI provider
LOCAL_CONTEXT_WINDOW = 4096  # llm_serve's --n_ctx
DEMO_DOCS = Path(settings.BASE_DIR) / "agents" / "demo_docs"
HANDBOOK = "Handbook"
HELPDESK_SLUG = "helpdesk"
HELPDESK_PROMPT = (
    "You are the helpdesk of Northwind Robotics. Answer employees' questions from the company "
    "handbook in the reference material, briefly and in plain language, and cite the references "
    "you used as [n]. If the handbook does not answer the question, say so and suggest asking HR."
)
APPROVER_EMAIL = "approver@example.com"
TICKETS_HOST = "127.0.0.1"  # tickets_serve's default --host
IT_HELPDESK_SLUG = "it-helpdesk"
# Short and concrete: SmolLM2-135M fills create_ticket's arguments from this and the message.
IT_HELPDESK_PROMPT = (
    "You are the IT helpdesk of Northwind Robotics. When an employee reports a problem, open a "
    "ticket: the title names the broken device in a few words, the description repeats the "
    "employee's words, the priority is high if they cannot work, otherwise normal. After the "
    "ticket is created, tell the employee its number in one sentence."
)
PRIORITIES = ["low", "normal", "high"]


def ticket_tools(base_url: str) -> dict[str, dict[str, Any]]:
    """The demo's HTTP tools on the ticket service at ``base_url``, as ``Tool`` fields by name."""
    return {
        "list_tickets": {
            "description": "List the IT support tickets, newest last.",
            "kind": "http",
            "method": "GET",
            "url": f"{base_url}/tickets",
            "side_effect": "read",
            "requires_approval": False,
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
        "create_ticket": {
            "description": "Open a new IT support ticket for a problem an employee reports.",
            "kind": "http",
            "method": "POST",
            "url": f"{base_url}/tickets",
            "side_effect": "write",
            "requires_approval": True,
            "parameters": {
                "type": "object",
                "properties": {
                    "title": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": 200,
                        "description": "A few words naming the broken thing",
                    },
                    "description": {
                        "type": "string",
                        "maxLength": 2000,
                        "description": "The problem in the employee's words",
                    },
                    "priority": {
                        "type": "string",
                        "enum": PRIORITIES,
                        "description": "high if the employee cannot work, otherwise normal",
                    },
                },
                "required": ["title", "description", "priority"],
                "additionalProperties": False,
            },
        },
    }


def ticket_tools_ensure(*, principal: Principal, base_url: str) -> None:
    """Creates the tools of ``ticket_tools(base_url)`` that the current tenant schema lacks,
    through ``agents.tool_services.tool_create`` (checked and audited like the console's); tools
    of those names are left as they are. The egress allow rule for ``base_url`` must exist."""
    from agents.models import Tool
    from agents.tool_services import tool_create

    for name, fields in ticket_tools(base_url).items():
        if not Tool.objects.filter(name=name).exists():
            tool_create(principal=principal, name=name, **fields)


def it_helpdesk_create(
    *,
    principal: Principal,
    collection_ids: list[int],
    slug: str = IT_HELPDESK_SLUG,
    config: dict[str, Any] | None = None,
) -> Any:
    """Creates and publishes the demo's ticket-opening agent in the current tenant schema: the
    ``IT_HELPDESK_PROMPT``, ``collection_ids``, the tools ``list_tickets``, ``create_ticket`` and
    ``kb_search`` with ``tool_choice`` ``create_ticket``; ``config`` overrides version fields
    (e.g. ``tier``, ``endpoint_id``). Returns the active ``Agent``. Raises as ``agent_create``."""
    from agents.services import agent_create, agent_version_publish

    fields: dict[str, Any] = {
        "system_prompt": IT_HELPDESK_PROMPT,
        "tier": ModelEndpoint.Tier.STANDARD,
        "collection_ids": collection_ids,
        "retrieval_top_k": 2,
        "history_window": 4,
        "max_output_tokens": 256,
        "temperature": 0.0,
        **(config or {}),
    }
    tools = {"tools": ["list_tickets", "create_ticket", "kb_search"], "tool_choice": "create_ticket"}
    agent = agent_create(
        principal=principal,
        slug=slug,
        name="IT helpdesk",
        description="Opens IT tickets on the demo ticket service; each new ticket needs an approver.",
        config={**fields, **tools},
    )
    return agent_version_publish(principal=principal, version=agent.versions.get())


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o600)


class Command(BaseCommand):
    help = "Create or refresh the development demo data and print how to sign in."

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.DEVELOPMENT:
            raise CommandError("demo_seed is for development only (PORTAL_ENV=development).")
        var = Path(settings.VAR_DIR)
        creds_path = var / "demo-credentials"
        key_path = var / "demo-api-key"
        saved: dict[str, str] = {}
        if creds_path.exists():
            try:
                saved = json.loads(creds_path.read_text(encoding="utf-8"))
            except ValueError:
                saved = {}
        actor = Principal.system("manage.py demo_seed")
        public_tenant_ensure()

        # Demo plans with rate limits (per key or member, per minute) and a monthly token quota,
        # so the headers and the limits show; generous enough for a person clicking around.
        for code, name, fee, members, api, turns, searches, quota in (
            ("free", "Free", "0", 5, 120, 10, 30, 1_000_000),
            ("team", "Team", "99", 50, 600, 30, 120, 50_000_000),
        ):
            plan, _ = Plan.objects.get_or_create(
                code=code, defaults={"name": name, "monthly_fee": Decimal(fee), "max_members": members}
            )
            if plan.api_requests_per_minute is None and plan.monthly_token_quota is None:
                plan.api_requests_per_minute, plan.chat_turns_per_minute = api, turns
                plan.kb_searches_per_minute, plan.monthly_token_quota = searches, quota
                plan.save(update_fields=["api_requests_per_minute", "chat_turns_per_minute",
                                         "kb_searches_per_minute", "monthly_token_quota"])

        staff_password = saved.get("staff_password") or secrets.token_urlsafe(12)
        staff, _ = User.objects.get_or_create(email=STAFF_EMAIL, defaults={"name": "Staff"})
        staff.is_staff = staff.is_superuser = True
        staff.set_password(staff_password)
        staff.save()
        device = TOTPDevice.objects.filter(user=staff, confirmed=True).first()
        if device is None:
            device = TOTPDevice.objects.create(user=staff, name="demo authenticator", confirmed=True)

        tenant = Tenant.objects.filter(slug=DEMO_SLUG).first()
        if tenant is None:
            tenant = tenant_create(
                actor=actor,
                slug=DEMO_SLUG,
                name="Demo Company",
                owner_email=OWNER_EMAIL,
                plan=Plan.objects.get(code="team"),
            ).tenant
        owner = User.objects.get(email=OWNER_EMAIL)
        owner_password = saved.get("owner_password") or secrets.token_urlsafe(12)
        owner.name = owner.name or "Demo Owner"
        owner.set_password(owner_password)
        owner.save()
        from allauth.account.models import EmailAddress

        for user in (staff, owner):
            EmailAddress.objects.update_or_create(
                user=user, email=user.email, defaults={"verified": True, "primary": True}
            )

        endpoints = self._local_endpoints()
        agent_summary = self._helpdesk(tenant)
        tickets_url = f"http://{TICKETS_HOST}:{settings.DEMO_TICKETS_PORT}"
        self._tickets_egress_rule()
        it_summary = self._it_helpdesk(tenant, tickets_url)
        approver_password = saved.get("approver_password") or secrets.token_urlsafe(12)
        self._approver(tenant, approver_password)
        invoice_summary = self._previous_month_usage(tenant)

        api_key = key_path.read_text(encoding="utf-8").strip() if key_path.exists() else ""
        key_principal = Principal.system("demo_seed", tenant=tenant)
        try:
            key = api_key_authenticate(raw_key=api_key, tenant=tenant)
        except NotAuthenticated:
            key = None
        if key is not None and not set(PERMISSIONS) <= set(key.scopes):
            # A key from before tools and approvals existed: replace it with one holding every scope.
            api_key_revoke(principal=key_principal, key=key)
            key = None
        if key is None:
            api_key = api_key_create(
                principal=key_principal, tenant=tenant, name="demo key", scopes=list(PERMISSIONS), acting_user=owner
            ).secret
            _write_private(key_path, api_key + "\n")

        port = f":{settings.PUBLIC_PORT}" if settings.PUBLIC_PORT else ""
        creds = {
            "console_url": f"http://{tenant.primary_host}{port}/",
            "owner_email": OWNER_EMAIL,
            "owner_password": owner_password,
            "staff_url": f"http://{settings.PUBLIC_HOST}{port}/admin/",
            "staff_email": STAFF_EMAIL,
            "staff_password": staff_password,
            "staff_totp_uri": device.config_url,
            "api_key_file": str(key_path),
            "agents_url": f"http://{tenant.primary_host}{port}/agents/",
            "chat_url": f"http://{tenant.primary_host}{port}/chat/",
            "helpdesk_agent": HELPDESK_SLUG,
            "approver_email": APPROVER_EMAIL,
            "approver_password": approver_password,
            "approvals_url": f"http://{tenant.primary_host}{port}/approvals/",
            "it_helpdesk_agent": IT_HELPDESK_SLUG,
            "tickets_url": f"{tickets_url}/tickets",
        }
        _write_private(creds_path, json.dumps(creds, indent=2) + "\n")
        out = self.stdout.write
        out(self.style.SUCCESS("Demo data ready (development only). Also in var/demo-credentials:"))
        out(f"  Console     {creds['console_url']}")
        out(f"    owner     {OWNER_EMAIL} / {owner_password}")
        out(f"  Staff admin {creds['staff_url']}")
        out(f"    staff     {STAFF_EMAIL} / {staff_password}")
        out(f"    TOTP      {device.config_url}")
        out("              (add it to an authenticator app; `make totp` prints the current code)")
        out(f"  API key     in {key_path}:")
        out(
            f"    curl -H 'Host: {tenant.primary_host}' -H \"Authorization: Bearer $(cat {key_path})\" "
            f"http://127.0.0.1{port}/api/v1/me"
        )
        out(f"  Agent       {creds['agents_url']}  ({HELPDESK_SLUG}: {agent_summary})")
        out(f"  Chat        {creds['chat_url']}  (pick '{HELPDESK_SLUG}'; ask \"How many vacation days do I get?\")")
        out(
            f"  Model       {', '.join(endpoints)} -> {LOCAL_MODEL} at {self._local_api_base()} "
            "(the Procfile's llm process)"
        )
        out(f"  Tools       {IT_HELPDESK_SLUG}: {it_summary}")
        out(
            f"    ask       pick '{IT_HELPDESK_SLUG}' in the chat as the owner; say \"Open a ticket: my laptop "
            'screen is broken"'
        )
        out(f"    approver  {creds['approvals_url']}  {APPROVER_EMAIL} / {approver_password}")
        out(f"    tickets   curl {creds['tickets_url']}  (the Procfile's tickets process)")
        out(f"  Invoices    http://{tenant.primary_host}{port}/invoices/  ({invoice_summary})")

    @staticmethod
    def _previous_month_usage(tenant: Tenant) -> str:
        """A few usage events dated in the previous month (tenant's timezone), so that last month's
        invoice can be drafted and finalized from a fresh clone. Only when that month has none:
        usage events are append-only, so a second run must not add more."""
        import datetime as dt

        from django.utils import timezone

        from agents.models import Agent
        from billing.models import UsageEvent
        from billing.periods import month_before, month_bounds
        from billing.services import usage_event_values

        period = month_before(timezone.now(), tenant.time_zone)
        start, end = month_bounds(period, tenant.time_zone)
        with schema_context(tenant.schema_name), transaction.atomic():
            if UsageEvent.objects.filter(created_at__gte=start, created_at__lt=end).exists():
                return f"{period} already has usage events"
            agents = dict(Agent.objects.filter(slug__in=[HELPDESK_SLUG, IT_HELPDESK_SLUG]).values_list("slug", "id"))
            endpoint = {"endpoint": f"{LOCAL_ENDPOINT_PREFIX}-standard"}
            rows = []
            for day in range(3, 28, 4):
                at = start + dt.timedelta(days=day, hours=10)
                for slug in (HELPDESK_SLUG, IT_HELPDESK_SLUG):
                    common: dict[str, Any] = {
                        "model": LOCAL_MODEL,
                        "agent_id": agents.get(slug),
                        "user_id": None,
                        "api_key_id": "",
                        "metadata": endpoint,
                    }
                    rows.append(
                        {
                            **usage_event_values(
                                kind="llm.input_tokens",
                                quantity=1800 + 37 * day,
                                unit_price=Decimal("0.000000150000"),
                                **common,
                            ),
                            "created_at": at,
                        }
                    )
                    rows.append(
                        {
                            **usage_event_values(
                                kind="llm.output_tokens",
                                quantity=240 + 11 * day,
                                unit_price=Decimal("0.000000600000"),
                                **common,
                            ),
                            "created_at": at + dt.timedelta(seconds=4),
                        }
                    )
                rows.append(
                    {
                        **usage_event_values(
                            kind="kb.query",
                            quantity=1,
                            agent_id=agents.get(HELPDESK_SLUG),
                            unit_price=Decimal("0.000100000000"),
                            user_id=None,
                            api_key_id="",
                        ),
                        "created_at": at + dt.timedelta(seconds=1),
                    }
                )
                rows.append(
                    {
                        **usage_event_values(
                            kind="tool.call",
                            quantity=1,
                            agent_id=agents.get(IT_HELPDESK_SLUG),
                            unit_price=Decimal("0.001000000000"),
                            user_id=None,
                            api_key_id="",
                        ),
                        "created_at": at + dt.timedelta(seconds=2),
                    }
                )
            UsageEvent.objects.bulk_create([UsageEvent(**row) for row in rows])
        return f"{len(rows)} usage events in {period}: draft and finalize {period}'s invoice"

    @staticmethod
    def _local_api_base() -> str:
        return f"http://{settings.LOCAL_LLM_HOST}:{settings.LOCAL_LLM_PORT}/v1"

    def _local_endpoints(self) -> list[str]:
        """Platform endpoints of every tier on the embedded model server (free: it runs here)."""
        names = []
        for tier in ModelEndpoint.Tier.values:
            name = f"{LOCAL_ENDPOINT_PREFIX}-{tier}"
            # get_or_create: a second run keeps the row, including edits made on the staff pages.
            ModelEndpoint.objects.get_or_create(
                tenant=None,
                name=name,
                defaults={
                    "model": LOCAL_MODEL,
                    "api_base": self._local_api_base(),
                    "tier": tier,
                    "context_window": LOCAL_CONTEXT_WINDOW,
                    "input_price_per_mtok": Decimal(0),
                    "output_price_per_mtok": Decimal(0),
                    "timeout_seconds": 60.0,
                },
            )
            names.append(name)
        return names

    def _helpdesk(self, tenant: Tenant) -> str:
        """The "Handbook" collection (indexed) and the published ``helpdesk`` agent in ``tenant``;
        returns a one-line summary for the output."""
        from agents.models import Agent
        from agents.services import agent_create, agent_version_publish
        from knowledge.ingestion import ingest_documents
        from knowledge.models import Collection, Document
        from knowledge.services import collection_create, document_upload

        actor = Principal.system("manage.py demo_seed", tenant=tenant)
        with schema_context(tenant.schema_name):
            collection = Collection.objects.filter(name__iexact=HANDBOOK).first() or collection_create(
                principal=actor,
                name=HANDBOOK,
                description="Employee handbook of Northwind Robotics, a fictional company (agents/demo_docs/).",
            )
            for path in sorted(p for p in DEMO_DOCS.iterdir() if p.suffix in (".md", ".pdf")):
                # The same bytes are recognised by their SHA-256 and not stored twice.
                document_upload(
                    principal=actor, collection=collection, filename=path.name, data=path.read_bytes(), queue=False
                )
            # Index whatever is not yet indexed, including documents a crashed run left pending.
            waiting = list(
                Document.objects.filter(collection=collection)
                .exclude(status=Document.Status.INDEXED)
                .values_list("pk", flat=True)
            )
            if waiting:
                report = ingest_documents(waiting)
                self.stdout.write(
                    f"Indexed {report.indexed} handbook document(s) ({report.chunks} chunks), {report.failed} failed"
                )
            agent = Agent.objects.filter(slug=HELPDESK_SLUG).first()
            if agent is None:
                agent = agent_create(
                    principal=actor,
                    slug=HELPDESK_SLUG,
                    name="Helpdesk",
                    description="Answers questions about the Northwind Robotics handbook, with citations.",
                    config={
                        "system_prompt": HELPDESK_PROMPT,
                        "tier": ModelEndpoint.Tier.LIGHT,
                        "collection_ids": [collection.pk],
                        "retrieval_top_k": 4,
                        "history_window": 6,
                        "max_output_tokens": 256,
                        "temperature": 0.2,
                    },
                )
            if agent.active_version_id is None and agent.status == Agent.Status.DRAFT:
                agent = agent_version_publish(principal=actor, version=agent.versions.order_by("-number")[0])
            indexed = Document.objects.filter(collection=collection, status=Document.Status.INDEXED).count()
            return f"{agent.status}, collection {HANDBOOK} with {indexed} indexed document(s)"

    def _tickets_egress_rule(self) -> None:
        """The staff egress allow rule for exactly the demo ticket service (host and port), made
        once and audited in the public chain as staff changes are."""
        port = settings.DEMO_TICKETS_PORT
        with transaction.atomic():
            if EgressAllowRule.objects.filter(target=TICKETS_HOST, port=port).exists():
                return
            rule = EgressAllowRule.objects.create(
                target=TICKETS_HOST,
                port=port,
                description="The demo ticket service (manage.py tickets_serve) for the demo agent's HTTP tools.",
            )
            audit_event_create(
                actor=Principal.system("manage.py demo_seed"),
                action="egress_allow_rule.created",
                target_type="egress_allow_rule",
                target_id=rule.pk,
                payload={"target": rule.target, "port": rule.port, "description": rule.description},
                schema="public",
            )

    def _it_helpdesk(self, tenant: Tenant, tickets_url: str) -> str:
        """The tools ``list_tickets`` and ``create_ticket`` and the published agent ``it-helpdesk``
        in ``tenant``; returns a one-line summary for the output."""
        from agents.models import Agent
        from agents.services import agent_version_publish
        from knowledge.models import Collection

        actor = Principal.system("manage.py demo_seed", tenant=tenant)
        with schema_context(tenant.schema_name), transaction.atomic():
            ticket_tools_ensure(principal=actor, base_url=tickets_url)
            agent = Agent.objects.filter(slug=IT_HELPDESK_SLUG).first()
            if agent is None:
                collection = Collection.objects.get(name__iexact=HANDBOOK)
                agent = it_helpdesk_create(principal=actor, collection_ids=[collection.pk])
            elif agent.active_version_id is None and agent.status == Agent.Status.DRAFT:
                agent = agent_version_publish(principal=actor, version=agent.versions.order_by("-number")[0])
            version = agent.active_version or agent.versions.order_by("-number")[0]
            return (
                f"{agent.status}, tools {', '.join(version.tools)}, tool_choice {version.tool_choice}; "
                f"tickets at {tickets_url}"
            )

    def _approver(self, tenant: Tenant, password: str) -> None:
        """A member of ``tenant`` with the ``approver`` role (invited and joined through the
        membership services, so it is audited); the password is (re)set to ``password``."""
        user = User.objects.filter(email=APPROVER_EMAIL).first()
        if user is None or not Membership.objects.filter(tenant=tenant, user=user).exists():
            actor = Principal.system("manage.py demo_seed", tenant=tenant)
            issued = invitation_create(principal=actor, tenant=tenant, email=APPROVER_EMAIL, role=Role.APPROVER)
            if user is None:
                invitation_accept_new_user(tenant=tenant, token=issued.token, name="Demo Approver", password=password)
            else:
                invitation_accept(tenant=tenant, token=issued.token, user=user)
        user = User.objects.get(email=APPROVER_EMAIL)
        user.set_password(password)
        user.save()
        from allauth.account.models import EmailAddress

        EmailAddress.objects.update_or_create(user=user, email=user.email, defaults={"verified": True, "primary": True})
