"""Run one JavaScript analysis in a fresh QuickJS context (inside a pool child).

The script is an ES module whose default export is ``analyze(params, ctx)``
(the one-argument form works too). The context has no host objects at all:
no ``require``, ``process``, ``std``, ``os`` or ``fetch``; ``console`` is
implemented in JavaScript and writes to a capped buffer.

The engine's own limits (memory, stack, CPU time) turn most runaway scripts
into clean errors; the pool's wall-clock kill of this process is the limit
of last resort (a catastrophic regex ignores the engine's time limit, and a
50,000-deep ``JSON.stringify`` crashes the engine outright).
"""

from __future__ import annotations

import json
import re
from typing import Any

import quickjs

from worker.runtimes.protocol import outcome

DEFAULT_EXPORT = "__analysis_default__"
_MAX_STACK_LINES = 15

_EXPORT_DEFAULT_DECLARATION = re.compile(
    r"\bexport\s+default\s+(?=(?:async\s+)?function\s*\*?\s*([A-Za-z_$][\w$]*)\s*\()"
)
_EXPORT_DEFAULT = re.compile(r"\bexport\s+default\s+")

# console.* writes into a buffer capped at `limit` characters; the caller
# reads it out once, as JSON, after the script ran.
_PRELUDE = r"""
(function (limit) {
  const out = { stdout: "", stderr: "", used: 0, overflow: false };
  function show(value) {
    if (typeof value === "string") return value;
    if (value instanceof Error) return String(value.stack ? value + "\n" + value.stack : value);
    try {
      const text = JSON.stringify(value);
      return text === undefined ? String(value) : text;
    } catch (e) {
      return String(value);
    }
  }
  function writer(stream) {
    return function () {
      if (out.overflow) return;
      const line = Array.prototype.map.call(arguments, show).join(" ") + "\n";
      if (out.used + line.length > limit) {
        out[stream] += line.slice(0, Math.max(0, limit - out.used));
        out.used = limit;
        out.overflow = true;
        return;
      }
      out[stream] += line;
      out.used += line.length;
    };
  }
  const log = writer("stdout");
  const warn = writer("stderr");
  Object.defineProperty(globalThis, "console", {
    value: Object.freeze({ log: log, info: log, debug: log, warn: warn, error: warn, trace: warn }),
    writable: false, enumerable: false, configurable: false,
  });
  Object.defineProperty(globalThis, "__analysis_output__", {
    value: function () { return JSON.stringify(out); },
    writable: false, enumerable: false, configurable: false,
  });
})(%d);
"""

_CALL = r"""
(function () {
  const analyze = globalThis.__analysis_default__;
  if (typeof analyze !== "function") {
    throw new TypeError(
      "the script has no default export function: write `export default function analyze(params, ctx) { ... }`");
  }
  const value = analyze(JSON.parse(__job_params__), JSON.parse(__job_context__));
  if (value !== null && (typeof value === "object" || typeof value === "function")
      && typeof value.then === "function") {
    const state = { settled: false };
    globalThis.__analysis_state__ = state;
    value.then(function (v) { state.settled = true; state.value = v; },
               function (e) { state.settled = true; state.failed = true; state.error = e; });
    return "pending";
  }
  globalThis.__analysis_state__ = { settled: true, value: value };
  return "settled";
})()
"""

_SETTLED = "globalThis.__analysis_state__.settled"

_RETHROW = r"""
(function () {
  const state = globalThis.__analysis_state__;
  if (state.failed) throw state.error;
  return 0;
})()
"""

# Serialised apart from the call so a non-serialisable result is reported as such.
_RESULT = r"""
(function () {
  const state = globalThis.__analysis_state__;
  const text = JSON.stringify(state.value === undefined ? null : state.value);
  return text === undefined ? "null" : text;
})()
"""


def expose_default_export(source: str) -> str:
    """Rewrite the module so its default export lands on ``globalThis``.

    ``Context.module()`` evaluates a module but gives no access to its
    exports, so ``export default`` becomes an assignment we can read back.
    A script without a default export may still define ``analyze``.
    """
    declaration = _EXPORT_DEFAULT_DECLARATION.search(source)
    if declaration:
        name = declaration.group(1)
        body = source[: declaration.start()] + source[declaration.end() :]
        return f"{body}\n;globalThis.{DEFAULT_EXPORT} = {name};\n"
    rewritten, count = _EXPORT_DEFAULT.subn(f"globalThis.{DEFAULT_EXPORT} = ", source, count=1)
    if count:
        return rewritten
    return f'{source}\n;if (typeof analyze === "function") globalThis.{DEFAULT_EXPORT} = analyze;\n'


def run_javascript(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job["source"]`` and return an outcome (never raises for script faults)."""
    timeout_ms: int = job["timeout_ms"]
    memory_limit_mb: int = job["memory_limit_mb"]
    output_limit: int = job["output_max_bytes"]
    context = quickjs.Context()
    context.set_memory_limit(memory_limit_mb * 1024 * 1024)
    context.set_max_stack_size(job["stack_limit_kb"] * 1024)
    context.set_time_limit(timeout_ms / 1000)
    try:
        context.eval(_PRELUDE % output_limit)
        context.set("__job_params__", job["parameters_json"])
        context.set("__job_context__", job["context_json"])
        try:
            context.module(expose_default_export(job["source"]))
        except quickjs.JSException as exc:
            return _failure(context, exc, job, stage="load")
        try:
            state = context.eval(_CALL)
            if state == "pending":
                while context.execute_pending_job():
                    pass
                if not context.eval(_SETTLED):
                    return _with_output(
                        context,
                        "failed",
                        output_limit,
                        error_message="the promise returned by analyze() never settled "
                        "(there are no timers or I/O in the sandbox to resolve it)",
                    )
                context.eval(_RETHROW)
        except quickjs.JSException as exc:
            return _failure(context, exc, job, stage="run")
        try:
            result_json = context.eval(_RESULT)
        except quickjs.JSException as exc:
            return _failure(context, exc, job, stage="result")
        result_bytes = len(result_json.encode("utf-8", "surrogatepass"))
        if result_bytes > job["result_max_bytes"]:
            return _with_output(
                context,
                "failed",
                output_limit,
                error_message=f"result is {_size(result_bytes)}, over the {_size(job['result_max_bytes'])} "
                "limit (RESULT_MAX_BYTES)",
            )
        return _with_output(context, "completed", output_limit, result_json=result_json)
    finally:
        del context


def _failure(context: quickjs.Context, exc: quickjs.JSException, job: dict[str, Any], *, stage: str) -> dict[str, Any]:
    text = _trim_stack(str(exc))
    limit = job["output_max_bytes"]
    if isinstance(exc, quickjs.StackOverflow) or text.startswith("InternalError: stack overflow"):
        message = f"stack overflow: recursion too deep for the {job['stack_limit_kb']} KB stack limit\n{text}"
        return _with_output(context, "failed", limit, error_message=message)
    if text.startswith("InternalError: out of memory"):
        message = f"script exceeded the {job['memory_limit_mb']} MB memory limit (out of memory)"
        return _with_output(context, "failed", limit, error_message=message)
    if text.startswith("InternalError: interrupted"):
        message = f"script exceeded the {job['timeout_ms']} ms time limit"
        return _with_output(context, "timeout", limit, error_message=message)
    if stage == "load" and text.startswith("SyntaxError"):
        return _with_output(context, "failed", limit, error_message=f"syntax error in script: {text}")
    if stage == "result":
        return _with_output(context, "failed", limit, error_message=f"result is not JSON-serialisable: {text}")
    return _with_output(context, "failed", limit, error_message=text)


def _with_output(
    context: quickjs.Context,
    status: str,
    output_limit: int,
    *,
    result_json: str | None = None,
    error_message: str | None = None,
) -> dict[str, Any]:
    try:
        captured = json.loads(context.eval("__analysis_output__()"))
        stdout, stderr, overflow = captured["stdout"], captured["stderr"], captured["overflow"]
    except quickjs.JSException:  # the context is out of memory: output is lost, the verdict is not
        stdout, stderr, overflow = "", "", False
    if overflow:
        marker = f"\n[output truncated: over the {_size(output_limit)} limit (JOB_OUTPUT_MAX_BYTES)]\n"
        stderr += marker
        if status == "completed":
            status, result_json = "failed", None
            error_message = f"script output exceeded the {_size(output_limit)} limit (JOB_OUTPUT_MAX_BYTES)"
    return outcome(status, result_json=result_json, error_message=error_message, stdout=stdout, stderr=stderr)


def _trim_stack(text: str) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) <= _MAX_STACK_LINES:
        return "\n".join(lines)
    hidden = len(lines) - _MAX_STACK_LINES
    return "\n".join([*lines[:_MAX_STACK_LINES], f"    ... {hidden} more stack frames"])


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} bytes"
