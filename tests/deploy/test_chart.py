"""The Helm chart renders, lints and validates, with no helm binary and no cluster.

helm-python-sdk (``helm_python``: Helm's Go SDK through its C ABI) renders every template of
``helm/`` offline and runs Helm's linter; every rendered manifest is checked against the
Kubernetes OpenAPI schemas bundled with kubernetes-validate (strict: unknown fields fail), for the
oldest Kubernetes the chart supports (``kubeVersion`` in Chart.yaml) and a recent one. Custom
resources (ServiceMonitor, PrometheusRule) have no schema there and are checked structurally.

Two value sets: the defaults with only the REQUIRED values set, and helm/values-production.yaml.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm"
RELEASE = "portal"
NAMESPACE = "agents"
# The chart's kubeVersion floor (>=1.25) and a recent release.
KUBE_VERSIONS = ("1.25.0", "1.33.0")
# Custom resources: kubernetes-validate ships schemas for built-in kinds only.
CUSTOM_RESOURCE_GROUPS = ("monitoring.coreos.com/", "keda.sh/")
TIER_QUEUES = ("llm.light", "llm.standard", "llm.heavy", "default")

REQUIRED_VALUES: dict[str, Any] = {
    "config": {
        "publicHost": "portal.example.com",
        "baseDomain": "agents.example.com",
        "redisUrl": "redis://redis.example.internal:6379/0",
        "email": {"host": "smtp.example.internal"},
    },
    "secrets": {
        "values": {
            "SECRET_KEY": "s" * 64,
            "DATABASE_URL": "postgresql://portal:secret@pg.example.internal:5432/portal",
            "FIELD_ENCRYPTION_KEYS": "k" * 44,
            "AUDIT_SIGNING_KEYS": "a" * 48,
            "METRICS_TOKEN": "m" * 32,
        }
    },
}


def production_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values-production.yaml").read_text())
    return values


def render(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text, as ``helm template`` (an install) would produce."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifests_of(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in the rendered templates (NOTES.txt is text, not a manifest)."""
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def with_values(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with keys set; ``config__publicHost`` names ``config.publicHost``.
    A value of None removes the key from ``base`` (so the chart's default applies)."""
    values = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = values
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return values


@pytest.fixture(scope="module", params=["default", "production"])
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = REQUIRED_VALUES if request.param == "default" else production_values()
    return request.param, values, manifests_of(render(values))


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            specs.append((o["metadata"]["name"], o["spec"]))
    return specs


def deployment(objects: list[dict[str, Any]], component: str) -> dict[str, Any]:
    found = [
        d for d in of_kind(objects, "Deployment") if d["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    assert len(found) == 1, f"{len(found)} Deployments of component {component}"
    return found[0]


def test_it_lints_without_errors_or_warnings(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, values, _ = case
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{version}")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert report["errors"] == [] and problems == [], (version, report)
        assert report["total_charts_linted"] == 1


def test_lint_reports_a_template_that_renders_broken_yaml() -> None:
    # Helm's lint mode logs `fail` instead of stopping (refusals are tested through render below),
    # but output that is not YAML is an error.
    report = helm.lint(CHART, with_values(REQUIRED_VALUES, commonLabels="not-a-map"), strict=True)
    assert any(m["severity"] == 3 and "unable to parse YAML" in m["error"] for m in report["messages"])


def test_every_manifest_validates_against_the_kubernetes_schemas(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    name, _, objects = case
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Job", "NetworkPolicy", "PodDisruptionBudget", "ConfigMap", "Service"} <= kinds
    custom = 0
    for obj in objects:
        assert obj["metadata"]["name"].startswith(f"{RELEASE}-"), obj["metadata"]["name"]
        assert len(obj["metadata"]["name"]) <= 63
        if obj["apiVersion"].startswith(CUSTOM_RESOURCE_GROUPS):
            # No schema is bundled for custom resources: check the shape every CR needs.
            custom += 1
            assert set(obj) >= {"apiVersion", "kind", "metadata", "spec"} and isinstance(obj["spec"], dict), obj
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(
                    f"{name}: {obj['kind']} {obj['metadata']['name']} on Kubernetes {version}: {error.message} "
                    f"at {'/'.join(map(str, error.path))}"
                )
    if name == "production":
        assert custom >= 1  # the ServiceMonitor at least


def test_the_migration_hook_job_runs_the_multiprocessing_executor(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, objects = case
    (job,) = of_kind(objects, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"] + container["args"]
    assert command[:4] == ["python", "manage.py", "migrate_schemas", "--noinput"]
    # django-tenants 4.0.1's parallel executor is named "multiprocessing" (no "parallel").
    assert "--executor=multiprocessing" in command
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["TENANT_MULTIPROCESSING_MAX_PROCESSES"] == "2"
    assert env["DATABASE_POOL"] == "false"


def test_each_queue_has_its_own_worker_deployment(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, objects = case
    consumers: dict[str, list[str]] = {}
    for d in of_kind(objects, "Deployment"):
        container = d["spec"]["template"]["spec"]["containers"][0]
        if container["command"] != ["celery"] or "worker" not in container["args"]:
            continue
        args = container["args"]
        queues = args[args.index("-Q") + 1].split(",")
        for queue in queues:
            consumers.setdefault(queue, []).append(d["metadata"]["name"])
        assert len(queues) == 1, f"{d['metadata']['name']} consumes {queues}"
        assert args[args.index("--pool") + 1] == "threads"
    assert sorted(consumers) == sorted(TIER_QUEUES)
    for queue in TIER_QUEUES:
        tier = "default" if queue == "default" else queue.removeprefix("llm.")
        assert consumers[queue] == [f"{RELEASE}-agent-ops-portal-celery-{tier}"]


def test_web_runs_uvicorn_as_the_procfile_does(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, objects = case
    container = deployment(objects, "web")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert container["command"] == ["uvicorn"] and args[0] == "config.asgi:application"
    procfile = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    words = shlex.split(procfile["web"])
    words = words[words.index("uvicorn") + 2 :]  # after "uvicorn config.asgi:application"
    for option in ("--loop", "--http", "--ws"):
        assert args[args.index(option) + 1] == words[words.index(option) + 1]
    assert "--no-access-log" in args
    assert args[args.index("--host") + 1] == "0.0.0.0"  # noqa: S104 (a pod listens on its own address)


def test_network_policies_let_only_the_workers_reach_models_and_the_internet(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    name, values, objects = case
    policies = {
        p["metadata"]["name"].removeprefix(f"{RELEASE}-agent-ops-portal-"): p for p in of_kind(objects, "NetworkPolicy")
    }
    assert {"web", "workers", "internal"} <= set(policies)
    for policy in policies.values():
        if policy["metadata"]["name"].endswith("-llm"):
            continue
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]

    worker_components = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]
        for d in of_kind(objects, "Deployment")
        if d["spec"]["template"]["spec"]["containers"][0]["command"] in (["celery"], ["python"])
        and "beat" not in d["spec"]["template"]["spec"]["containers"][0]["args"]
    }
    (selector,) = policies["workers"]["spec"]["podSelector"]["matchExpressions"]
    assert (
        set(selector["values"])
        == worker_components
        == {f"celery-{t}" for t in ("default", "heavy", "light", "standard")} | {"rq"}
    )

    def ports(rule: dict[str, Any]) -> set[int]:
        return {p["port"] for p in rule.get("ports", [])}

    allowed = {53, 5432, 6379, 6380} | ({4318} if name == "production" else set())
    for policy_name in ("web", "internal"):
        for rule in policies[policy_name]["spec"]["egress"]:
            cidrs = {peer.get("ipBlock", {}).get("cidr") for peer in rule.get("to", [])}
            if name == "production" and policy_name == "web" and cidrs == {"203.0.113.0/24"}:
                continue  # the IdP of OIDC sign-in, given in networkPolicy.web.extraEgress
            assert rule.get("ports") and ports(rule) <= allowed, (policy_name, rule)
            assert "0.0.0.0/0" not in cidrs
    worker_cidrs = {
        peer["ipBlock"]["cidr"]
        for rule in policies["workers"]["spec"]["egress"]
        for peer in rule.get("to", [])
        if "ipBlock" in peer
    }
    assert "0.0.0.0/0" in worker_cidrs
    if name == "production":
        assert "10.30.0.0/24" in worker_cidrs  # the vLLM servers
        for policy_name in ("web", "workers", "internal"):  # traces reach the OTLP collector
            assert any(ports(rule) == {4318} for rule in policies[policy_name]["spec"]["egress"])


def test_disruption_budgets_cover_web_and_every_worker(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, objects = case
    covered = set()
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        matching = [
            d
            for d in of_kind(objects, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, pdb["metadata"]["name"]
        covered.add(matching[0]["metadata"]["labels"]["app.kubernetes.io/component"])
    assert covered == {"web", "rq"} | {f"celery-{t}" for t in ("default", "heavy", "light", "standard")}


def test_no_container_runs_as_root(case: tuple[str, dict[str, Any], list[dict[str, Any]]]) -> None:
    _, _, objects = case
    specs = pod_specs(objects)
    assert len(specs) >= 8
    for name, spec in specs:
        pod = spec.get("securityContext", {})
        for container in spec.get("initContainers", []) + spec["containers"]:
            context = {**pod, **container.get("securityContext", {})}
            assert context.get("runAsNonRoot") is True, (name, container["name"])
            assert context.get("runAsUser", 1) != 0, (name, container["name"])
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, (
                name,
                container["name"],
            )


def test_queue_depth_autoscaling_targets_each_tier_queue() -> None:
    objects = manifests_of(render(production_values()))
    hpas = {h["metadata"]["name"]: h for h in of_kind(objects, "HorizontalPodAutoscaler")}
    heavy = hpas[f"{RELEASE}-agent-ops-portal-celery-heavy"]
    (metric,) = heavy["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "portal_queue_depth"
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"queue": "llm.heavy", "broker": "celery"}
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert heavy["spec"]["scaleTargetRef"]["name"] == f"{RELEASE}-agent-ops-portal-celery-heavy"
    assert f"{RELEASE}-agent-ops-portal-celery-default" not in hpas


def test_production_values_take_secrets_and_services_from_outside() -> None:
    objects = manifests_of(render(production_values()))
    assert of_kind(objects, "Secret") == []  # existingSecret: the chart creates none
    (config,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config")]
    data = config["data"]
    assert data["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability.svc:4318"
    assert data["OTEL_TRACES_EXPORTER"] == "otlp"
    assert "REDIS_URL" not in data and "DATABASE_URL" not in data
    web = deployment(objects, "web")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in web["containers"][0]["env"]}
    assert env["DATABASE_URL_FILE"]["value"] == "/etc/portal/secrets/DATABASE_URL"
    assert env["REDIS_URL_FILE"]["value"] == "/etc/portal/secrets/REDIS_URL"
    (secret_volume,) = [v for v in web["volumes"] if v["name"] == "secrets"]
    assert secret_volume["secret"]["secretName"] == "portal-secrets"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"config__publicHost": None}, "config.publicHost is required"),
        ({"config__baseDomain": ""}, "config.baseDomain is required"),
        ({"secrets__values__DATABASE_URL": ""}, "secrets.values.DATABASE_URL is required"),
        ({"secrets__values__SECRET_KEY": "short"}, "SECRET_KEY must be at least 50 characters"),
        ({"config__redisUrl": ""}, "Set config.redisUrl, or put REDIS_URL in the Secret"),
        # null removes a default tier (Helm merges maps): nothing consumes llm.standard any more.
        ({"celery__tiers": {"standard": None}}, "No celery tier consumes the queue llm.standard"),
        ({"celery__queues": ["llm.light"]}, "celery.queues is gone"),
        ({"migrations__executor": "parallel"}, "migrations.executor must be multiprocessing"),
        ({"databaseConnectionLimit": 20}, "more than databaseConnectionLimit 20"),
        ({"otel__enabled": True}, "otel.endpoint is required"),
    ],
)
def test_it_refuses_to_render_without_required_values(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render(with_values(REQUIRED_VALUES, **changes))
    assert message in str(caught.value)


def test_static_files_are_served_from_where_the_image_collected_them() -> None:
    # collectstatic ran at build time into the image's STATIC_ROOT; var/ is an emptyDir at run time.
    image_static_root = re.search(r"STATIC_ROOT=(\S+)", (ROOT / "Dockerfile").read_text())
    assert image_static_root
    (config,) = [
        o
        for o in of_kind(manifests_of(render(REQUIRED_VALUES)), "ConfigMap")
        if o["metadata"]["name"].endswith("-config")
    ]
    assert config["data"]["STATIC_ROOT"] == image_static_root.group(1)
    assert not config["data"]["STATIC_ROOT"].startswith(config["data"]["PORTAL_VAR_DIR"])


# --- Worker metrics ---------------------------------------------------------------------------

WORKER_COMPONENTS = {f"celery-{t}" for t in ("default", "heavy", "light", "standard")} | {"rq"}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes LabelSelector (matchLabels, matchExpressions In/NotIn) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        value = labels.get(expression["key"])
        if expression["operator"] == "In" and value not in expression["values"]:
            return False
        if expression["operator"] == "NotIn" and value in expression["values"]:
            return False
        assert expression["operator"] in ("In", "NotIn"), expression
    return True


def pod_templates(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Component -> pod template of every Deployment."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]
        for d in of_kind(objects, "Deployment")
    }


def test_worker_containers_serve_their_metrics_on_a_named_port(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, _, objects = case
    templates = pod_templates(objects)
    assert set(templates) >= WORKER_COMPONENTS
    for component, template in templates.items():
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        ports = {p["name"]: p for p in container.get("ports", [])}
        if component in WORKER_COMPONENTS:
            assert env["METRICS_PORT"] == "9100", component
            assert ports["metrics"] == {"name": "metrics", "containerPort": 9100, "protocol": "TCP"}, component
        else:
            # Web keeps /metrics (with METRICS_TOKEN) on its own port; beat serves nothing.
            assert "METRICS_PORT" not in env and "metrics" not in ports, component
    (job,) = of_kind(objects, "Job")
    assert "METRICS_PORT" not in {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    (config,) = [o for o in of_kind(objects, "ConfigMap") if o["metadata"]["name"].endswith("-config")]
    assert "METRICS_PORT" not in config["data"]


def test_a_pod_monitor_scrapes_every_worker_on_its_metrics_port() -> None:
    values = production_values()
    objects = manifests_of(render(values))
    (monitor,) = of_kind(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] == f"{RELEASE}-agent-ops-portal-workers"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"  # the operator's selector
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "30s" and endpoint["scrapeTimeout"] == "10s"
    assert "authorization" not in endpoint and "bearerTokenSecret" not in endpoint
    assert spec["podTargetLabels"] == ["app.kubernetes.io/component"]
    selected = {c for c, t in pod_templates(objects).items() if selects(spec["selector"], t["metadata"]["labels"])}
    assert selected == WORKER_COMPONENTS
    for component in selected:
        (container,) = pod_templates(objects)[component]["spec"]["containers"]
        assert "metrics" in {p["name"] for p in container["ports"]}, component
    # The web pods stay with the ServiceMonitor, which sends the token.
    (service_monitor,) = of_kind(objects, "ServiceMonitor")
    assert service_monitor["spec"]["endpoints"][0]["authorization"]["credentials"]["key"] == "METRICS_TOKEN"


def test_no_pod_monitor_without_the_service_monitor_or_a_worker_port() -> None:
    assert of_kind(manifests_of(render(REQUIRED_VALUES)), "PodMonitor") == []
    objects = manifests_of(render(with_values(production_values(), metrics__workerPort=0)))
    assert of_kind(objects, "PodMonitor") == []
    for component in WORKER_COMPONENTS:
        (container,) = pod_templates(objects)[component]["spec"]["containers"]
        assert "ports" not in container and "METRICS_PORT" not in {e["name"] for e in container["env"]}
    (workers,) = [p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-workers")]
    assert workers["spec"]["ingress"] == []


def test_the_workers_network_policy_admits_only_the_metrics_scrape(
    case: tuple[str, dict[str, Any], list[dict[str, Any]]],
) -> None:
    name, _, objects = case
    (policy,) = [p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-workers")]
    templates = pod_templates(objects)
    assert {c for c, t in templates.items() if selects(policy["spec"]["podSelector"], t["metadata"]["labels"])} == (
        WORKER_COMPONENTS
    )
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 9100}]
    if name == "production":
        # Prometheus' namespace, as for web (networkPolicy.web.ingressFrom).
        assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
        (web,) = [p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"].endswith("-web")]
        assert rule["from"][0] in web["spec"]["ingress"][0]["from"]
    else:
        assert "from" not in rule  # networkPolicy.workers.metricsFrom empty: any peer, on that port only


def test_web_sums_its_uvicorn_processes_through_a_multiprocess_directory() -> None:
    def web_of(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        spec = deployment(manifests_of(render(values)), "web")["spec"]["template"]["spec"]
        return spec, spec["containers"][0]

    spec, container = web_of(REQUIRED_VALUES)  # web.workers 1: one process, its own registry
    assert "PROMETHEUS_MULTIPROC_DIR" not in {e["name"] for e in container["env"]}
    assert "prometheus" not in {v["name"] for v in spec["volumes"]}

    for values in (production_values(), with_values(REQUIRED_VALUES, web__workers=3, databaseConnectionLimit=0)):
        spec, container = web_of(values)
        env = {e["name"]: e.get("value") for e in container["env"]}
        directory = env["PROMETHEUS_MULTIPROC_DIR"]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        # A fresh, writable directory per pod (the root filesystem is read-only).
        assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Mi"}
        assert not mount.get("readOnly")
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"celery__tiers": {"heavy": {"pool": "prefork"}}}, "celery.tiers.heavy.pool prefork with metrics.workerPort"),
        ({"metrics__workerPort": 70000}, "metrics.workerPort must be a TCP port"),
    ],
)
def test_it_refuses_worker_metrics_it_could_not_serve(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render(with_values(REQUIRED_VALUES, **changes))
    assert message in str(caught.value)
    # Without a worker port, a prefork tier renders.
    render(with_values(REQUIRED_VALUES, metrics__workerPort=0, celery__tiers={"heavy": {"pool": "prefork"}}))
