"""The monitoring drill: a real Prometheus scrapes a real worker under a small mixed load.

Every expression of the dashboard and of the alert rules is then evaluated over
Prometheus's HTTP API: none may error, and each must return data. One alert is
made to fire (the load fails more than a quarter of its jobs) with its ``for``
shortened, since the drill cannot wait ten minutes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import promql_parser
import psycopg
import pytest
import yaml
from psycopg.types.json import Jsonb

from tests.conftest import REPO_ROOT, WorkerProcess, create_analysis, free_port, submit, wait_for_jobs
from tests.test_deploy import _metric_names, promql_targets

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="prometheus (Debian package prometheus) is not installed"
)

DEPLOY = REPO_ROOT / "deploy"
SCRAPE_SECONDS = 1


def dashboard_expressions() -> list[str]:
    return promql_targets(json.loads((DEPLOY / "grafana/analysis-executor.json").read_text()))


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((DEPLOY / "prometheus/alerts.yaml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


class Prometheus:
    """A real Prometheus server on 127.0.0.1, scraping one target every second."""

    def __init__(self, tmp_path: Path, target_port: int) -> None:
        self.port = free_port()
        rules = [{**rule, "for": "0s"} for rule in alert_rules()]  # the drill cannot wait for `for`
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": [{"name": "drill", "rules": rules}]}))
        config = {
            "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": f"{SCRAPE_SECONDS}s"},
            "rule_files": [str(tmp_path / "rules.yaml")],
            "scrape_configs": [
                {
                    "job_name": "analysis-executor",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"], "labels": {"namespace": "drill"}}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = (tmp_path / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return dict(json.load(response))
        except urllib.error.HTTPError as exc:
            return dict(json.load(exc))

    def query(self, expression: str) -> dict[str, Any]:
        return self.api("query", query=expression)

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except OSError:
                pass  # not listening yet
            assert self.proc.poll() is None, "prometheus exited"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@pytest.fixture
def drill_worker(start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    return start_worker(
        "--concurrency",
        "3",
        env={"METRICS_REFRESH_SECONDS": "1", "RESULT_INLINE_MAX_BYTES": "1024", "SCHEDULER_INTERVAL_SECONDS": "1"},
    )


@pytest.fixture
def prometheus(tmp_path: Path, drill_worker: WorkerProcess) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path, drill_worker.port)
    try:
        yield server
    finally:
        server.stop()


def mixed_load(db: psycopg.Connection, scripts_dir: Path) -> list[str]:
    """Successes, throws, timeouts, a Python script, a dependency, a large result, a schedule."""
    (scripts_dir / "drill.py").write_text("print('{\"ok\": true}')\n")
    ok = create_analysis(db, script="export default function analyze() { return 1; }")
    throws = create_analysis(db, script="export default function analyze() { throw new Error('drill'); }")
    slow = create_analysis(db, script="export default function analyze() { while (true) {} }", timeout_ms=100)
    large = create_analysis(db, script="export default function analyze() { return 'x'.repeat(4096); }")
    python = create_analysis(db, script_name="drill")
    with_dependency = create_analysis(db, script="export default function analyze(p, data) { return data.one.length; }")
    db.execute(
        "INSERT INTO analysis_dependencies (analysis_id, name, datasource, query)"
        " VALUES (%s, 'one', 'main', 'SELECT 1')",
        (with_dependency,),
    )
    # Armed two minutes ago: due at once, one job for the missed window.
    db.execute(
        "INSERT INTO analysis_schedules (analysis_id, cron_expression, timezone, catch_up, parameters, updated_at)"
        " VALUES (%s, '* * * * *', 'UTC', 'once', %s, now() - interval '2 minutes')",
        (ok, Jsonb({})),
    )
    jobs = [submit(db, ok) for _ in range(8)]
    jobs += [submit(db, throws) for _ in range(6)] + [submit(db, slow) for _ in range(2)]
    jobs += [submit(db, large), submit(db, python), submit(db, with_dependency)]
    return jobs


def test_every_dashboard_and_alert_expression_returns_data_from_a_live_worker_and_an_alert_fires(
    db: psycopg.Connection, drill_worker: WorkerProcess, prometheus: Prometheus, scripts_dir: Path
) -> None:
    prometheus.wait(lambda: prometheus.query("up")["data"]["result"] != [], "the first scrape")
    jobs = mixed_load(db, scripts_dir)
    wait_for_jobs(db, jobs, timeout=60)
    time.sleep(4 * SCRAPE_SECONDS)  # a few scrapes after the last job, for rate() and increase()

    empty, errors = [], []
    for expression in dashboard_expressions():
        plain = expression.replace("$__rate_interval", "1m")
        for variable in ("$namespace", "$job", "$instance"):
            plain = plain.replace(variable, ".*")
        answer = prometheus.query(plain)
        if answer["status"] != "success":
            errors.append(f"{plain}: {answer.get('error')}")
        elif not answer["data"]["result"]:
            empty.append(plain)
    # An alert's expression is empty while it does not fire: each must evaluate,
    # and each series it selects must exist.
    for rule in alert_rules():
        answer = prometheus.query(rule["expr"])
        if answer["status"] != "success":
            errors.append(f"{rule['alert']}: {answer.get('error')}")
        for name in _metric_names(promql_parser.parse(rule["expr"])):
            if not prometheus.query(name)["data"]["result"]:
                empty.append(f"{name} (in {rule['alert']})")
    assert errors == []
    assert empty == [], "no data for:\n" + "\n".join(empty)

    def high_failure_ratio_fires() -> bool:
        alerts = prometheus.api("alerts")["data"]["alerts"]
        return any(
            a["labels"]["alertname"] == "AnalysisExecutorHighFailureRatio" and a["state"] == "firing" for a in alerts
        )

    prometheus.wait(high_failure_ratio_fires, "AnalysisExecutorHighFailureRatio firing", timeout=30)
    (firing,) = [
        a
        for a in prometheus.api("alerts")["data"]["alerts"]
        if a["state"] == "firing" and "Failure" in a["labels"]["alertname"]
    ]
    assert firing["labels"]["namespace"] == "drill"
