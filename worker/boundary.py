"""The boundary between the worker and the scripts it runs.

What a whitelisted Python script must not reach: the worker's secrets (its
``DATABASE_URL`` with the password, the API token) and the worker's processes.

- Pool children start with an allow-listed environment: they never hold a
  secret, so there is none in ``/proc/<pool child>/environ`` to read.
- The worker and its pool children are not dumpable (``PR_SET_DUMPABLE`` 0):
  ``/proc/<pid>/environ``, ``mem`` and ptrace are closed to other processes of
  the same uid.
- Scripts run with ``PR_SET_NO_NEW_PRIVS`` (no setuid binary gives them more)
  and, when the worker runs as root, under another uid (``ANALYTICS_RUN_AS_USER``,
  default ``nobody``) with ``RLIMIT_NPROC``: they cannot signal the worker or
  read its files, and a fork bomb stops at the limit.

It is not a container: a script still shares the pod's network, file system
(as that uid sees it) and kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
DEFAULT_SCRIPT_USER = "nobody"
DEFAULT_SCRIPT_MAX_PROCESSES = 64
_PROBE_TIMEOUT_SECONDS = 15
_PROBE = "import os, sys; os.path.isdir(sys.argv[1]) and os.listdir(sys.argv[1])"

# What a pool child may inherit: nothing that configures the worker (it gets its
# settings with each job), so nothing secret.
_CHILD_VARIABLES = (
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONIOENCODING",
    "PYTHONHASHSEED",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
)


class ScriptUserUnusable(RuntimeError):
    """ANALYTICS_RUN_AS_USER names a user the scripts cannot run as."""


@dataclass(frozen=True, slots=True)
class ScriptUser:
    """Who scripts run as: a uid to switch to, or the worker's own (``uid`` None)."""

    name: str
    uid: int | None = None
    gid: int | None = None
    max_processes: int | None = None  # RLIMIT_NPROC, only for a uid of the scripts' own

    def as_job_fields(self) -> dict[str, int | None]:
        return {"run_as_uid": self.uid, "run_as_gid": self.gid, "max_processes": self.max_processes}


def child_environment(environ: Mapping[str, str], preload: Path | None) -> dict[str, str]:
    """The environment of a pool child: the allow-listed variables, plus the allocator preload."""
    env = {name: environ[name] for name in _CHILD_VARIABLES if name in environ}
    env.update({name: value for name, value in environ.items() if name.startswith("LC_")})
    if preload is not None:
        existing = env.get("LD_PRELOAD", "").strip()
        env["LD_PRELOAD"] = f"{preload}:{existing}" if existing else str(preload)
    return env


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def make_undumpable() -> None:
    """Close this process's /proc files and ptrace to other processes of its uid (Linux)."""
    _prctl(_PR_SET_DUMPABLE, 0)


def forbid_new_privileges() -> None:
    """No setuid or file-capability binary can raise this process's privileges again (Linux)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def is_dumpable() -> bool:
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL(None, use_errno=True).prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE
    return True


def resolve_script_user(setting: str | None, python: str, scripts_dir: Path) -> ScriptUser:
    """Who scripts run as, checked by running the interpreter as that user once.

    As root the default is ``nobody``: if it cannot run ``python`` on the scripts
    folder, a warning says why and scripts run as root, as before. A user named
    explicitly must work, or this raises ScriptUserUnusable.
    """
    me = _user_name(os.geteuid())
    if os.geteuid() != 0:
        if setting and setting != me:
            raise ScriptUserUnusable(
                f"ANALYTICS_RUN_AS_USER={setting}: only a worker running as root can run scripts as another user"
                f" (this one runs as {me})"
            )
        return ScriptUser(me)
    name = setting or DEFAULT_SCRIPT_USER
    if name == me:
        return ScriptUser(me)
    try:
        entry = pwd.getpwnam(name)
        _probe(entry.pw_uid, entry.pw_gid, python, scripts_dir)
    except (KeyError, OSError, subprocess.SubprocessError, ScriptUserUnusable) as exc:
        reason = f"no such user {name!r}" if isinstance(exc, KeyError) else str(exc)
        if setting:
            raise ScriptUserUnusable(f"ANALYTICS_RUN_AS_USER={setting}: {reason}") from None
        log.warning(
            "scripts run as root: the default script user %r cannot run them (%s); set ANALYTICS_RUN_AS_USER"
            " to a user that can read ANALYTICS_PYTHON and ANALYTICS_SCRIPTS_DIR, or run the worker as non-root",
            name,
            reason,
        )
        return ScriptUser(me)
    return ScriptUser(name, entry.pw_uid, entry.pw_gid, DEFAULT_SCRIPT_MAX_PROCESSES)


def _probe(uid: int, gid: int, python: str, scripts_dir: Path) -> None:
    """Run the interpreter as ``uid`` and list the scripts folder, or raise saying what failed."""
    probe = subprocess.run(
        [
            python,
            "-I",
            "-c",
            "import os, sys; os.path.isdir(sys.argv[1]) and os.listdir(sys.argv[1])",
            str(scripts_dir),
        ],
        user=uid,
        group=gid,
        extra_groups=[],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=_PROBE_TIMEOUT_SECONDS,
        check=False,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"])[-1]
        raise ScriptUserUnusable(f"running {python} on {scripts_dir} as uid {uid} failed: {last}")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
