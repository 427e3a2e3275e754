"""Messages between the pool (parent) and its child processes.

A frame is an 8-byte big-endian length followed by that many bytes of UTF-8
JSON. Parent -> child: one job message. Child -> parent: zero or more events
(``{"event": ...}``), then exactly one outcome (``{"status": ...}``).

Outcome keys: ``status`` (completed | failed | timeout), ``result_json``
(JSON text or None), ``error_message``, ``stdout``, ``stderr``, ``exit_code``.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

HEADER = struct.Struct(">Q")
MAX_FRAME_BYTES = 1 << 31


def encode_frame(message: dict[str, Any]) -> bytes:
    """Serialise one message into a frame."""
    payload = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    return HEADER.pack(len(payload)) + payload


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parse a frame's payload (without its header)."""
    message = json.loads(payload.decode("utf-8", "surrogatepass"))
    if not isinstance(message, dict):
        raise ValueError("frame payload is not a JSON object")
    return message


def read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    """Blocking read of one frame; None at end of stream."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {length} bytes is too large")
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return decode_payload(payload)


def write_frame(stream: BinaryIO, message: dict[str, Any]) -> None:
    """Blocking write of one frame, flushed."""
    stream.write(encode_frame(message))
    stream.flush()


def format_size(n: int) -> str:
    """A byte count for people: ``512 bytes``, ``3.5 KiB``, ``16.0 MiB``."""
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"


def result_too_large(size_bytes: int | None, limit_bytes: int) -> str:
    """The error_message of a job whose result is over ``RESULT_MAX_BYTES`` (size None: not known exactly)."""
    if size_bytes is None:
        return f"result is over the {format_size(limit_bytes)} limit (RESULT_MAX_BYTES)"
    return f"result is {format_size(size_bytes)}, over the {format_size(limit_bytes)} limit (RESULT_MAX_BYTES)"


def outcome(
    status: str,
    *,
    result_json: str | None = None,
    error_message: str | None = None,
    stdout: str = "",
    stderr: str = "",
    exit_code: int | None = None,
) -> dict[str, Any]:
    """Build an outcome message."""
    return {
        "status": status,
        "result_json": result_json,
        "error_message": error_message,
        "stdout": stdout,
        "stderr": stderr,
        "exit_code": exit_code,
    }
