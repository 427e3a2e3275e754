"""The benchmark suite: throughput, pickup latency, scale, submission rate, memory.

    .venv/bin/python -m tests.benchmarks.run                # everything, 3 runs each
    .venv/bin/python -m tests.benchmarks.run --only pickup --runs 5
    BENCH_DATABASE_URL=postgresql://... .venv/bin/python -m tests.benchmarks.run

Not part of the test run. It starts its own embedded PostgreSQL (stock
settings: fsync and synchronous_commit on) unless BENCH_DATABASE_URL names a
server, records the machine, repeats each measurement, and writes
``bench-results/<timestamp>.json`` and ``.md``. Every figure is also given as
a ratio to the plain-SQL baseline measured in the same run on the same server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import quickjs
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.benchmarks.stats import percentile
from tests.claims import claim_jobs
from tests.processes import child_pids, rss_kib
from worker.allocator import mimalloc_library
from worker.boundary import child_environment
from worker.embedded import EmbeddedPostgres
from worker.migrate import apply_migrations
from worker.runtimes.javascript import run_javascript

TRIVIAL_JS = 'export default function analyze(params) { return {result: "success"}; }'
TRIVIAL_PY = "import json, sys\njson.load(sys.stdin)\nprint(json.dumps({'result': 'success'}))\n"
RESULTS_DIR = Path("bench-results")


@dataclass
class Measurement:
    """One workload's repeated figure."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "runs": self.values,
            "median": self.median,
            "min": min(self.values),
            "max": max(self.values),
            **self.extra,
        }


# --- infrastructure ----------------------------------------------------------------


@contextmanager
def database_server() -> Iterator[str]:
    """URL of the maintenance database of the server to benchmark against."""
    existing = os.environ.get("BENCH_DATABASE_URL")
    if existing:
        yield existing
        return
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as folder:
        server = EmbeddedPostgres(Path(folder) / "data", settings={"max_connections": "200"})
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@contextmanager
def fresh_database(server_url: str, name: str = "analysis_executor_bench") -> Iterator[str]:
    """A newly created, migrated database; dropped afterwards."""
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    params = conninfo_to_dict(server_url)
    params["dbname"] = name
    url = make_conninfo(**params)
    apply_migrations(url)
    try:
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def workers(
    url: str, count: int, *args: str, env: dict[str, str] | None = None
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``count`` real worker processes; stop them (SIGTERM) afterwards."""
    procs = []
    for _ in range(count):
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "run",
                "--database-url",
                url,
                "--port",
                str(port),
                "--log-level",
                "warning",
                *args,
            ],
            env={**os.environ, **(env or {})},
        )
        procs.append(proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("worker did not become ready")
            time.sleep(0.05)
        proc.port = port  # type: ignore[attr-defined]
    try:
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(60)


def create_analysis(conn: psycopg.Connection, script: str | None = None, script_name: str | None = None) -> str:
    runtime = "python" if script_name else "javascript"
    row = conn.execute(
        "INSERT INTO analyses (title, runtime, script_content, script_name) VALUES ('bench', %s, %s, %s) RETURNING id",
        (runtime, script, script_name),
    ).fetchone()
    assert row is not None
    return str(row[0])


def insert_pending(conn: psycopg.Connection, analysis: str, count: int, *, vacuum: bool = True) -> None:
    """A backlog of ``count`` pending jobs, in one statement; then fresh statistics."""
    conn.execute("INSERT INTO analysis_jobs (analysis_id) SELECT %s FROM generate_series(1, %s)", (analysis, count))
    if vacuum:
        conn.execute("VACUUM ANALYZE analysis_jobs")


def settle_writes(conn: psycopg.Connection) -> None:
    """Flush the setup's writes (CHECKPOINT needs a superuser or pg_checkpoint; skipped otherwise)."""
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        print("  (no CHECKPOINT privilege: setup writes may be flushed during the measurement)", file=sys.stderr)


def finished_by(procs: list[subprocess.Popen[bytes]]) -> int:
    """Jobs the workers have finished and recorded, read from their /metrics (no database query)."""
    total = 0
    for proc in procs:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.port}/metrics", timeout=5) as response:  # type: ignore[attr-defined]
            for line in response.read().decode().splitlines():
                if line.startswith("analysis_executor_jobs_finished_total{"):
                    total += int(float(line.rsplit(" ", 1)[1]))
    return total


def wait_for_completed(procs: list[subprocess.Popen[bytes]], expected: int, timeout: float = 900) -> None:
    """Wait until the workers have finished ``expected`` jobs.

    Asked of the workers, not the database: counting finished rows would scan
    the table every time, and with a long history that scan competes with the
    workers for the CPU it is measuring. Asked twice a second: rendering
    /metrics ten times a second took ~2.5 % of a busy worker's CPU, and the
    figures come from the rows' timestamps, not from when this returns.
    """
    deadline = time.monotonic() + timeout
    while finished_by(procs) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{expected} jobs not finished after {timeout}s")
        time.sleep(0.5)


def throughput_of_finished(conn: psycopg.Connection) -> float:
    """Jobs/s from the first started_at to the last completed_at."""
    count, seconds = conn.execute(
        "SELECT count(*), EXTRACT(EPOCH FROM max(completed_at) - min(started_at)) FROM analysis_jobs"
        " WHERE status = 'completed'"
    ).fetchone()  # type: ignore[misc]
    return count / float(seconds)


# --- workloads ----------------------------------------------------------------------


def bench_baseline(server_url: str, runs: int, jobs: int = 20_000, batch: int = 50) -> Measurement:
    """Plain SQL on one connection: claim 50 with SKIP LOCKED, complete them, repeat."""
    result = Measurement("baseline: plain-SQL claim 50 + complete", "jobs/s")
    for _ in range(runs):
        with fresh_database(server_url) as url, psycopg.connect(url, autocommit=True) as conn:
            analysis = create_analysis(conn, TRIVIAL_JS)
            insert_pending(conn, analysis, jobs)
            started = time.perf_counter()
            done = 0
            while done < jobs:
                ids = conn.execute(
                    "UPDATE analysis_jobs SET status = 'running', started_at = now(), attempts = attempts + 1"
                    " WHERE id = ANY(ARRAY(SELECT id FROM analysis_jobs WHERE status = 'pending'"
                    " ORDER BY priority DESC, run_at, created_at LIMIT %s FOR UPDATE SKIP LOCKED)) RETURNING id",
                    (batch,),
                ).fetchall()
                conn.execute(
                    "UPDATE analysis_jobs SET status = 'completed', result = '{\"result\": \"success\"}',"
                    " completed_at = now() WHERE id = ANY(%s)",
                    ([r[0] for r in ids],),
                )
                done += len(ids)
            result.values.append(jobs / (time.perf_counter() - started))
    return result


def bench_js_throughput(server_url: str, runs: int, processes: int, jobs: int, concurrency: int) -> Measurement:
    result = Measurement(
        f"JavaScript throughput, {processes} worker process(es)",
        "jobs/s",
        extra={"jobs": jobs, "concurrency": concurrency},
    )
    rss: dict[str, int] = {}
    for _ in range(runs):
        with fresh_database(server_url) as url, psycopg.connect(url, autocommit=True) as conn:
            analysis = create_analysis(conn, TRIVIAL_JS)
            insert_pending(conn, analysis, jobs)
            with workers(url, processes, "--concurrency", str(concurrency), "--pool-processes", "2") as procs:
                wait_for_completed(procs, jobs)
                rss = {
                    "worker_rss_kib": rss_kib(procs[0].pid),
                    "child_rss_kib_max": max((rss_kib(c) for c in child_pids(procs[0].pid)), default=0),
                }
            result.values.append(throughput_of_finished(conn))
    result.extra.update(rss)
    return result


def bench_python_throughput(server_url: str, runs: int, jobs: int = 2_000, concurrency: int = 8) -> Measurement:
    result = Measurement(
        "Python-script throughput, 1 worker process", "jobs/s", extra={"jobs": jobs, "concurrency": concurrency}
    )
    with tempfile.TemporaryDirectory() as scripts:
        (Path(scripts) / "trivial.py").write_text(TRIVIAL_PY)
        for _ in range(runs):
            with fresh_database(server_url) as url, psycopg.connect(url, autocommit=True) as conn:
                analysis = create_analysis(conn, script_name="trivial")
                insert_pending(conn, analysis, jobs, vacuum=False)
                with workers(url, 1, "--concurrency", str(concurrency), "--scripts-dir", scripts) as procs:
                    wait_for_completed(procs, jobs)
                result.values.append(throughput_of_finished(conn))
    return result


# The pickup workload's script reports when its first line ran (QuickJS's clock has 1 ms resolution).
FIRST_LINE_JS = "export default function analyze(params) { return {first_line_ms: Date.now()}; }"


def bench_pickup(server_url: str, runs: int, inserts: int = 200, gap: float = 0.02) -> list[Measurement]:
    """Idle worker; single-row INSERTs 20 ms apart, each its own transaction.

    "Commit" is when the submitter's COMMIT returned. The script's first line
    is timed by the script itself with ``Date.now()``, whole milliseconds: the
    true moment lies within the millisecond after it, so the estimate adds half
    of one (the error is at most +-0.5 ms per job).
    """
    from_commit = Measurement("pickup latency, commit -> started_at (p50)", "ms", extra={"inserts": inserts})
    first_line = Measurement("pickup latency, commit -> script's first line (p50)", "ms", extra={"inserts": inserts})
    from_created = Measurement("pickup latency, created_at -> started_at (p50)", "ms", extra={"inserts": inserts})
    for _ in range(runs):
        with fresh_database(server_url) as url, psycopg.connect(url, autocommit=True) as conn:
            analysis = create_analysis(conn, FIRST_LINE_JS)
            with workers(url, 1, "--poll-interval-ms", "600000") as procs:
                time.sleep(0.5)
                committed: dict[str, float] = {}
                for _ in range(inserts):
                    row = conn.execute(
                        "INSERT INTO analysis_jobs (analysis_id) VALUES (%s) RETURNING id", (analysis,)
                    ).fetchone()
                    committed[str(row[0])] = time.time()  # type: ignore[index]
                    time.sleep(gap)
                wait_for_completed(procs, inserts)
            rows = conn.execute(
                "SELECT id, EXTRACT(EPOCH FROM started_at), (result->>'first_line_ms')::float8,"
                " EXTRACT(EPOCH FROM started_at - created_at) FROM analysis_jobs"
            ).fetchall()
        # The worker can claim before the submitter's client has read its COMMIT's reply.
        commit_ms = [max(0.0, (float(started) - committed[str(job_id)]) * 1000) for job_id, started, _, _ in rows]
        line_ms = [max(0.0, line + 0.5 - committed[str(job_id)] * 1000) for job_id, _, line, _ in rows]
        created_ms = [float(wait) * 1000 for _, _, _, wait in rows]
        for measurement, samples in ((from_commit, commit_ms), (first_line, line_ms), (from_created, created_ms)):
            measurement.values.append(percentile(samples, 0.5))
            for key, p in (("p95", 0.95), ("p99", 0.99), ("max", 1.0)):
                measurement.extra.setdefault(f"{key}_runs", []).append(percentile(samples, p))
    for measurement in (from_commit, first_line, from_created):
        for key in ("p95", "p99", "max"):
            measurement.extra[f"{key}_median"] = statistics.median(measurement.extra[f"{key}_runs"])
    return [from_commit, first_line, from_created]


def bench_submission(server_url: str, runs: int, seconds: float = 10.0, clients: int = 8) -> list[Measurement]:
    """8 connections doing single-row INSERT transactions: trigger on, off, and on with a worker taking the jobs.

    With the trigger on, a transaction sends a NOTIFY only when some worker is
    idle and waiting; the third variant runs one real worker (on the same two
    cores) that claims the jobs as they arrive, and counts the notifications.
    """
    variants = [("trigger on, no worker", True, False), ("trigger off", False, False)]
    variants.append(("trigger on, 1 worker claiming the jobs as they arrive", True, True))
    measured = [Measurement(f"submission rate, {clients} clients, {label}", "inserts/s") for label, _, _ in variants]
    notified: list[list[float]] = [[] for _ in variants]
    # Interleaved (on, off, worker, on, off, ...), so a drift of the host's speed
    # during the run does not land on one variant only.
    for _ in range(runs):
        for index, (_, trigger, with_worker) in enumerate(variants):
            with fresh_database(server_url) as url, psycopg.connect(url, autocommit=True) as conn:
                analysis = create_analysis(conn, TRIVIAL_JS)
                if not trigger:
                    conn.execute("ALTER TABLE analysis_jobs DISABLE TRIGGER analysis_jobs_notify_pending")
                with contextlib.ExitStack() as stack:
                    if with_worker:
                        stack.enter_context(workers(url, 1, "--concurrency", "32"))
                    listener = stack.enter_context(psycopg.connect(url, autocommit=True))
                    listener.execute("LISTEN analysis_jobs_pending")
                    counts = [0] * clients
                    stop_at = time.monotonic() + seconds
                    threads = [
                        threading.Thread(target=_submit_until, args=(url, analysis, stop_at, counts, i))
                        for i in range(clients)
                    ]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    notifications = sum(1 for _ in listener.notifies(timeout=1.0))
                measured[index].values.append(sum(counts) / seconds)
                notified[index].append(notifications / max(1, sum(counts)))
    for result, shares in zip(measured, notified, strict=True):
        result.extra["notifying_transactions_share"] = statistics.median(shares)
    measured[0].extra["ratio_to_no_trigger"] = measured[0].median / measured[1].median
    measured[2].extra["ratio_to_no_trigger"] = measured[2].median / measured[1].median
    return measured


def _submit_until(url: str, analysis: str, stop_at: float, counts: list[int], index: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        while time.monotonic() < stop_at:
            conn.execute("INSERT INTO analysis_jobs (analysis_id) VALUES (%s)", (analysis,))
            counts[index] += 1


def bench_scale(
    server_url: str,
    runs: int,
    finished: int = 1_000_000,
    pending: int = 100_000,
    warmup_jobs: int = 20_000,
    measured_jobs: int = 20_000,
) -> list[Measurement]:
    """Claim latency and throughput with a large finished history, against the same backlog and no history.

    Throughput is measured after a warm-up: right after a checkpoint, the first
    touch of each index page writes a full-page image to the WAL, and a
    bigger table has more pages to touch once; a system with a long history
    paid that long ago.
    """
    claim = {0: Measurement(f"claim of 50 with {pending:,} pending, no history (p50)", "ms")}
    claim[finished] = Measurement(f"claim of 50 with {finished:,} finished + {pending:,} pending (p50)", "ms")
    rate = {
        0: Measurement(
            f"JavaScript throughput, {measured_jobs:,} jobs after a {warmup_jobs:,}-job warm-up, no history", "jobs/s"
        )
    }
    rate[finished] = Measurement(
        f"JavaScript throughput, {measured_jobs:,} jobs after a {warmup_jobs:,}-job warm-up, "
        f"{finished:,} finished jobs",
        "jobs/s",
    )
    for _ in range(runs):
        for history in (0, finished):
            with fresh_database(server_url) as url, psycopg.connect(url, autocommit=True) as conn:
                analysis = create_analysis(conn, TRIVIAL_JS)
                if history:
                    conn.execute(
                        "INSERT INTO analysis_jobs (analysis_id, status, started_at, completed_at, attempts)"
                        " SELECT %s, 'completed', now(), now(), 1 FROM generate_series(1, %s)",
                        (analysis, history),
                    )
                insert_pending(conn, analysis, pending)
                # A history that built up over months was vacuumed and checkpointed
                # long ago: do not bill the setup's own bulk write to the workers.
                settle_writes(conn)
                timings = []
                for _ in range(50):
                    with conn.transaction(force_rollback=True):
                        started = time.perf_counter()
                        claim_jobs(conn, 50, "bench", own_transaction=False)
                        timings.append((time.perf_counter() - started) * 1000)
                claim[history].values.append(statistics.median(timings))
                with workers(url, 1, "--concurrency", "128", "--pool-processes", "2") as procs:
                    wait_for_completed(procs, warmup_jobs + measured_jobs)
                (seconds,) = conn.execute(
                    "SELECT EXTRACT(EPOCH FROM max(completed_at) - min(completed_at)) FROM ("
                    "  SELECT completed_at FROM analysis_jobs WHERE status = 'completed' AND worker_id IS NOT NULL"
                    "  ORDER BY completed_at OFFSET %s LIMIT %s) AS measured",
                    (warmup_jobs, measured_jobs),
                ).fetchone()  # type: ignore[misc]
                rate[history].values.append(measured_jobs / float(seconds))
    rate[finished].extra["ratio_to_no_history"] = rate[finished].median / rate[0].median
    return [claim[0], claim[finished], rate[0], rate[finished]]


def runtime_loop(jobs: int) -> dict[str, float]:
    """µs per job of our wrapper (fresh context + call) and of a bare context + call, in this process."""
    job = {
        "source": TRIVIAL_JS, "parameters_json": "{}", "context_json": "{}", "timeout_ms": 1000, "memory_limit_mb": 64,
        "stack_limit_kb": 1024, "output_max_bytes": 1 << 20, "result_max_bytes": 1 << 24,
    }  # fmt: skip
    started = time.perf_counter()
    for _ in range(jobs):
        run_javascript(job)
    wrapper = (time.perf_counter() - started) / jobs * 1e6
    started = time.perf_counter()
    for _ in range(jobs):
        context = quickjs.Context()
        context.eval("(function analyze(p) { return {result: 'success'}; })({})")
    return {"wrapper": wrapper, "bare": (time.perf_counter() - started) / jobs * 1e6}


def bench_runtime_only(runs: int, jobs: int = 5_000) -> list[Measurement]:
    """The JavaScript runtime alone: fresh context + call, per job, with each allocator a child can have."""
    allocators: dict[str, Path | None] = {"system malloc": None}
    if (library := mimalloc_library()) is not None:
        allocators["mimalloc, as pool children run it"] = library
    results = []
    for label, preload in allocators.items():
        result = Measurement(f"JavaScript runtime alone (fresh context + call), {label}", "µs/job")
        bare = []
        for _ in range(runs):
            # A process of its own: the allocator is chosen when a process starts.
            code = f"import json, tests.benchmarks.run as b; print(json.dumps(b.runtime_loop({jobs})))"
            output = subprocess.run(
                [sys.executable, "-c", code],
                env=child_environment(os.environ, preload),
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            figures = json.loads(output.strip().splitlines()[-1])
            result.values.append(figures["wrapper"])
            bare.append(figures["bare"])
        result.extra["bare_quickjs_context_and_call_us"] = statistics.median(bare)
        results.append(result)
    return results


def bench_memory(server_url: str, jobs: int = 100_000, concurrency: int = 128) -> Measurement:
    """Worker and child RSS sampled through a long run: it must not grow per job."""
    result = Measurement(f"worker RSS over a {jobs:,}-job run", "KiB")
    with fresh_database(server_url) as url, psycopg.connect(url, autocommit=True) as conn:
        analysis = create_analysis(conn, TRIVIAL_JS)
        insert_pending(conn, analysis, jobs)
        with workers(url, 1, "--concurrency", str(concurrency), "--pool-processes", "2") as (proc,):
            samples = []
            while True:
                done = finished_by([proc])
                samples.append((done, rss_kib(proc.pid), max((rss_kib(c) for c in child_pids(proc.pid)), default=0)))
                if done >= jobs:
                    break
                time.sleep(1)
    quarter = [s for s in samples if s[0] >= jobs // 4]
    result.values = [float(s[1]) for s in quarter] or [float(samples[-1][1])]
    result.extra.update(
        {
            "worker_rss_kib_at_25pct": quarter[0][1] if quarter else None,
            "worker_rss_kib_at_end": samples[-1][1],
            "child_rss_kib_at_25pct": quarter[0][2] if quarter else None,
            "child_rss_kib_at_end": samples[-1][2],
        }
    )
    return result


# --- report --------------------------------------------------------------------------


def machine(server_url: str) -> dict[str, Any]:
    with psycopg.connect(server_url) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        fsync = conn.execute("SHOW fsync").fetchone()[0]  # type: ignore[index]
        sync_commit = conn.execute("SHOW synchronous_commit").fetchone()[0]  # type: ignore[index]
    memory_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        ),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "postgresql": version,
        "fsync": fsync,
        "synchronous_commit": sync_commit,
    }


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, "
        f"PostgreSQL {m['postgresql']} (fsync={m['fsync']}, synchronous_commit={m['synchronous_commit']}),"
        f" {m['date']}.",
        "",
        "| workload | median | min - max | unit | vs baseline | details (medians over the runs) |",
        "|---|---:|---:|---|---:|---|",
    ]
    baseline = report.get("baseline_jobs_per_second")
    for item in report["results"]:
        ratio = f"{item['median'] / baseline:.2f}x" if baseline and item["unit"] == "jobs/s" else ""
        details = ", ".join(
            f"{key.removesuffix('_median')} {value:,.3g}"
            for key, value in item.items()
            if isinstance(value, float) and key not in ("median", "min", "max")
        )
        lines.append(
            f"| {item['name']} | {item['median']:,.2f} | {item['min']:,.2f} - {item['max']:,.2f}"
            f" | {item['unit']} | {ratio} | {details} |"
        )
    return "\n".join(lines) + "\n"


WORKLOADS: dict[str, Callable[[str, int], list[Measurement]]] = {
    "baseline": lambda url, runs: [bench_baseline(url, runs)],
    "runtime": lambda url, runs: bench_runtime_only(runs),
    "pickup": lambda url, runs: bench_pickup(url, runs),
    "throughput": lambda url, runs: [
        bench_js_throughput(url, runs, processes=1, jobs=20_000, concurrency=128),
        bench_js_throughput(url, runs, processes=2, jobs=20_000, concurrency=128),
    ],
    "python": lambda url, runs: [bench_python_throughput(url, runs)],
    "submission": lambda url, runs: bench_submission(url, runs),
    "scale": lambda url, runs: bench_scale(url, runs),
    "memory": lambda url, runs: [bench_memory(url)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (default 3)")
    parser.add_argument("--only", action="append", choices=sorted(WORKLOADS), help="run only these workloads")
    parser.add_argument("--skip", action="append", choices=sorted(WORKLOADS), default=[], help="skip these workloads")
    args = parser.parse_args()
    chosen = [name for name in WORKLOADS if (not args.only or name in args.only) and name not in args.skip]
    if "baseline" not in chosen:
        chosen.insert(0, "baseline")
    with database_server() as server_url:
        report: dict[str, Any] = {"machine": machine(server_url), "results": []}
        print(json.dumps(report["machine"]), flush=True)
        for name in chosen:
            for measurement in WORKLOADS[name](server_url, args.runs):
                item = measurement.as_dict()
                report["results"].append(item)
                if name == "baseline":
                    report["baseline_jobs_per_second"] = item["median"]
                print(
                    f"{item['name']}: median {item['median']:,.2f} {item['unit']}"
                    f" (min {item['min']:,.2f}, max {item['max']:,.2f})",
                    flush=True,
                )
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS_DIR / f"{stamp}.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS_DIR / f"{stamp}.md").write_text(markdown(report))
    print()
    print(markdown(report))


if __name__ == "__main__":
    main()
