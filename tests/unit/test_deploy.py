"""Offline validation of deploy/: manifests parse, carry what production needs, and only use
settings and metrics that exist (a renamed setting or metric must break this test, not an
alert in production)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker import metrics
from worker.config import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
METRIC_RE = re.compile(r"\bmetering_[a-z0-9_]+\b")
ENV_RE = re.compile(r"\bMETERING_[A-Z0-9_]+\b")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_k8s() -> dict[str, dict[str, Any]]:
    """``{"Kind/name": manifest}`` of every document under deploy/k8s."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "Kustomization":
                continue
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def _settings_fields() -> set[str]:
    return set(Settings.model_fields)


def _deployment() -> dict[str, Any]:
    return _all_k8s()["Deployment/credit-metering"]


def _worker_container() -> dict[str, Any]:
    containers = _deployment()["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "worker")


def _alert_rules() -> list[dict[str, Any]]:
    (doc,) = _docs(DEPLOY / "prometheus-rules.yaml")
    return [r for g in doc["spec"]["groups"] for r in g["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    return exprs


def test_every_manifest_parses_with_kind_name_and_namespace() -> None:
    manifests = _all_k8s()
    for required in (
        "Deployment/credit-metering",
        "ConfigMap/credit-metering",
        "Secret/credit-metering",
        "PodDisruptionBudget/credit-metering",
        "ScaledObject/credit-metering",
        "Service/credit-metering",
    ):
        assert required in manifests, f"missing {required}"
    for key, doc in manifests.items():
        assert doc.get("apiVersion"), key
        assert doc["metadata"].get("namespace") == "metering", key


def test_kustomization_lists_existing_files() -> None:
    (kustomization,) = _docs(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource


def test_deployment_has_probes_resources_and_runs_as_non_root() -> None:
    pod = _deployment()["spec"]["template"]["spec"]
    container = _worker_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # The HTTP port the probes hit is the one the worker listens on.
    config = _all_k8s()["ConfigMap/credit-metering"]["data"]
    assert int(config["METERING_HTTP_PORT"]) == port_names["http"]
    assert config["METERING_HTTP_HOST"] == "0.0.0.0"


def test_kubelet_waits_longer_than_the_worker_shutdown_grace() -> None:
    config = _all_k8s()["ConfigMap/credit-metering"]["data"]
    grace = float(config["METERING_SHUTDOWN_GRACE_SECONDS"])
    assert _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace + 5


def test_pdb_and_autoscaler_target_the_worker() -> None:
    manifests = _all_k8s()
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    pdb = manifests["PodDisruptionBudget/credit-metering"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    scaled = manifests["ScaledObject/credit-metering"]["spec"]
    assert scaled["scaleTargetRef"]["name"] == "credit-metering"
    # More consumers than partitions sit idle.
    partitions = int(manifests["ConfigMap/credit-metering"]["data"]["METERING_TOPIC_PARTITIONS"])
    assert scaled["minReplicaCount"] >= 1
    assert scaled["maxReplicaCount"] <= partitions
    assert any("metering_consumer_lag" in str(t) for t in scaled["triggers"])


def test_every_metering_env_var_is_a_real_setting() -> None:
    fields = _settings_fields()
    seen: set[str] = set()
    for path in [*K8S.glob("*.yaml"), DEPLOY / "prometheus-rules.yaml"]:
        for name in ENV_RE.findall(path.read_text()):
            seen.add(name)
            assert name.removeprefix("METERING_").lower() in fields, f"{path.name}: {name}"
    assert "METERING_REDIS_URL" in seen  # the check above really looked at the manifests


def test_secrets_live_in_the_secret_not_the_configmap() -> None:
    manifests = _all_k8s()
    secret_fields = {
        name
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    }
    config_keys = {
        k.removeprefix("METERING_").lower() for k in manifests["ConfigMap/credit-metering"]["data"]
    }
    secret_keys = {
        k.removeprefix("METERING_").lower()
        for k in manifests["Secret/credit-metering"]["stringData"]
    }
    assert not (config_keys & secret_fields)
    assert {"redis_url", "postgres_dsn", "api_tokens", "kafka_sasl_password"} <= secret_keys
    # Every value both sources set must also validate as Settings.
    env = {
        **manifests["ConfigMap/credit-metering"]["data"],
        **manifests["Secret/credit-metering"]["stringData"],
    }
    Settings(**{k.removeprefix("METERING_").lower(): v for k, v in env.items()})


def test_alerts_required_by_operations_exist() -> None:
    alerts = {r["alert"]: r for r in _alert_rules() if "alert" in r}
    for name in (
        "MeteringWorkerDown",
        "MeteringConsumerLagGrowing",
        "MeteringDeadLetterRate",
        "MeteringRefillFailures",
        "MeteringRedisRebuild",
    ):
        assert name in alerts, name
        assert alerts[name]["labels"]["severity"] in ("warning", "critical")
        assert alerts[name]["annotations"]["summary"]
    assert alerts["MeteringConsumerLagGrowing"]["for"] == "5m"


@pytest.mark.parametrize(
    "source", ["alerts", "dashboard", "autoscaler"], ids=["alerts", "dashboard", "autoscaler"]
)
def test_every_metric_used_is_exported_by_the_worker(source: str) -> None:
    if source == "alerts":
        exprs = [r["expr"] for r in _alert_rules()]
    elif source == "dashboard":
        exprs = _dashboard_exprs()
    else:
        scaled = _all_k8s()["ScaledObject/credit-metering"]["spec"]
        exprs = [t["metadata"]["query"] for t in scaled["triggers"]]
    exported = metrics.exported_names()
    used = {name for expr in exprs for name in METRIC_RE.findall(expr)}
    assert used, f"no metering_* metric found in {source}"
    unknown = sorted(used - exported)
    assert not unknown, f"{source} uses metrics the worker does not export: {unknown}"


def test_metric_check_catches_a_misspelt_name() -> None:
    assert "metering_consumer_lag" in metrics.exported_names()
    assert "metering_events_total" in metrics.exported_names()
    assert "metering_consumer_lags" not in metrics.exported_names()


def test_dashboard_panels_have_unique_ids_and_a_datasource() -> None:
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["title"]
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["type"] == "prometheus"


def test_every_runbook_link_points_at_a_section_of_the_operations_guide() -> None:
    guide = (DEPLOY.parent / "docs" / "operations.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in guide.splitlines()
        if line.startswith("#")
    }
    links = [r["annotations"]["runbook"] for r in _alert_rules() if "alert" in r]
    assert links
    for link in links:
        path, _, anchor = link.partition("#")
        assert path == "docs/operations.md"
        assert anchor in anchors, link


def test_pods_run_as_the_image_user_and_a_real_command() -> None:
    from worker.cli import build_parser

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    match = re.search(r"^USER\s+(\d+)", dockerfile, re.M)
    assert match, "deploy/Dockerfile sets no numeric USER"
    uid = int(match.group(1))
    manifests = _all_k8s()
    for key in ("Deployment/credit-metering", "Job/credit-metering-migrate"):
        pod = manifests[key]["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == uid, key
        for container in pod["containers"]:
            # The image's entrypoint is `metering`: args must be a command it knows.
            build_parser().parse_args(container["args"])
