"""Peak memory of one protect run, split into anonymous and file-mapped resident pages.

Runs ``protect`` in this process while a thread samples ``/proc/self/status`` every 50 ms
(Linux only), then prints one JSON line: wall seconds, CPU seconds (user + system, all threads:
their ratio to the wall time is how many cores were busy), ``ru_maxrss`` and the sampled peaks
of ``RssAnon`` and ``RssFile``. Not a test.

Usage: ``python benchmarks/peak_rss_protect.py FT_DIR BASE_DIR OUT_DIR [--solver auto] [--device cpu]``
(e.g. on the checkpoints ``bench_protect.py --shape 7b`` generates).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import threading
import time


def protect_arguments(ap: argparse.ArgumentParser) -> None:
    """The arguments of one protect run (also `thread_states.py`'s, which passes them on)."""
    ap.add_argument("ft")
    ap.add_argument("base")
    ap.add_argument("out")
    ap.add_argument("--solver", default="auto")
    ap.add_argument("--device", default="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    protect_arguments(ap)
    args = ap.parse_args()
    from mergeshield import ProtectOptions, protect

    peak = {"anon": 0.0, "file": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            status = open("/proc/self/status").read()
            for k, key in (("anon", "RssAnon"), ("file", "RssFile")):
                peak[k] = max(peak[k], int(re.search(key + r":\s+(\d+)", status).group(1)) / 2**20)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    t, cpu = time.perf_counter(), time.process_time()
    protect(args.ft, args.base, args.out, ProtectOptions(solver=args.solver, device=args.device), overwrite=True, progress=False)
    done.set()
    print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": time.process_time() - cpu,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "sampled_peak_anon_gib": peak["anon"], "sampled_peak_file_gib": peak["file"]}))


if __name__ == "__main__":
    main()
