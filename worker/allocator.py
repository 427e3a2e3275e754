"""The memory allocator of the pool's child processes.

Every JavaScript job gets a fresh QuickJS context, built out of thousands of
small allocations and freed again a moment later. mimalloc serves that
pattern with about a quarter fewer instructions than glibc's malloc, which
is most of a trivial job's cost (see the README's performance section). It
comes as a shared library in the ``cmeel-mimalloc`` package and is preloaded
(``LD_PRELOAD``) into the pool children only: the worker process keeps the
system allocator, and a Python analysis script gets an environment of its
own without it.

``POOL_ALLOCATOR``: ``auto`` (mimalloc when its library is installed, else
the system's), ``mimalloc`` (refuse to start without it) or ``system``.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ALLOCATORS = ("auto", "mimalloc", "system")
_DISTRIBUTION = "cmeel-mimalloc"


class AllocatorUnavailable(RuntimeError):
    """POOL_ALLOCATOR=mimalloc, but its library is not installed."""


def mimalloc_library() -> Path | None:
    """The installed mimalloc shared library, or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        files = importlib.metadata.files(_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name.startswith("libmimalloc.so"):
            path = Path(str(entry.locate())).resolve()
            if path.is_file():
                return path
    return None


def child_preload(setting: str) -> Path | None:
    """The library to preload into pool children for ``setting``; None for the system allocator."""
    if setting == "system":
        return None
    library = mimalloc_library()
    if library is None and setting == "mimalloc":
        raise AllocatorUnavailable(
            f"POOL_ALLOCATOR=mimalloc, but the {_DISTRIBUTION} package's library is not installed "
            "(pip install cmeel-mimalloc, or use POOL_ALLOCATOR=auto or system)"
        )
    return library


def allocator_in_use() -> str:
    """``mimalloc`` if this process runs on it, else ``system`` (asked by a child of itself)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return "mimalloc" if any("libmimalloc" in line for line in maps) else "system"
    except OSError:
        return "system"
