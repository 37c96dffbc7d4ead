#!/usr/bin/env python3
"""redline on sixteen replays of the code trace that no policy setting was tuned on: other time
compressions, prompt scales, cold starts and TTFT objectives. `redline-sim --targets` checks the
eleven replays the settings were chosen on; this is the check that they hold elsewhere
(docs/autoscaling.md, "Sizing by the error budget"). Usage, after
`cargo build --release -p redline-sim` (about 3 minutes on 2 cores):

    python3 scripts/fresh-replays.py [path/to/redline-sim]

Prints one row per replay (TTFT attainment, cost vs the oracle, reversals per 10 minutes) and
exits 1 if any replay falls under 99% TTFT attainment."""
import concurrent.futures as cf
import os
import subprocess
import sys

B = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.environ.get("CARGO_TARGET_DIR", "target"), "release", "redline-sim")
REPLAYS = [
    "--time-compression 1.5", "--time-compression 2.5", "--time-compression 6",
    "--time-compression 8", "--token-scale 1.25", "--token-scale 1.25 --time-compression 2",
    "--token-scale 1.5 --time-compression 2", "--token-scale 1.5 --time-compression 3",
    "--cold-start 90", "--cold-start 180", "--cold-start 90 --time-compression 2",
    "--cold-start 180 --time-compression 4", "--ttft-slo 1.5",
    "--ttft-slo 1.5 --time-compression 4", "--ttft-slo 3 --time-compression 2",
    "--token-scale 0.75 --time-compression 4",
]


def redline_row(flags):
    """(TTFT attainment %, cost vs oracle, reversals per 10 minutes) of redline's row."""
    out = subprocess.run([B, *flags.split()], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        c = [x.strip() for x in line.split("|")]
        if len(c) > 10 and c[1] == "redline":
            return float(c[2].rstrip("%")), float(c[6].rstrip("x")), float(c[10])
    raise SystemExit(f"no redline row for {flags}:\n{out}")


with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    rows = list(pool.map(redline_row, REPLAYS))
print("| replay | TTFT SLO | vs oracle | reversals /10 min |\n|---|---:|---:|---:|")
for flags, (att, cost, rev) in zip(REPLAYS, rows):
    print(f"| `{flags}` | {att:.2f}% | {cost:.2f}x | {rev:.2f} |")
short = [f for f, r in zip(REPLAYS, rows) if r[0] < 99.0]
print(f"{len(REPLAYS) - len(short)} of {len(REPLAYS)} replays keep >= 99%", file=sys.stderr)
sys.exit(1 if short else 0)
