#!/usr/bin/env python3
"""redline on replays that no policy setting was tuned on: sixteen of the code trace (other time
compressions, prompt scales, cold starts and TTFT objectives) and six of a second workload, 13
minutes of the conversation trace (sim/traces/README.md), with its tokens scaled up so that the
fleet grows past the two-replica floor. Then sixteen with cold starts of 180-240 s, both traces
(added in the twentieth session; the guard margin's cap was set on two of them, prompts x2 at
x1, which reversed twice within 10 minutes without it). `redline-sim --targets` checks the eleven replays the
settings were chosen on; this is the check that they hold elsewhere (docs/autoscaling.md,
"Other workloads, and replays no setting was tuned on"). Usage, after
`cargo build --release -p redline-sim` (about 4 minutes on 2 cores):

    python3 scripts/fresh-replays.py [path/to/redline-sim] [-- flags for every replay]

(`-- --warm-up 300`: each replay begins on a fleet its own first five minutes warmed.)

Prints one row per replay (TTFT attainment, cost vs the oracle, reversals per 10 minutes and the
most within any 10 minutes, and the best static fleet's attainment and cost against redline's)
and exits 1 if any replay falls under 99% TTFT attainment or reverses twice within 10 minutes."""
import concurrent.futures as cf
import os
import subprocess
import sys
import tempfile

ARGS, EXTRA = (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]) \
    if "--" in sys.argv else (sys.argv[1:], [])
B = ARGS[0] if ARGS else os.path.join(
    os.environ.get("CARGO_TARGET_DIR", "target"), "release", "redline-sim")
REPLAYS = [
    "--time-compression 1.5", "--time-compression 2.5", "--time-compression 6",
    "--time-compression 8", "--token-scale 1.25", "--token-scale 1.25 --time-compression 2",
    "--token-scale 1.5 --time-compression 2", "--token-scale 1.5 --time-compression 3",
    "--cold-start 90", "--cold-start 180", "--cold-start 90 --time-compression 2",
    "--cold-start 180 --time-compression 4", "--ttft-slo 1.5",
    "--ttft-slo 1.5 --time-compression 4", "--ttft-slo 3 --time-compression 2",
    "--token-scale 0.75 --time-compression 4",
] + [f"--trace sim/traces/azure-llm-2023-conv-13min.csv {f}" for f in [
    "--token-scale 2", "--token-scale 4", "--token-scale 6", "--token-scale 4 --cold-start 120",
    "--token-scale 2 --time-compression 2", "--token-scale 3 --time-compression 2",
]] + [f"--cold-start {f}" for f in [
    "240", "180 --time-compression 2", "240 --time-compression 2", "180 --time-compression 3",
    "240 --time-compression 4", "180 --token-scale 1.5", "180 --token-scale 2",
    "240 --token-scale 2", "180 --token-scale 1.5 --time-compression 4",
    "180 --token-scale 2 --time-compression 4",
]] + [f"--trace sim/traces/azure-llm-2023-conv-13min.csv {f}" for f in [
    "--token-scale 4 --cold-start 180", "--token-scale 6 --cold-start 180",
    "--token-scale 6 --cold-start 240", "--token-scale 2 --time-compression 2 --cold-start 180",
]]


def redline_row(flags):
    """(TTFT attainment %, cost vs oracle, reversals per 10 minutes, the most reversals within
    any 10 minutes, best static's TTFT attainment %, best static's replica-seconds over
    redline's) from one run."""
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([B, *flags.split(), *EXTRA, "--plot", os.path.join(d, "plot.png")],
                             capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        c = [x.strip() for x in line.split("|")]
        if len(c) > 10:
            rows[c[1].split(" (")[0]] = c
    if "redline" not in rows or "best static" not in rows:
        raise SystemExit(f"no redline or static row for {flags}:\n{out}")
    r, s = rows["redline"], rows["best static"]
    return (float(r[2].rstrip("%")), float(r[6].rstrip("x")), float(r[10]), int(r[11]),
            float(s[2].rstrip("%")), float(s[5]) / float(r[5]))


with cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    rows = list(pool.map(redline_row, REPLAYS))
print("| replay | TTFT SLO | vs oracle | reversals /10 min (most in 10 min) "
      "| best static: TTFT SLO, cost vs redline |")
print("|---|---:|---:|---:|---|")
for flags, (att, cost, rev, most, s_att, s_cost) in zip(REPLAYS, rows):
    name = flags.replace("--trace sim/traces/azure-llm-2023-conv-13min.csv", "conversations")
    print(f"| `{name}` | {att:.2f}% | {cost:.2f}x | {rev:.2f} ({most}) | {s_att:.2f}%, {s_cost:.2f}x |")
short = [f for f, r in zip(REPLAYS, rows) if r[0] < 99.0]
flapping = [f for f, r in zip(REPLAYS, rows) if r[3] > 1]
print(f"{len(REPLAYS) - len(short)} of {len(REPLAYS)} replays keep >= 99%; "
      f"{len(REPLAYS) - len(flapping)} reverse at most once within any 10 minutes",
      file=sys.stderr)
sys.exit(1 if short or flapping else 0)
