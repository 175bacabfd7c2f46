"""How busy protect keeps the cores: thread states sampled from outside during one run.

Starts ``benchmarks/peak_rss_protect.py FT BASE OUT`` in a child process and, from this process
(so the sampling takes no GIL or CPU from the run), reads every thread's state and CPU time from
``/proc/PID/task/*/stat`` every `--interval` seconds until the child exits (Linux only). Prints
the child's own JSON line, then:

- how often 0, 1, 2, 3+ of its threads were runnable (state R: running or waiting for a core):
  with 2 cores, a sample with 0 or 1 leaves a core to other work or idle;
- how often at least one thread waited uninterruptibly (state D: mostly page-ins from the disk);
- per thread with at least 0.2 CPU-seconds: CPU-seconds and the share of samples in R, S, D.
  Threads are numbered in the order they appeared (the first is the main thread); the planner,
  the writer and torch's worker threads have no OS names, so tell them apart by their CPU.

Usage: ``python benchmarks/thread_states.py FT_DIR BASE_DIR OUT_DIR [--solver auto] [--device cpu] [--json F]``.
Not a test.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from peak_rss_protect import protect_arguments  # this script's folder is on sys.path


def _sample(pid: int) -> dict[int, tuple[str, int]]:
    """Each thread's state letter and CPU ticks (user + system) now."""
    row = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended between listdir and read
            continue
        fields = stat.rsplit(")", 1)[1].split()
        row[int(tid)] = (fields[0], int(fields[11]) + int(fields[12]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protect_arguments(ap)
    ap.add_argument("--interval", type=float, default=0.005, help="seconds between samples")
    ap.add_argument("--json", type=Path, help="also save the summary here")
    args = ap.parse_args()
    script = Path(__file__).with_name("peak_rss_protect.py")
    child = subprocess.Popen([sys.executable, str(script), args.ft, args.base, args.out, "--solver", args.solver,
                              "--device", args.device], stdout=subprocess.PIPE, text=True)
    samples: list[dict[int, tuple[str, int]]] = []
    while child.poll() is None:
        try:
            row = _sample(child.pid)
        except OSError:  # exited
            break
        if len(row) > 1:  # from the first helper thread on: imports and setup are single-threaded
            samples.append(row)
        time.sleep(args.interval)
    out, _ = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"protect failed (exit {child.returncode})")
    run = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(run))
    if not samples:
        raise SystemExit("no samples: the run ended before its threads started")
    ticks = os.sysconf("SC_CLK_TCK")
    runnable = collections.Counter(min(3, sum(s == "R" for s, _ in row.values())) for row in samples)
    waiting = sum(any(s == "D" for s, _ in row.values()) for row in samples)
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    states: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for row in samples:
        for tid, (state, cpu) in row.items():
            first.setdefault(tid, cpu)
            last[tid] = cpu
            states[tid][state] += 1
    n = len(samples)
    summary = {
        "run": run,
        "samples": n,
        "runnable_share": {str(k): runnable[k] / n for k in range(4)},
        "some_thread_in_D_share": waiting / n,
        "threads": [
            {"thread": k, "cpu_seconds": (last[tid] - first[tid]) / ticks,
             "state_share": {s: c / sum(states[tid].values()) for s, c in sorted(states[tid].items())}}
            for k, tid in enumerate(sorted(first))  # tids grow with creation order
            if (last[tid] - first[tid]) / ticks >= 0.2
        ],
    }
    print(f"{n} samples; runnable threads 0/1/2/3+: "
          + " / ".join(f"{summary['runnable_share'][str(k)]:.2f}" for k in range(4))
          + f"; a thread in D (disk wait): {summary['some_thread_in_D_share']:.2f} of the samples")
    for t in summary["threads"]:
        shares = ", ".join(f"{s} {v:.2f}" for s, v in t["state_share"].items())
        print(f"thread {t['thread']:>2}: {t['cpu_seconds']:5.1f} CPU-s ({shares})")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
