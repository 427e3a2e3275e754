"""The demo analyses that ``analysis-executor dev`` installs (idempotently)."""

from __future__ import annotations

from pathlib import Path

import psycopg

DEMO_PROJECT = "demo"
DEMO_JS_TITLE = "Demo: summarise numbers (JavaScript)"
DEMO_PY_TITLE = "Demo: summarise numbers (Python)"
DEMO_SCRIPT_NAME = "summarise_numbers"

DEMO_JS = """\
export default function analyze(params, ctx) {
  const values = params.values || [1, 2, 3, 4];
  const sum = values.reduce((a, b) => a + b, 0);
  console.log(`job ${ctx.jobId}: ${values.length} values`);
  return { count: values.length, sum, mean: sum / values.length };
}
"""

DEMO_SCRIPT = '''\
"""Demo analytics script: reads the job parameters as JSON on stdin."""
import json
import statistics
import sys

params = json.load(sys.stdin)
values = params.get("values", [1, 2, 3, 4])
print(f"summarising {len(values)} values; argv={sys.argv[1:]}", file=sys.stderr)
print(json.dumps({"count": len(values), "mean": statistics.fmean(values), "stdev": statistics.pstdev(values)}))
'''


def install_demo(conn: psycopg.Connection, scripts_dir: Path) -> dict[str, str]:
    """Create the demo script file and both demo analyses if missing; return {title: id}."""
    scripts_dir.mkdir(parents=True, exist_ok=True)
    script = scripts_dir / f"{DEMO_SCRIPT_NAME}.py"
    if not script.exists():
        script.write_text(DEMO_SCRIPT)
    ids = {}
    for title, runtime, content, name in (
        (DEMO_JS_TITLE, "javascript", DEMO_JS, None),
        (DEMO_PY_TITLE, "python", None, DEMO_SCRIPT_NAME),
    ):
        row = conn.execute(
            "SELECT id FROM analyses WHERE project_id = %s AND title = %s", (DEMO_PROJECT, title)
        ).fetchone()
        if row is None:
            row = conn.execute(
                "INSERT INTO analyses (project_id, title, runtime, script_content, script_name)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (DEMO_PROJECT, title, runtime, content, name),
            ).fetchone()
        assert row is not None
        ids[title] = str(row[0])
    return ids
