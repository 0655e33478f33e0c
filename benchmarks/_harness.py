"""Shared helpers for the gpavatar benchmark scripts.

Everything here depends only on the standard library and torch, so the
scripts run on a bare GPU machine (no network, no ``rich``/``pandas``).

* :func:`time_fn` -- warm up, then time ``fn`` ``repeats`` times and return the
  median / 20th / 80th percentile in milliseconds.  On CUDA every repeat is
  bracketed by a pair of ``torch.cuda.Event`` and the device is synchronised
  before and after; on CPU ``time.perf_counter`` is used.
* :func:`peak_memory` -- peak memory (bytes) allocated by one call of ``fn``
  above what was allocated before it.  CUDA: ``torch.cuda`` peak statistics.
  CPU: there is no peak counter for the CPU caching-free allocator, so the call
  is run once under ``torch.profiler`` with ``profile_memory=True`` and the
  allocation/free events of CPU tensors are replayed in time order; the largest
  running sum is the peak.  This counts every tensor allocated through the c10
  CPU allocator (including inside C++ extensions that use ``at::empty``) but not
  raw ``malloc``/``new``/stack memory or allocator fragmentation, so treat it as
  "tensor memory".  If the profiler is unusable the function returns ``None``.
* :func:`measure` -- :func:`peak_memory` of one call (also a warm-up), then
  :func:`time_fn`; the usual sequence for one benchmark row.
* :func:`env_info` -- a dict describing the machine and the software.
* :func:`add_baseline_ratios` -- every row's time and memory ratios against the fastest baseline
  row of its group (the speed baselines of rule 8 in STYLE.md; ``add_ratios``: against ``torch``).
* :func:`write_json`, :func:`markdown_table` -- output; :func:`emit_report` -- the end of
  every script's ``main`` (print the table, write the JSON and markdown, exit status).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_times(fn: Callable[[], Any], device: torch.device, warmup: int = 1) -> list[tuple[str, int, float]]:
    """(name, calls, ms) of one call of ``fn`` under torch.profiler after ``warmup`` calls, the
    largest first: each CUDA kernel's device time on a GPU, each operator's self CPU time on the CPU."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    rows = []
    for event in prof.key_averages():
        if device.type == "cuda":
            if event.device_type.name != "CUDA":
                continue
            us = getattr(event, "self_device_time_total", None)
            if us is None:
                us = getattr(event, "self_cuda_time_total", 0)
        else:
            us = event.self_cpu_time_total
        if us > 0:
            rows.append((event.key, event.count, us / 1e3))
    return sorted(rows, key=lambda r: -r[2])


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in [0, 100]) of ``values``."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float]) -> dict:
    return {
        "median_ms": statistics.median(samples_ms),
        "p20_ms": _percentile(samples_ms, 20),
        "p80_ms": _percentile(samples_ms, 80),
        "repeats": len(samples_ms),
    }


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    repeats: int = 10,
    warmup: int = 2,
    max_seconds: float | None = None,
    min_repeats: int = 3,
    est_seconds: float | None = None,
) -> dict:
    """Time ``fn()``; returns ``{"median_ms", "p20_ms", "p80_ms", "repeats"}``.

    ``max_seconds`` caps the time spent in the timed loop: the number of repeats
    is reduced (down to ``min_repeats``) when the warm-up calls (or
    ``est_seconds``, the duration of an earlier call, when ``warmup`` is 0) show
    that ``repeats`` calls would take longer.
    """
    device = torch.device(device)
    warm_times = [] if est_seconds is None else [est_seconds]
    for _ in range(warmup if warm_times else max(1, warmup)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        warm_times.append(time.perf_counter() - t0)
    if max_seconds is not None:
        per_call = max(min(warm_times), 1e-6)
        repeats = max(min_repeats, min(repeats, int(max_seconds / per_call)))

    samples = []
    if device.type == "cuda":
        for _ in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def environ(**values):
    """Set environment variables inside the block (None: unset), restored afterwards (the
    switches the C++ and Triton code read on every call): ``gpavatar.ops._backend.environ``."""
    from gpavatar.ops._backend import environ as package_environ

    return package_environ(**values)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        del out
    events = prof.profiler.kineto_results.events()
    mem = []
    for e in events:
        if e.name() != "[memory]":
            continue
        if "cpu" not in str(e.device_type()).lower():
            continue
        mem.append((e.start_ns(), e.nbytes()))
    mem.sort(key=lambda t: t[0])
    cur = peak = 0
    for _, nbytes in mem:
        cur += nbytes
        peak = max(peak, cur)
    return int(peak)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated by one ``fn()`` call above the level before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    if device.type == "cpu":
        try:
            return _cpu_peak_bytes(fn)
        except Exception:  # profiler internals differ between torch versions
            return None
    return None


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    repeats: int = 10,
    warmup: int = 2,
    max_seconds: float | None = None,
    min_repeats: int = 3,
) -> dict:
    """Peak memory of one ``fn()`` call, then :func:`time_fn`.

    On CUDA ``fn`` is called once first so that JIT compilation / autotuning (and
    their scratch buffers) are not counted in the peak.  The memory call also
    serves as a warm-up: its duration is passed to :func:`time_fn` as
    ``est_seconds``.  Returns ``{"peak_mem_bytes", "median_ms", "p20_ms",
    "p80_ms", "repeats"}``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        fn()
    t0 = time.perf_counter()
    out = {"peak_mem_bytes": peak_memory(fn, device)}
    est = time.perf_counter() - t0
    out.update(time_fn(fn, device, repeats=repeats, warmup=warmup, max_seconds=max_seconds,
                       min_repeats=min_repeats, est_seconds=est))
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if out.returncode != 0:
            return None
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        )
        if dirty.returncode == 0 and dirty.stdout.strip():
            commit += "-dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: torch.device) -> dict:
    """Machine / software description stored next to every benchmark result."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "hostname": platform.node(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["gpu_capability"] = "%d.%d" % torch.cuda.get_device_capability(idx)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["gpu"] = None
    return info


def device_label(info: dict) -> str:
    return info.get("gpu") or info.get("cpu") or "unknown device"


def write_json(path: str, payload: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """GitHub-flavoured markdown table, columns padded so it also reads as text."""
    body = [["" if c is None else str(c) for c in r] for r in rows]
    cols = [str(h) for h in headers]
    widths = [len(h) for h in cols]
    for r in body:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    out = [line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in body]
    return "\n".join(out)


def env_markdown(info: dict) -> str:
    keys = ["gpu", "cpu", "torch_threads", "torch", "torch_cuda", "triton", "python",
            "git_commit", "date"]
    return "\n".join(f"- {k}: {info.get(k)}" for k in keys if info.get(k) is not None)


def emit_report(payload: dict, markdown: str, json_path: str | None, markdown_path: str | None) -> int:
    """Print ``markdown`` (plus ``payload["error"]`` in bold), write the JSON / markdown files
    asked for, and return the script's exit status: 1 when ``payload["error"]`` is set."""
    if payload.get("error"):
        markdown += f"\n**{payload['error']}**\n"
    print(markdown)
    if json_path:
        write_json(json_path, payload)
    if markdown_path:
        os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
        with open(markdown_path, "w") as fh:
            fh.write(markdown)
    return 1 if payload.get("error") else 0


def resolve_device(name: str) -> torch.device | None:
    """``--device`` (cpu | cuda | auto) -> a device; None (after an error on stderr) when CUDA
    is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return None
    return device


def add_ratios(rows: list[dict], key: Callable[[dict], Any] = lambda r: r["case"],
               baseline_of: Callable[[dict], Any] | None = None) -> None:
    """Set ``speedup_vs_torch`` and ``mem_vs_torch`` of every row against the error-free
    ``torch`` row with the same ``key`` (or the key ``baseline_of(row)`` names)."""
    ref = {key(r): r for r in rows if r["backend"] == "torch" and r["error"] is None}
    for r in rows:
        t = ref.get(baseline_of(r) if baseline_of else key(r))
        r["speedup_vs_torch"] = t["median_ms"] / r["median_ms"] if t and r["median_ms"] else None
        r["mem_vs_torch"] = (r["peak_mem_bytes"] / t["peak_mem_bytes"]
                             if t and r["peak_mem_bytes"] is not None and t["peak_mem_bytes"] else None)


def add_baseline_ratios(rows: list[dict], baselines: Sequence[str],
                        key: Callable[[dict], Any] = lambda r: r["case"]) -> None:
    """Set ``best_baseline``, ``speedup_vs_best`` (baseline ms / row ms) and ``mem_vs_best`` (row
    bytes / baseline bytes) of every row against the fastest row of the same ``key`` whose backend
    is one of ``baselines``, without error and not flagged incorrect (``correct`` False)."""
    best: dict = {}
    for r in rows:
        if r["backend"] in baselines and r["error"] is None and r.get("correct") is not False and r["median_ms"]:
            b = best.get(key(r))
            if b is None or r["median_ms"] < b["median_ms"]:
                best[key(r)] = r
    for r in rows:
        b = best.get(key(r))
        r["best_baseline"] = b["backend"] if b else None
        r["speedup_vs_best"] = b["median_ms"] / r["median_ms"] if b and r["median_ms"] else None
        r["mem_vs_best"] = (r["peak_mem_bytes"] / b["peak_mem_bytes"]
                            if b and r["peak_mem_bytes"] is not None and b["peak_mem_bytes"] else None)


_IMPORT_ERRORS: dict[tuple[str, ...], str | None] = {}


def import_error(*modules: str) -> str | None:
    """Why ``modules`` cannot be imported (None when they can); cached per tuple of names."""
    if modules not in _IMPORT_ERRORS:
        import importlib

        try:
            for name in modules:
                importlib.import_module(name)
            _IMPORT_ERRORS[modules] = None
        except Exception as exc:
            _IMPORT_ERRORS[modules] = f"{type(exc).__name__}: {exc}"[:300]
    return _IMPORT_ERRORS[modules]


def release(device: torch.device) -> None:
    """After a benchmark row: wait for the GPU and return its cached blocks (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def record_error(row: dict, exc: BaseException, quiet: tuple[str, ...] = ()) -> None:
    """Store a failed row's error (the report shows it and the run goes on); print the
    traceback unless it is an expected "not available here" RuntimeError starting with one of
    ``quiet``. Call from the ``except`` block."""
    import traceback

    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    if not (quiet and isinstance(exc, RuntimeError) and str(exc).startswith(quiet)):
        traceback.print_exc(limit=3)


def error_status(row: dict) -> str | None:
    """The status cell of a failed row, None for a row without error."""
    return "ERROR: " + row["error"].splitlines()[0][:80] if row["error"] else None


def benchmark_parser(description: str, max_seconds: float | None,
                     max_seconds_help: str = "cap on timed seconds per row (repeats are reduced, min 3)"):
    """argparse parser with the options every benchmark script shares: --device, --repeats,
    --warmup, --max-seconds, --min-repeats, --seed, --json, --markdown (scripts add their own)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--max-seconds", type=float, default=max_seconds, help=max_seconds_help)
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    return ap

