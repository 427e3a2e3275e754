"""deploy/ checked offline: Kubernetes schemas, kustomize builds, alert rules, the dashboard's metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import psycopg
import pytest
import yaml

from tests.conftest import REPO_ROOT, WorkerProcess, create_analysis, submit, wait_for_jobs

DEPLOY = REPO_ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) is not installed")
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) is not installed"
)


def kustomize(path: Path) -> list[dict[str, Any]]:
    built = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in docs}


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@needs_kubectl
@pytest.mark.parametrize("target", ["kubernetes/base", "kubernetes/overlays/example"])
def test_kustomize_output_builds_and_validates_against_kubernetes_schemas(target: str) -> None:
    docs = kustomize(DEPLOY / target)
    for doc in docs:
        if doc["kind"] not in CUSTOM_KINDS:
            validate(doc)
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    if target.endswith("example"):
        assert kinds >= CUSTOM_KINDS
        assert {doc["metadata"].get("namespace") for doc in docs} == {"analytics"}


def test_every_manifest_file_validates() -> None:
    for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") not in CUSTOM_KINDS | {"Kustomization", "Component"}:
                validate(doc)


@needs_kubectl
def test_deployment_follows_the_operating_rules() -> None:
    docs = by_kind(kustomize(DEPLOY / "kubernetes/base"))
    deployment, config = docs["Deployment"], docs["ConfigMap"]["data"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (worker,) = pod["containers"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert pod["terminationGracePeriodSeconds"] > int(config["SHUTDOWN_GRACE_SECONDS"])
    assert worker["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert worker["ports"][0]["containerPort"] == int(config["ANALYSIS_EXECUTOR_PORT"]) == 8002
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in [*pod["containers"], *pod["initContainers"]]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"requests", "limits"} <= container["resources"].keys()
    assert pod["initContainers"][0]["args"] == ["migrate"]
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"
    assert docs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    ingress = docs["NetworkPolicy"]["spec"]["ingress"]
    assert [port["port"] for rule in ingress for port in rule["ports"]] == [8002]
    # Selectors all match the pods.
    labels = spec["template"]["metadata"]["labels"]
    for selector in (
        docs["Service"]["spec"]["selector"],
        docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()


def test_secret_example_holds_no_real_secret() -> None:
    (secret,) = yaml.safe_load_all((DEPLOY / "kubernetes/base/secret.example.yaml").read_text())
    validate(secret)
    assert "CHANGE-ME" in secret["stringData"]["DATABASE_URL"]
    kustomization = yaml.safe_load((DEPLOY / "kubernetes/base/kustomization.yaml").read_text())
    assert "secret.example.yaml" not in kustomization["resources"]


def test_dockerfile_is_multi_stage_non_root_with_the_cli_as_entrypoint() -> None:
    text = (DEPLOY / "docker/Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2
    assert "slim" in text
    assert re.search(r"^USER 10001", text, re.MULTILINE)
    assert re.search(r"^EXPOSE 8002$", text, re.MULTILINE)
    assert 'ENTRYPOINT ["analysis-executor"]' in text
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert "pip install" not in final_stage and "gcc" not in final_stage
    assert "rm -f /opt/venv/lib/python3.*/site-packages/cmeel.pth" in text  # see test_allocator
    ignored = [line for line in (REPO_ROOT / ".dockerignore").read_text().split("\n") if line and line[0] != "#"]
    assert ignored[0] == "*" and "!worker/" in ignored and "!migrations/" in ignored


@needs_promtool
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    for command in (["check", "rules", "alerts.yaml"], ["test", "rules", "alerts.test.yaml"]):
        result = subprocess.run(
            ["promtool", *command], cwd=DEPLOY / "prometheus", capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


@needs_kubectl
def test_example_overlay_labels_what_kube_prometheus_stack_selects() -> None:
    monitoring = [d for d in kustomize(DEPLOY / "kubernetes/overlays/example") if "monitoring" in d["apiVersion"]]
    assert {d["kind"] for d in monitoring} == {"ServiceMonitor", "PrometheusRule"}
    assert all(d["metadata"]["labels"]["release"] == "kube-prometheus-stack" for d in monitoring)


def test_prometheus_operator_rule_is_the_same_as_alerts_yaml() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())
    crd = yaml.safe_load((DEPLOY / "kubernetes/components/prometheus-operator/prometheusrule.yaml").read_text())
    assert crd["spec"]["groups"] == rules["groups"]


def test_alerts_cover_the_documented_conditions() -> None:
    names = {
        r["alert"]
        for g in yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())["groups"]
        for r in g["rules"]
    }
    assert names == {
        "AnalysisExecutorNoWorkerUp",
        "AnalysisExecutorOldestPendingJobTooOld",
        "AnalysisExecutorHighFailureRatio",
        "AnalysisExecutorManyRetries",
        "AnalysisExecutorReplicasDown",
        "AnalysisExecutorPoolSaturated",
        "AnalysisExecutorDatabaseErrors",
        "AnalysisExecutorScrapeTargetDown",
        "AnalysisExecutorPoolChildCrashLoop",
        "AnalysisExecutorListenerDisconnected",
        "AnalysisExecutorSchedulePaused",
    }
    readme = (DEPLOY / "README.md").read_text()
    for name in names:
        assert name in readme, f"deploy/README.md does not explain {name}"


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana/analysis-executor.json").read_text())


def promql_targets(board: dict[str, Any]) -> list[str]:
    """The PromQL of every panel (the per-analysis table is SQL, on a PostgreSQL datasource)."""
    return [t["expr"] for p in board["panels"] for t in p.get("targets", []) if "expr" in t]


def sql_targets(board: dict[str, Any]) -> list[str]:
    return [t["rawSql"] for p in board["panels"] for t in p.get("targets", []) if "rawSql" in t]


def test_dashboard_has_the_panels_and_variables_operators_need() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert all(variables[name]["type"] == "query" for name in ("namespace", "job", "instance"))
    selector = 'namespace=~"$namespace",job=~"$job",instance=~"$instance"'
    unfiltered = [expr for expr in promql_targets(board) if selector not in expr]
    assert unfiltered == [], "every panel filters by the environment and pod"
    titles = {p["title"] for p in board["panels"]}
    for wanted in (
        "Queue depth by status",
        "Age of the oldest pending job",
        "Claim rate by runtime",
        "Completion rate by status",
        "Failure ratio",
        "Job duration percentiles",
        "Queue wait percentiles",
        "Jobs in flight vs pool size per pod",
        "Wake-ups by source",
        "Database errors by operation",
        "Live workers",
        "Schedule lag percentiles",
        "Scheduled jobs enqueued",
        "Schedule skips by reason",
        "Stored result bytes",
        "Dependency query duration percentiles",
        "Dependency queries and failures",
    ):
        assert wanted in titles
    quantiles = [expr for expr in promql_targets(board) if "histogram_quantile" in expr]
    assert len(quantiles) >= 9
    assert all("_bucket{" in q and "sum by (le" in q for q in quantiles), "quantiles need summed buckets by le"


def test_the_per_analysis_table_query_runs_on_the_job_table(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    start_worker()
    good = create_analysis(db, script="export default function analyze() { return 1; }")
    bad = create_analysis(db, script="export default function analyze() { throw new Error('broken'); }")
    wait_for_jobs(db, [submit(db, good), submit(db, bad), submit(db, bad)])
    (sql,) = sql_targets(dashboard())
    # Grafana's macro for the dashboard's time range:
    rows = db.execute(
        sql.replace("$__timeFilter(j.completed_at)", "j.completed_at > now() - interval '1 hour'")
    ).fetchall()
    by_analysis = {row[0]: row for row in rows}
    assert by_analysis[bad][2:4] == (2, 2) and "broken" in by_analysis[bad][6]
    assert by_analysis[good][2:4] == (1, 0) and by_analysis[good][5] is None
    assert rows[0][0] == bad, "the most failing analysis first"


def _expressions() -> Iterator[str]:
    yield from promql_targets(dashboard())
    for group in yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]


def _metric_names(node: object) -> set[str]:
    """Names of every vector selector in a parsed PromQL expression."""
    names: set[str] = set()
    if type(node).__name__ == "VectorSelector" and getattr(node, "name", None):
        names.add(node.name)  # type: ignore[attr-defined]
    for attribute in ("lhs", "rhs", "expr", "args", "vector_selector", "param"):
        child = getattr(node, attribute, None)
        for item in child if isinstance(child, list) else [child]:
            if item is not None and type(item).__module__.startswith("promql_parser"):
                names |= _metric_names(item)
    return names


def test_every_metric_in_the_dashboard_and_alerts_is_exported_by_a_real_worker(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    used: set[str] = set()
    for expression in _expressions():
        plain = expression.replace("$__rate_interval", "5m")
        for variable in ("$namespace", "$job", "$instance"):
            plain = plain.replace(variable, ".*")
        used |= _metric_names(promql_parser.parse(plain))
    assert {"analysis_executor_up", "analysis_executor_job_duration_seconds_bucket"} <= used

    worker = start_worker()
    jobs = [
        submit(db, create_analysis(db, script="export default function analyze() { return 1; }")),
        submit(db, create_analysis(db, script="export default function analyze() { throw new Error('x'); }")),
    ]
    wait_for_jobs(db, jobs)
    exported = {
        line.split("{")[0].split(" ")[0] for line in worker.get("/metrics")[1].splitlines() if line and line[0] != "#"
    }
    prometheus_own = {"up"}
    assert used - prometheus_own <= exported, f"not exported: {sorted(used - prometheus_own - exported)}"
