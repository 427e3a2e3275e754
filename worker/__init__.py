"""analysis-executor: runs analysis jobs stored in PostgreSQL."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("analysis-executor")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
