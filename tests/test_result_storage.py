"""Large results: stored outside the job row, read back whole, capped, pruned — against real workers."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from tests.conftest import WorkerProcess, create_analysis, submit, wait_for_jobs
from tests.messages import claimed_job
from worker.config import Settings, load_settings
from worker.maintenance.pruner import Pruner
from worker.metrics import Metrics
from worker.model import JobStatus, Outcome
from worker.recorder import Recorder
from worker.result_storage import (
    ResultInfo,
    ResultNotAvailable,
    ResultStore,
    StoredResultCorrupt,
    checksum_of,
    file_location,
    read_result,
    resolve_location,
)
from worker.runtimes.python import _Stdout

ROWS = 110_000  # about 5.5 MB of JSON

# The same rows in JavaScript and Python: integers and strings only, so
# JSON.stringify and json.dumps agree byte for byte. The noise (a MINSTD
# generator) keeps the data from compressing to almost nothing, so reading it
# back takes several slices.
JS_LARGE = f"""
export default function analyze(params) {{
    const rows = [];
    let x = 1;
    for (let i = 0; i < {ROWS}; i++) {{
        x = (x * 48271) % 2147483647;
        rows.push({{i: i, name: "row-" + i, noise: x.toString(16)}});
    }}
    return {{rows: rows, note: params.note}};
}}
"""

PY_LARGE = f"""
import json, sys
params = json.load(sys.stdin)
rows, x = [], 1
for i in range({ROWS}):
    x = (x * 48271) % 2147483647
    rows.append({{"i": i, "name": f"row-{{i}}", "noise": format(x, "x")}})
print("building done")
print(json.dumps({{"rows": rows, "note": params["note"]}}, separators=(",", ":")))
"""


def expected_large(note: str) -> bytes:
    rows, x = [], 1
    for i in range(ROWS):
        x = (x * 48271) % 2147483647
        rows.append({"i": i, "name": f"row-{i}", "noise": format(x, "x")})
    return json.dumps({"rows": rows, "note": note}, separators=(",", ":")).encode()


def http_get(worker: WorkerProcess, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(worker.base_url + path)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def show_result(database_url: str, job_id: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "RESULT_STORAGE_DIR")}
    return subprocess.run(
        [sys.executable, "-m", "worker", "show", job_id, "--result", "--database-url", database_url, *extra],
        capture_output=True,
        env=env,
        timeout=60,
    )


def storage_settings(database_url: str, env: dict[str, str]) -> Settings:
    return load_settings({"database_url": database_url}, {**env, "DATABASE_URL": database_url})


def prune(database_url: str, settings: Settings) -> int:
    """One pass of the pruner, as a worker with these settings runs it."""

    async def one_pass() -> int:
        async with AsyncConnectionPool(database_url, min_size=1, kwargs={"autocommit": True}) as pool:
            return await Pruner(settings, pool, ResultStore(settings)).prune_finished_jobs()

    return asyncio.run(one_pass())


def filesystem_storage(database_url: str, tmp_path: Path) -> tuple[Path, Settings]:
    """A result folder under ``tmp_path`` and the settings of a worker storing large results there."""
    env, folder = backend_env("filesystem", tmp_path)
    assert folder is not None
    return folder, storage_settings(database_url, env)


def storage_row(db: psycopg.Connection, job_id: str) -> dict[str, Any] | None:
    with db.cursor(row_factory=dict_row) as cur:
        cur.execute("SELECT * FROM analysis_result_storage WHERE job_id = %s", (job_id,))
        return cur.fetchone()


def backend_env(backend: str, tmp_path: Path) -> tuple[dict[str, str], Path | None]:
    if backend == "postgres":
        return {}, None
    folder = tmp_path / "results"
    folder.mkdir()
    return {"RESULT_STORAGE": "filesystem", "RESULT_STORAGE_DIR": str(folder)}, folder


@pytest.mark.parametrize("backend", ["postgres", "filesystem"])
def test_5mb_results_round_trip_byte_for_byte(
    db: psycopg.Connection,
    database_url: str,
    start_worker: Callable[..., WorkerProcess],
    scripts_dir: Path,
    tmp_path: Path,
    backend: str,
) -> None:
    env, folder = backend_env(backend, tmp_path)
    worker = start_worker(env=env)
    (scripts_dir / "large_result.py").write_text(PY_LARGE)
    js_job = submit(db, create_analysis(db, script=JS_LARGE), {"note": "js"})
    py_job = submit(db, create_analysis(db, script_name="large_result"), {"note": "py"})
    rows = wait_for_jobs(db, [js_job, py_job], timeout=120)

    for job_id, note in ((js_job, "js"), (py_job, "py")):
        expected = expected_large(note)
        assert len(expected) > 5_000_000
        row = rows[job_id]
        assert (row["status"], row["error_message"]) == ("completed", None)
        stub = {
            "stored": True,
            "size_bytes": len(expected),
            "checksum": "sha256:" + hashlib.sha256(expected).hexdigest(),
            "content_type": "application/json",
            "href": f"/jobs/{job_id}/result",
        }
        assert row["result"] == stub

        stored = storage_row(db, job_id)
        assert stored is not None
        assert (stored["size_bytes"], stored["checksum"], stored["backend"], stored["compression"]) == (
            len(expected),
            stub["checksum"],
            backend,
            "gzip",
        )
        if folder is None:
            assert gzip.decompress(stored["content"]) == expected
            assert len(stored["content"]) > 1 << 20  # read back in more than one slice
        else:
            assert stored["content"] is None
            assert gzip.decompress((folder / stored["location"]).read_bytes()) == expected
            assert not list(folder.rglob("*.tmp"))

        status, headers, body = http_get(worker, f"/jobs/{job_id}/result")
        assert status == 200
        assert body == expected
        assert headers["Content-Type"] == "application/json"
        assert headers["Content-Length"] == str(len(expected))
        assert headers["ETag"] == f'"{stub["checksum"]}"'
        assert headers["X-Result-Storage"] == backend

        shown = show_result(database_url, job_id, *(["--result-storage-dir", str(folder)] if folder else []))
        assert shown.returncode == 0, shown.stderr
        assert hashlib.sha256(shown.stdout).hexdigest() == hashlib.sha256(expected).hexdigest()

        status, _, document = http_get(worker, f"/jobs/{job_id}")
        assert (status, json.loads(document)["result"]) == (200, stub)

    assert "building done" in rows[py_job]["stdout"]
    assert len(rows[py_job]["stdout"]) < 1000  # the result line is not copied into stdout
    metrics = worker.get("/metrics")[1]
    assert "analysis_executor_stored_result_size_bytes_count 2.0" in metrics
    assert f'analysis_executor_stored_result_written_bytes_total{{backend="{backend}"}} 0.0' not in metrics


def test_file_backed_result_needs_the_storage_dir_to_be_read_from_the_cli(
    db: psycopg.Connection, database_url: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    env, folder = backend_env("filesystem", tmp_path)
    assert folder is not None
    start_worker(env=env)
    job = submit(db, create_analysis(db, script="export default function analyze() { return 'z'.repeat(300000); }"))
    assert wait_for_jobs(db, [job])[job]["status"] == "completed"
    shown = show_result(database_url, job)
    assert shown.returncode == 2
    assert b"set RESULT_STORAGE_DIR" in shown.stderr
    # A file lost from the storage folder is a failure of the storage, not bad input: exit 1.
    (folder / storage_row(db, job)["location"]).unlink()  # type: ignore[index]
    shown = show_result(database_url, job, "--result-storage-dir", str(folder))
    assert shown.returncode == 1, shown.stderr
    assert b"is missing" in shown.stderr


def test_result_just_under_the_inline_limit_stays_in_the_job_row(
    db: psycopg.Connection, database_url: str, start_worker: Callable[..., WorkerProcess]
) -> None:
    worker = start_worker(env={"RESULT_INLINE_MAX_BYTES": "4096"})
    analysis = create_analysis(db, script="export default function analyze(p) { return 'x'.repeat(p.n); }")
    at_limit = submit(db, analysis, {"n": 4094})  # 4,096 bytes with the quotes
    over_limit = submit(db, analysis, {"n": 4095})
    rows = wait_for_jobs(db, [at_limit, over_limit])

    assert rows[at_limit]["result"] == "x" * 4094
    assert storage_row(db, at_limit) is None
    assert rows[over_limit]["result"]["stored"] is True
    assert rows[over_limit]["result"]["size_bytes"] == 4097
    assert storage_row(db, over_limit) is not None

    # Inline results read back the same way, as JSON text.
    status, headers, body = http_get(worker, f"/jobs/{at_limit}/result")
    assert (status, body) == (200, json.dumps("x" * 4094).encode())
    assert headers["X-Result-Storage"] == "inline"
    shown = show_result(database_url, at_limit)
    assert (shown.returncode, shown.stdout) == (0, body)
    status, _, body = http_get(worker, f"/jobs/{over_limit}/result")
    assert (status, body) == (200, json.dumps("x" * 4095).encode())


def test_result_over_the_cap_fails_cleanly_and_the_worker_carries_on(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess], scripts_dir: Path
) -> None:
    start_worker("--concurrency", "1", env={"RESULT_MAX_BYTES": str(1 << 20)})
    (scripts_dir / "huge.py").write_text("print('log line')\nprint('[' + '1,' * 1_500_000 + '1]')\n")
    js_huge = submit(db, create_analysis(db, script="export default function analyze() { return 'y'.repeat(2e6); }"))
    py_huge = submit(db, create_analysis(db, script_name="huge"))
    after = submit(db, create_analysis(db, script="export default function analyze() { return {ok: true}; }"))
    rows = wait_for_jobs(db, [js_huge, py_huge, after], timeout=120)

    assert rows[js_huge]["status"] == "failed"
    assert rows[js_huge]["error_message"] == "result is 1.9 MiB, over the 1.0 MiB limit (RESULT_MAX_BYTES)"
    assert rows[py_huge]["status"] == "failed"
    assert rows[py_huge]["error_message"].startswith("result is over the 1.0 MiB limit (RESULT_MAX_BYTES)")
    assert rows[js_huge]["result"] is None and rows[py_huge]["result"] is None
    assert storage_row(db, js_huge) is None and storage_row(db, py_huge) is None
    assert (rows[after]["status"], rows[after]["result"]) == ("completed", {"ok": True})


def test_result_endpoint_answers_404_without_a_result_and_follows_the_token_rules(
    db: psycopg.Connection, start_worker: Callable[..., WorkerProcess]
) -> None:
    token = "s3cret-token"
    worker = start_worker(env={"ANALYSIS_EXECUTOR_API_TOKEN": token})
    failed = submit(db, create_analysis(db, script="export default function analyze() { throw new Error('no'); }"))
    wait_for_jobs(db, [failed])

    assert http_get(worker, f"/jobs/{failed}/result")[0] == 401
    status, _, body = http_get(worker, f"/jobs/{failed}/result", token)
    assert status == 404 and "has no result (status failed)" in json.loads(body)["error"]
    unknown = "00000000-0000-0000-0000-000000000000"
    assert http_get(worker, f"/jobs/{unknown}/result", token)[0] == 404
    assert http_get(worker, "/jobs/not-a-uuid/result", token)[0] == 404


def test_retention_deletes_stored_results_with_their_jobs_and_the_files_of_deleted_jobs(
    db: psycopg.Connection, database_url: str, start_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    env, folder = backend_env("filesystem", tmp_path)
    assert folder is not None
    settings = storage_settings(database_url, env)
    start_worker(env=env)
    analysis = create_analysis(db, script="export default function analyze(p) { return p.c.repeat(300000); }")
    old, deleted_by_user, kept = (submit(db, analysis, {"c": c}) for c in "abc")
    wait_for_jobs(db, [old, deleted_by_user, kept])
    files = {job: folder / storage_row(db, job)["location"] for job in (old, deleted_by_user, kept)}  # type: ignore[index]
    assert all(path.is_file() for path in files.values())

    db.execute("UPDATE analysis_jobs SET created_at = now() - interval '40 days' WHERE id = %s", (old,))
    db.execute("DELETE FROM analysis_jobs WHERE id = %s", (deleted_by_user,))

    assert prune(database_url, settings) == 1
    assert storage_row(db, old) is None
    assert not files[old].exists() and not files[deleted_by_user].exists()
    assert files[kept].is_file() and storage_row(db, kept) is not None
    assert db.execute("SELECT count(*) FROM analysis_result_file_deletions").fetchone() == (0,)


def test_a_result_file_that_cannot_be_deleted_does_not_hold_up_the_others(
    db: psycopg.Connection, database_url: str, tmp_path: Path
) -> None:
    folder, settings = filesystem_storage(database_url, tmp_path)
    stuck = folder / "ab" / "stuck.json.gz"
    (stuck / "inside").mkdir(parents=True)  # a non-empty directory in the file's place: unlink fails, even as root
    others = [folder / "cd" / f"{n}.json.gz" for n in range(3)]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    locations = [str(path.relative_to(folder)) for path in (stuck, *others)]
    db.execute(
        "INSERT INTO analysis_result_file_deletions (location, queued_at)"
        " SELECT location, now() - interval '1 hour' + n * interval '1 second'"
        " FROM unnest(%s::text[]) WITH ORDINALITY AS queued (location, n)",
        (locations,),
    )

    prune(database_url, settings)
    assert not any(path.exists() for path in others)  # the oldest entry failed; the rest were deleted
    row = db.execute(
        "SELECT location, attempts, last_error, next_attempt_at > now() + interval '4 minutes'"
        " FROM analysis_result_file_deletions"
    ).fetchall()
    assert len(row) == 1 and row[0][:2] == (locations[0], 1) and row[0][3], row
    assert "IsADirectoryError" in row[0][2]

    prune(database_url, settings)  # not due yet: not tried again
    assert db.execute("SELECT attempts FROM analysis_result_file_deletions").fetchone() == (1,)

    (stuck / "inside").rmdir()
    stuck.rmdir()
    db.execute("UPDATE analysis_result_file_deletions SET next_attempt_at = now()")
    prune(database_url, settings)  # due again, and gone by now: forgotten
    assert db.execute("SELECT count(*) FROM analysis_result_file_deletions").fetchone() == (0,)


def test_result_files_are_not_forgotten_while_the_storage_folder_is_away(
    db: psycopg.Connection, database_url: str, tmp_path: Path
) -> None:
    folder, settings = filesystem_storage(database_url, tmp_path)
    orphan = folder / "ef" / "orphan.json.gz"
    orphan.parent.mkdir()
    orphan.write_bytes(b"x")
    db.execute("INSERT INTO analysis_result_file_deletions (location) VALUES ('ef/orphan.json.gz')")

    folder.rename(tmp_path / "unmounted")  # the volume is away: the file is not "already deleted"
    prune(database_url, settings)
    assert db.execute("SELECT count(*) FROM analysis_result_file_deletions").fetchone() == (1,)
    (tmp_path / "unmounted").rename(folder)
    prune(database_url, settings)
    assert not orphan.exists()
    assert db.execute("SELECT count(*) FROM analysis_result_file_deletions").fetchone() == (0,)


def test_old_result_files_no_job_will_ever_record_are_swept(
    db: psycopg.Connection, database_url: str, tmp_path: Path
) -> None:
    folder, settings = filesystem_storage(database_url, tmp_path)
    analysis = create_analysis(db, script="export default function analyze() { return 1; }")
    done = submit(db, analysis, status="completed", attempts=1)
    running = submit(db, analysis, status="running", worker_id="w1", attempts=2)
    stranger = "0b6f0c1e-8a5e-4c49-9d7e-0f6a4bde2c01"  # no such job

    def result_file(location: str, *, days_old: float) -> Path:
        path = folder / location
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
        then = time.time() - days_old * 86400
        os.utime(path, (then, then))
        return path

    recorded = result_file(file_location(done, 1), days_old=2)
    db.execute(
        "INSERT INTO analysis_result_storage (job_id, size_bytes, checksum, backend, location)"
        " VALUES (%s, 1, 'x', 'filesystem', %s)",
        (done, file_location(done, 1)),
    )
    still_running = result_file(file_location(running, 2), days_old=2)  # its worker may still record it
    earlier_attempt = result_file(file_location(running, 1), days_old=2)  # that worker died before recording
    unknown = result_file(file_location(stranger, 1), days_old=2)
    recent = result_file(file_location(stranger, 2), days_old=0.5)  # a day's grace
    half_written = result_file(f"{stranger[:2]}/.{stranger}.3.json.gz.k2j4h1.tmp", days_old=2)
    not_ours = result_file(f"{stranger[:2]}/notes.txt", days_old=2)

    prune(database_url, settings)
    assert [path.exists() for path in (recorded, still_running, recent, not_ours)] == [True] * 4
    assert [path.exists() for path in (earlier_attempt, unknown, half_written)] == [False] * 3


def test_fenced_out_attempt_stores_nothing_and_a_later_attempt_replaces_the_stored_result(
    db: psycopg.Connection, database_url: str, tmp_path: Path
) -> None:
    folder, settings = filesystem_storage(database_url, tmp_path)
    analysis = create_analysis(db, script="export default function analyze() { return 1; }")
    job = submit(db, analysis, status="running", worker_id="w1", attempts=2)
    big = Outcome(JobStatus.COMPLETED, result_json=json.dumps("r" * 300_000))

    async def record(attempt: int, result: Outcome) -> str | None:
        store = ResultStore(settings)
        recorder = Recorder(database_url, "w1", Metrics(), store)
        writer = asyncio.create_task(recorder.run())
        try:
            prepared, stored = await store.prepare(job, attempt, result)
            recorded = await recorder.record(claimed_job(job, analysis, attempt), prepared, stored=stored)
            return None if recorded is None else recorded.status
        finally:
            writer.cancel()
            await recorder.close()

    assert asyncio.run(record(1, big)) is None  # attempt 1 lost its lease: attempt 2 owns the row
    assert storage_row(db, job) is None
    assert not any(folder.rglob("*.gz"))

    assert asyncio.run(record(2, big)) == "completed"
    first = storage_row(db, job)
    assert first is not None and (folder / first["location"]).is_file()

    # A later attempt (the job was re-run) replaces the result; the old file is queued for deletion.
    db.execute("UPDATE analysis_jobs SET status = 'running', attempts = 3 WHERE id = %s", (job,))
    newer = Outcome(JobStatus.COMPLETED, result_json=json.dumps("s" * 300_000))
    assert asyncio.run(record(3, newer)) == "completed"
    second = storage_row(db, job)
    assert second is not None and second["location"] != first["location"]
    assert second["checksum"] == checksum_of(json.dumps("s" * 300_000).encode())
    queued = db.execute("SELECT location FROM analysis_result_file_deletions").fetchall()
    assert queued == [(first["location"],)]


# Pure helpers.


def test_over_cap_result_is_refused_by_the_worker_too() -> None:
    settings = load_settings({}, {"DATABASE_URL": "postgresql://u@h/d", "RESULT_MAX_BYTES": "2048"})
    prepared, stored = asyncio.run(
        ResultStore(settings).prepare(
            "j", 1, Outcome(JobStatus.COMPLETED, result_json=json.dumps("é" * 2000, ensure_ascii=False), stdout="hi")
        )
    )
    assert stored is None
    assert (prepared.status, prepared.result_json, prepared.stdout) == ("failed", None, "hi")
    assert prepared.error_message == "result is 3.9 KiB, over the 2.0 KiB limit (RESULT_MAX_BYTES)"


def test_small_results_stay_inline_without_being_encoded() -> None:
    store = ResultStore(load_settings({}, {"DATABASE_URL": "postgresql://u@h/d", "RESULT_INLINE_MAX_BYTES": "1024"}))
    assert store.fits_inline('{"a": 1}')
    assert store.fits_inline("é" * 512)  # 1,024 bytes
    assert not store.fits_inline("é" * 513)
    assert not store.fits_inline("x" * 1025)


def test_python_stdout_keeps_the_last_line_apart_as_the_result() -> None:
    stdout = _Stdout(limit=20, result_limit=1000)
    for chunk in (b"log\n", b"  ", b"[1,", b"2]\n", b"\n"):
        stdout.feed(chunk)
    assert stdout.result_json() == "[1,2]" and stdout.fits()

    large = _Stdout(limit=20, result_limit=1000)
    large.feed(b"starting\n[" + b"7," * 100 + b"7]\n")
    assert large.result_json() is not None and not large.overflowed
    assert large.text(last_is_result=True).startswith("starting\n[the last line (204 bytes) is the job's result")

    flood = _Stdout(limit=20, result_limit=1000)
    flood.feed(b"x" * 15 + b"\n" + b"y" * 15 + b"\n[1]\n")
    assert flood.overflowed  # the log lines alone are over the limit, whatever the last line is

    runaway = _Stdout(limit=20, result_limit=1000)
    runaway.feed(b"z" * 2000)
    assert runaway.result_overflowed


def test_stored_locations_cannot_escape_the_storage_dir(tmp_path: Path) -> None:
    assert resolve_location(tmp_path, "ab/ab12.1.json.gz") == tmp_path.resolve() / "ab/ab12.1.json.gz"
    for hostile in ("/etc/passwd", "../outside.json.gz", "ab/../../outside.json.gz"):
        with pytest.raises(ResultNotAvailable):
            resolve_location(tmp_path, hostile)


def test_damaged_stored_result_is_detected_before_its_last_bytes(tmp_path: Path) -> None:
    data = b'"' + b"q" * 3_000_000 + b'"'
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab/file.json.gz").write_bytes(gzip.compress(data))
    info = ResultInfo(
        job_id="ab", size_bytes=len(data), checksum=checksum_of(data + b" "), content_type="application/json",
        backend="filesystem", compression="gzip", location="ab/file.json.gz", inline=None,
    )  # fmt: skip

    async def read() -> bytes:
        received = b""
        try:
            async for piece in read_result(info, None, tmp_path):  # type: ignore[arg-type]
                received += piece
        except StoredResultCorrupt:
            return received
        raise AssertionError("damage not detected")

    received = asyncio.run(read())
    assert 0 < len(received) < len(data)
