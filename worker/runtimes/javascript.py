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
import time
from typing import Any

import quickjs

from worker.runtimes.protocol import format_size, outcome, result_too_large

DEFAULT_EXPORT = "__analysis_default__"
_MAX_STACK_LINES = 15

_EXPORT_DEFAULT_DECLARATION = re.compile(
    r"\bexport\s+default\s+(?=(?:async\s+)?function\s*\*?\s*([A-Za-z_$][\w$]*)\s*\()"
)
_EXPORT_DEFAULT = re.compile(r"\bexport\s+default\s+")

# The wrapper code is compiled again for every job (every job gets a fresh
# context), so it is kept short: its parse time is most of our overhead.

# console.* writes into a buffer capped at %(limit)d characters (o: stdout,
# e: stderr, n: used, x: overflowed), read back once after the script ran.
_CONSOLE = (
    'var __o={o:"",e:"",n:0,x:0};'
    'function __s(v){if(typeof v=="string")return v;if(v instanceof Error)return v+"\\n"+v.stack;'
    "try{var t=JSON.stringify(v);return t===undefined?String(v):t}catch(e){return String(v)}}"
    'function __w(k,a){if(__o.x)return;var s=Array.prototype.map.call(a,__s).join(" ")+"\\n";'
    "if(__o.n+s.length>%(limit)d){__o[k]+=s.slice(0,Math.max(0,%(limit)d-__o.n));__o.n=%(limit)d;__o.x=1}"
    "else{__o[k]+=s;__o.n+=s.length}}"
    'var __l=function(){__w("o",arguments)},__e=function(){__w("e",arguments)};'
    "globalThis.console={log:__l,info:__l,debug:__l,warn:__e,error:__e,trace:__e};"
)
_OUTPUT = "JSON.stringify(__o)"

# Call the default export; answer its JSON-serialised result, or the bare
# word pending (never valid JSON) when it returned a promise.
_CALL = (
    f"var __r=globalThis.{DEFAULT_EXPORT};"
    'if(typeof __r!="function")throw new TypeError("the script has no default export function: '
    'write `export default function analyze(params, ctx) { ... }`");'
    "__r=__r(JSON.parse(__job_params__),JSON.parse(__job_context__));"
    '(__r!==null&&typeof __r=="object"&&typeof __r.then=="function")?'
    '(__r.then(function(v){__r={ok:1,v:v}},function(e){__r={e:e}}),"pending"):'
    '((__r=JSON.stringify(__r===undefined?null:__r))===undefined?"null":__r)'
)
_PENDING = "pending"
_SETTLED = '__r!==null&&typeof __r=="object"&&("ok" in __r||"e" in __r)'
_RETHROW = 'if("e" in __r)throw __r.e;0'
_RESULT = '(__r=JSON.stringify(__r.v===undefined?null:__r.v))===undefined?"null":__r'


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


# The next job's context, built while the child waits for work: creating a
# QuickJS runtime and context is most of a small job's cost, and doing it
# before the job arrives takes it off the job's path from commit to first line.
_spare: quickjs.Context | None = None


def prepare_context() -> None:
    """Build the next job's fresh context now, if there is none yet."""
    global _spare
    if _spare is None:
        _spare = quickjs.Context()


def _fresh_context() -> quickjs.Context:
    """A context no script has run in: the spare one, else a new one."""
    global _spare
    context, _spare = _spare, None
    return context if context is not None else quickjs.Context()


def run_javascript(job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job["source"]`` and return an outcome (never raises for script faults)."""
    source: str = job["source"]
    output_limit: int = job["output_max_bytes"]
    # console exists only for scripts that mention it: setting it up costs more
    # than the whole call of a small analysis.
    captures = "console" in source
    # The engine restarts its CPU-time budget on every call into it, so each
    # call gets what is left of the job's wall-clock limit.
    deadline = time.monotonic() + job["timeout_ms"] / 1000
    context = _fresh_context()
    context.set_memory_limit(job["memory_limit_mb"] * 1024 * 1024)
    context.set_max_stack_size(job["stack_limit_kb"] * 1024)
    try:
        if captures:
            context.eval(_CONSOLE % {"limit": output_limit})
        context.set("__job_params__", job["parameters_json"])
        context.set("__job_context__", job["context_json"])
        try:
            _budget(context, deadline)
            context.module(expose_default_export(source))
        except quickjs.JSException as exc:
            return _failure(context, exc, job, captures, stage="load")
        try:
            _budget(context, deadline)
            result_json = context.eval(_CALL)
        except quickjs.JSException as exc:
            return _failure(context, exc, job, captures, stage="run")
        if result_json == _PENDING:
            try:
                while True:
                    if time.monotonic() >= deadline:
                        message = f"script exceeded the {job['timeout_ms']} ms time limit"
                        return _with_output(context, "timeout", output_limit, captures, error_message=message)
                    _budget(context, deadline)
                    if not context.execute_pending_job():
                        break
                if not context.eval(_SETTLED):
                    return _with_output(
                        context,
                        "failed",
                        output_limit,
                        captures,
                        error_message="the promise returned by analyze() never settled "
                        "(there are no timers or I/O in the sandbox to resolve it)",
                    )
                context.eval(_RETHROW)
            except quickjs.JSException as exc:
                return _failure(context, exc, job, captures, stage="run")
            try:
                result_json = context.eval(_RESULT)
            except quickjs.JSException as exc:
                return _failure(context, exc, job, captures, stage="result")
        # Checked here, before the result goes through the pipe to the worker.
        # Characters are counted first: most results are far below the limit.
        if len(result_json) * 4 > job["result_max_bytes"]:
            result_bytes = len(result_json.encode("utf-8", "surrogatepass"))
            if result_bytes > job["result_max_bytes"]:
                message = result_too_large(result_bytes, job["result_max_bytes"])
                return _with_output(context, "failed", output_limit, captures, error_message=message)
        return _with_output(context, "completed", output_limit, captures, result_json=result_json)
    finally:
        del context


def _budget(context: quickjs.Context, deadline: float) -> None:
    context.set_time_limit(max(0.001, deadline - time.monotonic()))


def _failure(
    context: quickjs.Context, exc: quickjs.JSException, job: dict[str, Any], captures: bool, *, stage: str
) -> dict[str, Any]:
    text = _trim_stack(str(exc))
    limit = job["output_max_bytes"]
    if isinstance(exc, quickjs.StackOverflow) or text.startswith("InternalError: stack overflow"):
        message = f"stack overflow: recursion too deep for the {job['stack_limit_kb']} KB stack limit\n{text}"
        return _with_output(context, "failed", limit, captures, error_message=message)
    if text.startswith("InternalError: out of memory"):
        message = f"script exceeded the {job['memory_limit_mb']} MB memory limit (out of memory)"
        return _with_output(context, "failed", limit, captures, error_message=message)
    if text.startswith("InternalError: interrupted"):
        message = f"script exceeded the {job['timeout_ms']} ms time limit"
        return _with_output(context, "timeout", limit, captures, error_message=message)
    if stage == "load" and text.startswith("SyntaxError"):
        return _with_output(context, "failed", limit, captures, error_message=f"syntax error in script: {text}")
    if stage == "result" or (stage == "run" and _thrown_by_our_stringify(text)):
        return _with_output(
            context, "failed", limit, captures, error_message=f"result is not JSON-serialisable: {text}"
        )
    return _with_output(context, "failed", limit, captures, error_message=text)


def _with_output(
    context: quickjs.Context,
    status: str,
    output_limit: int,
    captures: bool,
    *,
    result_json: str | None = None,
    error_message: str | None = None,
) -> dict[str, Any]:
    stdout, stderr, overflow = "", "", False
    if captures:
        try:
            captured = json.loads(context.eval(_OUTPUT))
            stdout, stderr, overflow = captured["o"], captured["e"], bool(captured["x"])
        except quickjs.JSException:  # the context is out of memory: output is lost, the verdict is not
            pass
    if overflow:
        marker = f"\n[output truncated: over the {format_size(output_limit)} limit (JOB_OUTPUT_MAX_BYTES)]\n"
        stderr += marker
        if status == "completed":
            status, result_json = "failed", None
            error_message = f"script output exceeded the {format_size(output_limit)} limit (JOB_OUTPUT_MAX_BYTES)"
    return outcome(status, result_json=result_json, error_message=error_message, stdout=stdout, stderr=stderr)


def _thrown_by_our_stringify(text: str) -> bool:
    """True when the wrapper's JSON.stringify of the result threw (not the script's own)."""
    frames = [line.strip() for line in text.splitlines()[1:]]
    return frames[:2] == ["at stringify (native)", "at <eval> (<input>:1)"]


def _trim_stack(text: str) -> str:
    lines = text.rstrip().splitlines()
    if len(lines) <= _MAX_STACK_LINES:
        return "\n".join(lines)
    hidden = len(lines) - _MAX_STACK_LINES
    return "\n".join([*lines[:_MAX_STACK_LINES], f"    ... {hidden} more stack frames"])
