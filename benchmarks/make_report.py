"""Assemble ``OUTDIR/report.md`` and ``OUTDIR/report.json`` for ``gpu_report.sh``.

Reads ``OUTDIR/steps.tsv`` (one line per step: name, rc, seconds, log), the
step logs and every benchmark's ``OUTDIR/<bench>.json`` / ``.md``, and writes a
status line per step (build / tests / memcheck / benchmarks) followed by the
benchmark tables.  ``report.json`` holds the same facts with the benchmark JSON
embedded.

    python benchmarks/make_report.py OUTDIR
"""

from __future__ import annotations

import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

PYTEST_SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed|error|skipped|deselected).*?)\s*=*$")
MEMCHECK_SUMMARY = re.compile(r"ERROR SUMMARY: \d+ errors?")


def read_steps(outdir: str) -> list[dict]:
    path = os.path.join(outdir, "steps.tsv")
    steps = []
    if not os.path.exists(path):
        return steps
    with open(path) as fh:
        next(fh, None)  # header
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 4:
                steps.append(dict(step=parts[0], rc=parts[1], seconds=parts[2], log=parts[3]))
    return steps


def _tail(path: str, n: int = 4000) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-n:]
    except OSError:
        return ""


def summarize_step(outdir: str, step: dict) -> str:
    """One human-readable detail string for the step (pytest / memcheck summary)."""
    rc = step["rc"]
    if rc == "skipped":
        return step["log"]  # the reason
    if rc in ("124", "137"):
        return f"killed after {step['seconds']} s (timeout)"
    text = _tail(os.path.join(outdir, step["log"]))
    if step["step"].startswith("tests"):
        for line in reversed(text.splitlines()):
            m = PYTEST_SUMMARY.match(line.strip())
            if m:
                return m.group(1)
        if rc == "5":
            return "no tests collected"
    if step["step"] == "memcheck":
        m = MEMCHECK_SUMMARY.findall(text)
        if m:
            return m[-1]
    if rc not in ("0", "skipped"):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""
    return ""


def verdict(step: dict) -> str:
    rc = step["rc"]
    if rc == "skipped":
        return "SKIPPED"
    if rc == "0":
        return "OK"
    if rc in ("124", "137"):
        return "TIMEOUT"
    if step["step"].startswith("tests") and rc == "5":
        return "NO TESTS"
    return "FAILED"


def load_benches(outdir: str, steps: list[dict]) -> dict:
    benches = {}
    for s in steps:
        if not s["step"].startswith(("bench_", "profile_")):
            continue
        name = s["step"]
        entry = {"json": None, "markdown": None}
        jp, mp = os.path.join(outdir, name + ".json"), os.path.join(outdir, name + ".md")
        if os.path.exists(jp):
            try:
                with open(jp) as fh:
                    entry["json"] = json.load(fh)
            except ValueError as exc:
                entry["json"] = {"error": f"unreadable JSON: {exc}"}
        if os.path.exists(mp):
            with open(mp) as fh:
                entry["markdown"] = fh.read()
        benches[name] = entry
    return benches


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: make_report.py OUTDIR", file=sys.stderr)
        return 2
    outdir = argv[0]
    steps = read_steps(outdir)
    for s in steps:
        s["status"] = verdict(s)
        s["detail"] = summarize_step(outdir, s)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = H.env_info(device)
    benches = load_benches(outdir, steps)

    md = ["# gpavatar GPU report", ""]
    md += [f"- GPU: {env.get('gpu') or 'none (CPU: ' + str(env.get('cpu')) + ')'}",
           f"- torch: {env['torch']} (CUDA {env.get('torch_cuda')}), triton: {env.get('triton')},"
           f" Python {env['python']}",
           f"- commit: {env.get('git_commit')}",
           f"- date: {env['date']}", "", "## Steps", ""]
    rows = [[s["step"], s["status"], s["rc"], s["seconds"], s["detail"]] for s in steps]
    md.append(H.markdown_table(["step", "status", "rc", "seconds", "detail"], rows))
    md.append("")
    for name, entry in benches.items():
        md.append(f"# {name}")
        md.append("")
        if entry["markdown"]:
            md.append(re.sub(r"(?m)^## ", "### ", entry["markdown"]).strip())
        elif entry["json"] and entry["json"].get("rows"):
            md.append(f"(no markdown written; {len(entry['json']['rows'])} rows in the JSON)")
        else:
            md.append("(no results)")
        md.append("")
    with open(os.path.join(outdir, "report.md"), "w") as fh:
        fh.write("\n".join(md))
    H.write_json(os.path.join(outdir, "report.json"),
                 dict(env=env, steps=steps,
                      benchmarks={k: v["json"] for k, v in benches.items()}))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
