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
start), and publishes the agent ``helpdesk`` on it. Existing rows are left as they are: an
endpoint or agent edited in the console is not reset by a second run.
"""

from __future__ import annotations

import json
import secrets
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django_otp.plugins.otp_totp.models import TOTPDevice
from django_tenants.utils import schema_context

from config.errors import NotAuthenticated
from tenants.models import ModelEndpoint, Plan, Tenant, User
from tenants.principal import Principal
from tenants.roles import PERMISSIONS
from tenants.services.keys import api_key_authenticate, api_key_create
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

        for code, name, fee, members in (("free", "Free", "0", 5), ("team", "Team", "99", 50)):
            Plan.objects.get_or_create(code=code, defaults={"name": name, "monthly_fee": Decimal(fee),
                                                            "max_members": members})

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
            tenant = tenant_create(actor=actor, slug=DEMO_SLUG, name="Demo Company", owner_email=OWNER_EMAIL,
                                   plan=Plan.objects.get(code="team")).tenant
        owner = User.objects.get(email=OWNER_EMAIL)
        owner_password = saved.get("owner_password") or secrets.token_urlsafe(12)
        owner.name = owner.name or "Demo Owner"
        owner.set_password(owner_password)
        owner.save()
        from allauth.account.models import EmailAddress

        for user in (staff, owner):
            EmailAddress.objects.update_or_create(user=user, email=user.email,
                                                  defaults={"verified": True, "primary": True})

        endpoints = self._local_endpoints()
        agent_summary = self._helpdesk(tenant)

        api_key = key_path.read_text(encoding="utf-8").strip() if key_path.exists() else ""
        try:
            api_key_authenticate(raw_key=api_key, tenant=tenant)
        except NotAuthenticated:
            api_key = api_key_create(principal=Principal.system("demo_seed", tenant=tenant), tenant=tenant,
                                     name="demo key", scopes=list(PERMISSIONS), acting_user=owner).secret
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
        out(f"    curl -H 'Host: {tenant.primary_host}' -H \"Authorization: Bearer $(cat {key_path})\" "
            f"http://127.0.0.1{port}/api/v1/me")
        out(f"  Agent       {creds['agents_url']}  ({HELPDESK_SLUG}: {agent_summary})")
        out(f"  Chat        {creds['chat_url']}  (pick '{HELPDESK_SLUG}'; ask \"How many vacation days do I get?\")")
        out(f"  Model       {', '.join(endpoints)} -> {LOCAL_MODEL} at {self._local_api_base()} "
            "(the Procfile's llm process)")

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
                tenant=None, name=name,
                defaults={"model": LOCAL_MODEL, "api_base": self._local_api_base(), "tier": tier,
                          "context_window": LOCAL_CONTEXT_WINDOW, "input_price_per_mtok": Decimal(0),
                          "output_price_per_mtok": Decimal(0), "timeout_seconds": 60.0},
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
                principal=actor, name=HANDBOOK,
                description="Employee handbook of Northwind Robotics, a fictional company (agents/demo_docs/).")
            for path in sorted(p for p in DEMO_DOCS.iterdir() if p.suffix in (".md", ".pdf")):
                # The same bytes are recognised by their SHA-256 and not stored twice.
                document_upload(principal=actor, collection=collection, filename=path.name,
                                data=path.read_bytes(), queue=False)
            # Index whatever is not yet indexed, including documents a crashed run left pending.
            waiting = list(Document.objects.filter(collection=collection)
                           .exclude(status=Document.Status.INDEXED).values_list("pk", flat=True))
            if waiting:
                report = ingest_documents(waiting)
                self.stdout.write(f"Indexed {report.indexed} handbook document(s) ({report.chunks} chunks), "
                                  f"{report.failed} failed")
            agent = Agent.objects.filter(slug=HELPDESK_SLUG).first()
            if agent is None:
                agent = agent_create(
                    principal=actor, slug=HELPDESK_SLUG, name="Helpdesk",
                    description="Answers questions about the Northwind Robotics handbook, with citations.",
                    config={"system_prompt": HELPDESK_PROMPT, "tier": ModelEndpoint.Tier.LIGHT,
                            "collection_ids": [collection.pk], "retrieval_top_k": 4, "history_window": 6,
                            "max_output_tokens": 256, "temperature": 0.2})
            if agent.active_version_id is None and agent.status == Agent.Status.DRAFT:
                agent = agent_version_publish(principal=actor, version=agent.versions.order_by("-number")[0])
            indexed = Document.objects.filter(collection=collection, status=Document.Status.INDEXED).count()
            return f"{agent.status}, collection {HANDBOOK} with {indexed} indexed document(s)"
