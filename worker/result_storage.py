"""Large results: kept out of the job row, gzip-compressed, with their size, checksum and content type.

A result over ``RESULT_INLINE_MAX_BYTES`` is stored in ``analysis_result_storage``
(in its ``content`` column, or as a file under ``RESULT_STORAGE_DIR``), and the
job row's ``result`` holds a small stub pointing at it::

    {"stored": true, "size_bytes": 5242880, "checksum": "sha256:<hex>",
     "content_type": "application/json", "href": "/jobs/<id>/result"}

A result over ``RESULT_MAX_BYTES`` fails its job instead. ``size_bytes`` and
``checksum`` describe the uncompressed result, exactly as the script produced
it (UTF-8 JSON). The storage row is written in the same transaction as the job
row and fenced the same way (see ``sql/store_results.sql``).

Reading back (``read_result``) streams the result in slices, inline results
too, so a large one is never held whole in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import os
import re
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors
from psycopg.rows import dict_row

from worker.config import Settings
from worker.model import Outcome
from worker.queries import QUERIES
from worker.runtimes.protocol import format_size, result_too_large

CONTENT_TYPE = "application/json"
READ_CHUNK_BYTES = 1 << 20
_COMPRESS_LEVEL = 6  # zlib's default: most of level 9's ratio at a fraction of its time


class ResultNotAvailable(LookupError):
    """The job does not exist, has no result, or its stored result cannot be read; the message says which."""


class StoredResultCorrupt(RuntimeError):
    """A stored result's bytes do not match its recorded size or checksum."""


class StoredResultGone(ResultNotAvailable):
    """The job has a stored result, but its file or row is gone (a storage failure, not bad input)."""


@dataclass(frozen=True, slots=True)
class StoredResult:
    """A result written (or about to be written) outside its job row."""

    job_id: str
    attempt: int
    size_bytes: int
    checksum: str
    backend: str
    compressed_bytes: int
    content: bytes | None  # the gzip data (postgres backend)
    location: str | None  # the file, relative to RESULT_STORAGE_DIR (filesystem backend)

    def stub(self) -> dict[str, Any]:
        """What the job row's ``result`` holds instead of the result."""
        return {
            "stored": True,
            "size_bytes": self.size_bytes,
            "checksum": self.checksum,
            "content_type": CONTENT_TYPE,
            "href": f"/jobs/{self.job_id}/result",
        }


def encode_result(result_json: str) -> bytes:
    """The result as UTF-8; lone surrogates (which UTF-8 cannot hold) become U+FFFD."""
    try:
        return result_json.encode("utf-8")
    except UnicodeEncodeError:
        return result_json.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")


def checksum_of(data: bytes) -> str:
    """``sha256:<hex>`` of the bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_location(job_id: str, attempt: int) -> str:
    """Where a result file lives, relative to RESULT_STORAGE_DIR: one name per attempt, never reused."""
    return f"{job_id[:2]}/{job_id}.{attempt}.json.gz"


_RESULT_FILE = re.compile(r"(?P<job_id>[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})\.(?P<attempt>\d+)\.json\.gz")
_TEMPORARY_FILE = re.compile(r"\..+\.tmp")  # what _write_file_atomically leaves when its process dies


@dataclass(frozen=True, slots=True)
class FoundFile:
    """A result file on disk, as file_location() named it."""

    location: str
    job_id: str
    attempt: int


def old_files(storage_dir: Path, cutoff: float, limit: int) -> tuple[list[FoundFile], list[str]]:
    """Result files, and locations of leftover temporary files, not modified since ``cutoff`` (a ``time.time()``).

    At most ``limit`` of them; anything else in the folder is left alone.
    """
    found: list[FoundFile] = []
    temporary: list[str] = []
    with os.scandir(storage_dir) as folders:
        for folder in folders:
            if not folder.is_dir(follow_symlinks=False):
                continue
            with os.scandir(folder.path) as entries:
                for entry in entries:
                    if len(found) + len(temporary) >= limit:
                        return found, temporary
                    if not entry.is_file(follow_symlinks=False) or entry.stat().st_mtime > cutoff:
                        continue
                    location = f"{folder.name}/{entry.name}"
                    if match := _RESULT_FILE.fullmatch(entry.name):
                        found.append(FoundFile(location, match["job_id"], int(match["attempt"])))
                    elif _TEMPORARY_FILE.fullmatch(entry.name):
                        temporary.append(location)
    return found, temporary


def resolve_location(storage_dir: Path, location: str) -> Path:
    """The file for a ``location`` read from the database, which must stay inside ``storage_dir``.

    Raises StoredResultGone for an absolute path or one that escapes the folder.
    """
    root = storage_dir.resolve()
    path = (root / location).resolve()
    if Path(location).is_absolute() or not path.is_relative_to(root):
        raise StoredResultGone(f"stored result location {location!r} is outside RESULT_STORAGE_DIR")
    return path


class ResultStore:
    """Decides where a result goes and prepares large ones for the recorder."""

    def __init__(self, settings: Settings) -> None:
        self.backend = settings.result_storage
        self.storage_dir = settings.result_storage_dir
        self._inline_max = settings.result_inline_max_bytes
        self._max = settings.result_max_bytes

    def fits_inline(self, result_json: str) -> bool:
        """True when the result stays in the job row; small results need one ``len()`` only."""
        if len(result_json) * 4 <= self._inline_max:  # no character takes more than 4 bytes
            return True
        return len(result_json) <= self._inline_max and len(encode_result(result_json)) <= self._inline_max

    async def prepare(self, job_id: str, attempt: int, outcome: Outcome) -> tuple[Outcome, StoredResult | None]:
        """Apply the hard cap, and compress (and, for files, write) a large result.

        Returns the outcome to record (its ``result_json`` replaced by the stub
        when the result is stored outside the row, or a failure when it is
        over the cap or could not be stored) and the stored result, if any.
        Never raises for a storage fault: the job fails, retryably.
        """
        result_json = outcome.result_json
        if result_json is None or self.fits_inline(result_json):
            return outcome, None
        data = encode_result(result_json)
        if len(data) > self._max:
            return outcome.failed(result_too_large(len(data), self._max)), None
        if len(data) <= self._inline_max:
            return outcome, None
        try:
            stored = await asyncio.to_thread(self._compress_and_place, job_id, attempt, data)
        except OSError as exc:
            message = f"the result ({format_size(len(data))}) could not be stored: {exc.strerror or exc}"
            return outcome.failed(message, retryable=True), None  # not the script's fault
        return outcome.with_result(json.dumps(stored.stub(), separators=(",", ":"))), stored

    def _compress_and_place(self, job_id: str, attempt: int, data: bytes) -> StoredResult:
        """Compress and hash (in a thread: both release the GIL); write the file for the filesystem backend."""
        compressed = gzip.compress(data, compresslevel=_COMPRESS_LEVEL, mtime=0)
        location = None
        if self.backend == "filesystem":
            assert self.storage_dir is not None
            location = file_location(job_id, attempt)
            _write_file_atomically(self.storage_dir / location, compressed)
        return StoredResult(
            job_id=job_id,
            attempt=attempt,
            size_bytes=len(data),
            checksum=checksum_of(data),
            backend=self.backend,
            compressed_bytes=len(compressed),
            content=compressed if location is None else None,
            location=location,
        )

    def discard(self, stored: StoredResult) -> None:
        """Remove the file of a result that was not recorded (its write was fenced off or failed)."""
        if stored.location is not None and self.storage_dir is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.storage_dir / stored.location).unlink()

    def delete_files(self, locations: list[str], *, unless_modified_since: float | None = None) -> dict[str, str]:
        """Delete result files no row refers to any more; missing ones are fine.

        With ``unless_modified_since`` (a ``time.time()``), a file written since
        is kept: its name was taken again, by a new attempt.
        Returns the files that exist but could not be deleted, with the reason.
        """
        assert self.storage_dir is not None
        failed: dict[str, str] = {}
        for location in locations:
            try:
                path = resolve_location(self.storage_dir, location)
                if unless_modified_since is not None and path.stat().st_mtime > unless_modified_since:
                    continue
                path.unlink()
            except (FileNotFoundError, ResultNotAvailable):
                continue
            except OSError as exc:
                failed[location] = f"{type(exc).__name__}: {exc.strerror or exc}"
        return failed


def _write_file_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file, fsync, rename into place, fsync the folder: a file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


@dataclass(frozen=True, slots=True)
class ResultInfo:
    """What a reader needs to know before streaming a job's result."""

    job_id: str
    size_bytes: int
    checksum: str
    content_type: str
    backend: str | None  # None: the result is inline, in the job row
    compression: str | None
    location: str | None
    inline: bytes | None


async def find_result(conn: psycopg.AsyncConnection, job_id: str) -> ResultInfo:
    """Look up a job's result: inline in its row, or stored outside it.

    Raises ResultNotAvailable for an unknown job (or malformed id) and for a job without a result.
    """
    try:
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(QUERIES["get_job_result"], {"id": job_id})
            row = await cur.fetchone()
    except errors.InvalidTextRepresentation:
        raise ResultNotAvailable(f"{job_id!r} is not a job id (a UUID)") from None
    if row is None:
        raise ResultNotAvailable(f"job {job_id} does not exist")
    if row["result"] is None:
        raise ResultNotAvailable(f"job {job_id} has no result (status {row['status']})")
    job_id = str(row["id"])
    if row["checksum"] is not None and _is_stub_of(row["result"], row["checksum"]):
        return ResultInfo(
            job_id=job_id,
            size_bytes=row["size_bytes"],
            checksum=row["checksum"],
            content_type=row["content_type"],
            backend=row["backend"],
            compression=row["compression"],
            location=row["location"],
            inline=None,
        )
    # An inline result (a storage row left by an earlier run of the job no longer counts).
    inline = row["result"].encode("utf-8")
    return ResultInfo(
        job_id=job_id,
        size_bytes=len(inline),
        checksum=checksum_of(inline),
        content_type=CONTENT_TYPE,
        backend=None,
        compression=None,
        location=None,
        inline=inline,
    )


def _is_stub_of(result_text: str, checksum: str) -> bool:
    """True when the job's result is the stub of the stored result with this checksum."""
    if len(result_text) > 1024:
        return False  # a stub is small; this is a real result
    stub = json.loads(result_text)
    return isinstance(stub, dict) and stub.get("stored") is True and stub.get("checksum") == checksum


ConnectionSource = Callable[[], AbstractAsyncContextManager[psycopg.AsyncConnection]]


async def read_result(info: ResultInfo, connection: ConnectionSource, storage_dir: Path | None) -> AsyncIterator[bytes]:
    """Yield the result's bytes in slices of about READ_CHUNK_BYTES, exactly as stored.

    ``connection()`` lends a connection for each slice read from PostgreSQL, so
    a slow reader holds none in between. The size and checksum are verified
    as the bytes go by; the last slice is held back until they match, so a
    reader never receives a complete-looking corrupt result: StoredResultCorrupt
    is raised instead. Raises ResultNotAvailable when the stored data is gone.
    """
    if info.inline is not None:
        yield info.inline
        return
    digest = hashlib.sha256()
    size = 0
    held = b""
    async for piece in _decompressed(info, _compressed_slices(info, connection, storage_dir)):
        digest.update(piece)
        size += len(piece)
        if held:
            yield held
        held = piece
    if size != info.size_bytes or "sha256:" + digest.hexdigest() != info.checksum:
        raise StoredResultCorrupt(
            f"stored result of job {info.job_id} is damaged: {size} bytes with sha256:{digest.hexdigest()}, "
            f"expected {info.size_bytes} bytes with {info.checksum}"
        )
    if held:
        yield held


async def _decompressed(info: ResultInfo, slices: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Undo the stored compression incrementally, never producing more than READ_CHUNK_BYTES at once."""
    if info.compression == "none":
        async for piece in slices:
            yield piece
        return
    inflater = zlib.decompressobj(wbits=31)  # gzip framing
    try:
        async for piece in slices:
            data = piece
            while data:
                out = inflater.decompress(data, READ_CHUNK_BYTES)
                data = inflater.unconsumed_tail
                if out:
                    yield out
        out = inflater.flush()
    except zlib.error as exc:
        raise StoredResultCorrupt(f"stored result of job {info.job_id} is damaged: {exc}") from None
    if out:
        yield out
    if not inflater.eof:
        raise StoredResultCorrupt(f"stored result of job {info.job_id} is damaged: the gzip data is truncated")


async def _compressed_slices(
    info: ResultInfo, connection: ConnectionSource, storage_dir: Path | None
) -> AsyncIterator[bytes]:
    if info.backend == "filesystem":
        if storage_dir is None or info.location is None:
            raise ResultNotAvailable(
                f"the result of job {info.job_id} is stored in a file: set RESULT_STORAGE_DIR to read it"
            )
        path = resolve_location(storage_dir, info.location)
        try:
            file = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError:
            raise StoredResultGone(f"the result file of job {info.job_id} ({info.location}) is missing") from None
        try:
            while piece := await asyncio.to_thread(file.read, READ_CHUNK_BYTES):
                yield piece
        finally:
            file.close()
        return
    offset = 1  # substring() counts from 1
    while True:
        async with connection() as conn:
            cur = await conn.execute(
                QUERIES["read_stored_result_slice"],
                {"id": info.job_id, "checksum": info.checksum, "offset": offset, "length": READ_CHUNK_BYTES},
                binary=True,
            )
            row = await cur.fetchone()
        if row is None:
            raise StoredResultGone(f"the stored result of job {info.job_id} was replaced or deleted while being read")
        piece: bytes = row[0]
        if piece:
            yield piece
        if len(piece) < READ_CHUNK_BYTES:
            return
        offset += len(piece)
