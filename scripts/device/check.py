"""The GPU kit's check: its sections in priority order, each in its own process under its own time box, inside a
total budget. run.sh calls it after the install step; it needs no GPU itself (the sections do).

    python scripts/device/check.py --out DIR [--budget-s 550] [--sections env,exactness] [--parts flex,trl] [--smoke]

Each section writes DIR/<section>.json the moment it finishes (and after every part, so a section stopped by its
box keeps what it did); a section whose box would not fit the budget left is skipped, with a JSON that says so;
a section that fails or times out gets its exit status and the tail of its log in its JSON, and the next one
runs. Every section's output goes to DIR/kit.log; DIR/summary.json and the last lines printed are the table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (section, time box on an H200 in seconds, time box in --smoke on a 2-core CPU): the boxes and how they were
# sized are in scripts/device/README.md
# shape7b and study: not in the default --sections (outside the default budget), each in a call of its own
# (--sections shape7b --budget-s 320; --sections study --budget-s 500)
SECTIONS = (("env", 40, 120), ("exactness", 120, 300), ("throughput", 300, 480), ("engines", 90, 300))
SECTIONS += (("shape7b", 300, 240), ("study", 480, 180))
DEFAULT = ("env", "exactness", "throughput", "engines")  # one call: 550 s of boxes


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_section(name: str, box: float, out: Path, work: Path, smoke: bool, log_path: Path, parts: str = "") -> dict:
    """Run one section in its own process group under `box` seconds; return its JSON, completed with how it
    ended."""
    target = out / f"{name}.json"
    cmd = [sys.executable, str(HERE / "sections.py"), name, "--out", str(target), "--work", str(work)]
    cmd += (["--smoke"] if smoke else []) + (["--parts", parts] if parts else [])
    t0 = time.perf_counter()
    with open(log_path, "a") as logf:
        logf.write(f"\n===== {name} (box {box:.0f} s) =====\n")
        logf.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            rc = proc.wait(timeout=box)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
    data = _read(target) or {"section": name}
    data["wall_s"] = round(time.perf_counter() - t0, 2)
    data["box_s"] = box
    if timed_out:
        data["timed_out"] = True
        data["error"] = f"stopped by its time box after {box:.0f} s; the parts listed in parts_done finished"
    elif rc != 0:
        data["exit_code"] = rc
        data.setdefault("error", f"the section's process exited with {rc}")
    if timed_out or rc != 0:
        data["log_tail"] = _tail(log_path)
    target.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return data


def status_of(d: dict) -> str:
    if "skipped" in d:
        return "skipped"
    if d.get("timed_out"):
        return "timed out"
    if d.get("exit_code") is not None or not d.get("complete"):
        return "failed"
    return "failed parts" if d.get("parts_failed") else "ok"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (the device tool's $OUT)")
    ap.add_argument("--budget-s", type=float, default=550, help="total seconds for all sections")
    ap.add_argument("--sections", default=",".join(DEFAULT), help=f"comma list (default {','.join(DEFAULT)})")
    ap.add_argument("--parts", default="", help="comma list: only the parts whose key holds one of these words")
    ap.add_argument("--box-s", type=float, default=0, help="every section's time box (default: its own)")
    ap.add_argument("--work", default="", help="scratch folder (default: a new temporary one)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, fp32: the code path (the test suite)")
    args = ap.parse_args()
    wanted = args.sections.split(",")
    unknown = sorted(set(wanted) - {s for s, _, _ in SECTIONS})
    if unknown:
        raise SystemExit(f"check.py: unknown section(s) {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="cso-kit-"))
    log_path = out / "kit.log"
    t0 = time.perf_counter()
    rows = []
    for name, gpu_box, smoke_box in SECTIONS:
        if name not in wanted:
            continue
        box = args.box_s or (smoke_box if args.smoke else gpu_box)
        left = args.budget_s - (time.perf_counter() - t0)
        if box > left:
            d = {"section": name, "skipped": f"its box ({box:.0f} s) does not fit the {max(left, 0):.0f} s left"}
            (out / f"{name}.json").write_text(json.dumps(d, indent=2) + "\n")
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: running (box {box:.0f} s, {left:.0f} s left)", flush=True)
            d = run_section(name, box, out, work, args.smoke, log_path, args.parts)
        rows.append(
            {
                "section": name,
                "status": status_of(d),
                "wall_s": d.get("wall_s"),
                "parts_done": d.get("parts_done", []),
                "parts_failed": d.get("parts_failed", []),
            }
        )
    summary = {"budget_s": args.budget_s, "total_s": round(time.perf_counter() - t0, 2), "sections": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in rows:
        failed = f"  failed: {', '.join(row['parts_failed'])}" if row["parts_failed"] else ""
        print(f"{row['section']:<11} {row['status']:<12} {row['wall_s'] or 0:>7.1f} s{failed}")
    print(f"total {summary['total_s']:.1f} s of a {args.budget_s:.0f} s budget")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
