#!/usr/bin/env python3
"""Turn the NBD server benchmark results (written by benches/nbd-servers.sh) into markdown tables.

Input is a tab-separated manifest with three kinds of lines:

    S <server-key> <label> <status> <note>          one per server, in column order
    W <workload-key> <label> <rw>                    one per workload, in row order
    R <server-key> <workload-key> <status> <fio-json> <cpu-seconds> <wall-seconds>

<status> is "ok" for a usable run; anything else is shown in the cell instead of a number.
<rw> is "read" or "write": which section of fio's JSON holds the numbers.
<cpu-seconds>/<wall-seconds> are the server's utime+stime and the wall time over the same window.

Output (stdout): one markdown table per metric, a row per workload, a column per server, and two
ratio columns: tracker(on) / best qemu-nbd and tracker(on) / tracker(off).

Only the standard library is used.
"""

import argparse
import json
import math
import sys

# Server keys the ratio columns refer to (as used by nbd-servers.sh).
TRACKER_ON = "tracker-on"
TRACKER_OFF = "tracker-off"
QEMU_KEYS = ("qemu-uring", "qemu-default")


def load_fio_json(path):
    """fio may print warnings before the JSON document in its --output file; skip to the first '{'."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON object in {path}")
    doc, _ = json.JSONDecoder().raw_decode(text[start:])
    return doc


def percentile(section, pct):
    """clat percentile in microseconds, or NaN if fio did not report it."""
    pcts = section.get("clat_ns", {}).get("percentile", {})
    for key, value in pcts.items():
        try:
            if abs(float(key) - pct) < 1e-9:
                return value / 1000.0
        except ValueError:
            continue
    return math.nan


def measure(json_path, rw, cpu_s, wall_s):
    doc = load_fio_json(json_path)
    jobs = doc.get("jobs") or []
    if not jobs:
        raise ValueError(f"no jobs in {json_path}")
    job = jobs[0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']} in {json_path}")
    sec = job[rw]
    iops = float(sec.get("iops", 0.0))
    cpu_pct = (cpu_s / wall_s * 100.0) if wall_s > 0 else math.nan
    return {
        "iops": iops,
        "mbps": float(sec.get("bw_bytes", 0)) / 1e6,
        "p99_us": percentile(sec, 99.0),
        "cpu_pct": cpu_pct,
        # core-seconds per second divided by IOs per second = core-seconds per IO.
        "cpu_us_per_io": (cpu_pct / 100.0 / iops * 1e6) if iops > 0 else math.nan,
        "fio_cpu_pct": float(job.get("usr_cpu", 0.0)) + float(job.get("sys_cpu", 0.0)),
    }


# (metric key, table title, higher is better?, formatter)
METRICS = [
    ("iops", "IOPS", True, lambda v: f"{v:,.0f}"),
    ("mbps", "Throughput, MB/s (10^6 bytes/s)", True, lambda v: f"{v:,.1f}"),
    ("p99_us", "p99 completion latency (fio clat), µs", False, lambda v: f"{v:,.0f}"),
    ("cpu_pct", "Server CPU, % of one core (utime+stime over the measured window)", False,
     lambda v: f"{v:.0f}%"),
    ("cpu_us_per_io", "Server CPU per I/O, µs (CPU% / IOPS)", False, lambda v: f"{v:,.1f}"),
]


def usable(v):
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def ratio(num, den):
    if not (usable(num) and usable(den)) or den == 0:
        return "n/a"
    return f"{num / den:.2f}×"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("--summary-json", help="also write all parsed numbers here")
    args = ap.parse_args()

    servers, workloads, runs = [], [], {}
    with open(args.manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            kind = parts[0]
            if kind == "S" and len(parts) >= 4:
                servers.append({"key": parts[1], "label": parts[2], "status": parts[3],
                                "note": parts[4] if len(parts) > 4 else ""})
            elif kind == "W" and len(parts) >= 4:
                workloads.append({"key": parts[1], "label": parts[2], "rw": parts[3]})
            elif kind == "R" and len(parts) >= 7:
                runs[(parts[1], parts[2])] = {"status": parts[3], "json": parts[4],
                                              "cpu_s": parts[5], "wall_s": parts[6]}
            else:
                print(f"fio_table: ignoring malformed manifest line {lineno}: {line!r}", file=sys.stderr)

    rw_of = {w["key"]: w["rw"] for w in workloads}
    # cells[(server, workload)] = dict of metrics, or a string explaining why there is none.
    cells = {}
    for s in servers:
        for w in workloads:
            run = runs.get((s["key"], w["key"]))
            if run is None:
                cells[(s["key"], w["key"])] = {"ok": "missing", "skipped": "—"}.get(s["status"], s["status"])
                continue
            if run["status"] != "ok":
                cells[(s["key"], w["key"])] = run["status"]
                continue
            try:
                cells[(s["key"], w["key"])] = measure(run["json"], rw_of[w["key"]],
                                                      float(run["cpu_s"]), float(run["wall_s"]))
            except (OSError, ValueError, KeyError) as e:
                print(f"fio_table: {s['key']}/{w['key']}: {e}", file=sys.stderr)
                cells[(s["key"], w["key"])] = "parse error"

    def value(server, workload, metric):
        c = cells.get((server, workload))
        return c[metric] if isinstance(c, dict) else None

    out = []
    for metric, title, higher_better, fmt in METRICS:
        out.append(f"### {title}")
        out.append("")
        better = "higher" if higher_better else "lower"
        header = ["Workload"] + [s["label"] for s in servers] + [
            "tracker(on) / best qemu-nbd", "tracker(on) / tracker(off)"]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" + "---:|" * (len(header) - 1))
        for w in workloads:
            row = [w["label"]]
            for s in servers:
                c = cells.get((s["key"], w["key"]))
                if isinstance(c, dict):
                    row.append(fmt(c[metric]) if usable(c[metric]) else "n/a")
                else:
                    row.append(str(c))
            qemu_vals = [v for v in (value(k, w["key"], metric) for k in QEMU_KEYS) if usable(v)]
            best_qemu = (max(qemu_vals) if higher_better else min(qemu_vals)) if qemu_vals else None
            on = value(TRACKER_ON, w["key"], metric)
            row.append(ratio(on, best_qemu))
            row.append(ratio(on, value(TRACKER_OFF, w["key"], metric)))
            out.append("| " + " | ".join(row) + " |")
        out.append("")
        out.append(f"_{better} is better; \"best qemu-nbd\" = the {'higher' if higher_better else 'lower'} "
                   f"of the two qemu-nbd columns for this metric._")
        out.append("")
    print("\n".join(out))

    if args.summary_json:
        summary = {
            "servers": servers,
            "workloads": workloads,
            "results": {f"{s}/{w}": c for (s, w), c in cells.items()},
        }
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
            f.write("\n")


if __name__ == "__main__":
    main()
