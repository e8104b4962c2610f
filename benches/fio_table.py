#!/usr/bin/env python3
"""Turn the NBD server benchmark results (written by benches/nbd-servers.sh) into markdown tables.

Input is a tab-separated manifest with three kinds of lines:

    S <server-key> <label> <status> <note>          one per server, in column order
    W <workload-key> <label> <rw>                    one per workload, in row order
    R <server-key> <workload-key> <status> <fio-json> <cpu-seconds> <wall-seconds> [<round>]

<status> is "ok" for a usable run; anything else is shown in the cell instead of a number.
<rw> is "read" or "write": which section of fio's JSON holds the numbers.
<cpu-seconds>/<wall-seconds> are the server's utime+stime and the wall time over the same window.
<round> numbers the alternating rounds (a server runs once per round); missing means round 1.

Output (stdout): one markdown table per metric, a row per workload, a column per server (the
median over the rounds, and the spread min-max when there are several), and the ratio columns:
tracker(on) / best of qemu-nbd and nbdkit, tracker(on) / tracker(off). A ratio is the median of
the per-round ratios (the runs of one round are close in time), with their spread. Then one
table of the ratios the project's targets are about.

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
NBDKIT = "nbdkit"
PEERS = QEMU_KEYS + (NBDKIT,)


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
    # The client's own CPU (fio's usr_cpu + sys_cpu: its one job thread, libnbd included): near
    # 100% it is the client that sets the pace, and a faster server cannot show.
    ("fio_cpu_pct", "Client (fio) CPU, % of one core (fio's usr+sys over its measured window)",
     None, lambda v: f"{v:.0f}%"),
]


def usable(v):
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def median(vals):
    vals = sorted(v for v in vals if usable(v))
    if not vals:
        return None
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def spread(vals, fmt):
    vals = [v for v in vals if usable(v)]
    if len(vals) < 2:
        return ""
    return f" ({fmt(min(vals))}–{fmt(max(vals))})"


def ratio_cell(ratios):
    ratios = [r for r in ratios if usable(r)]
    if not ratios:
        return "n/a"
    m = median(ratios)
    if len(ratios) < 2:
        return f"{m:.2f}×"
    return f"{m:.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifest")
    ap.add_argument("--summary-json", help="also write all parsed numbers here")
    args = ap.parse_args()

    servers, workloads, runs = [], [], {}
    rounds = set()
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
                rnd = int(parts[7]) if len(parts) > 7 and parts[7].isdigit() else 1
                rounds.add(rnd)
                runs[(parts[1], parts[2], rnd)] = {"status": parts[3], "json": parts[4],
                                                   "cpu_s": parts[5], "wall_s": parts[6]}
            else:
                print(f"fio_table: ignoring malformed manifest line {lineno}: {line!r}", file=sys.stderr)
    rounds = sorted(rounds) or [1]

    rw_of = {w["key"]: w["rw"] for w in workloads}
    # cells[(server, workload, round)] = dict of metrics, or a string explaining why none.
    cells = {}
    for s in servers:
        for w in workloads:
            for r in rounds:
                run = runs.get((s["key"], w["key"], r))
                if run is None:
                    cells[(s["key"], w["key"], r)] = {"ok": "missing", "skipped": "—"}.get(s["status"], s["status"])
                    continue
                if run["status"] != "ok":
                    cells[(s["key"], w["key"], r)] = run["status"]
                    continue
                try:
                    cells[(s["key"], w["key"], r)] = measure(run["json"], rw_of[w["key"]],
                                                             float(run["cpu_s"]), float(run["wall_s"]))
                except (OSError, ValueError, KeyError) as e:
                    print(f"fio_table: {s['key']}/{w['key']}/round {r}: {e}", file=sys.stderr)
                    cells[(s["key"], w["key"], r)] = "parse error"

    def value(server, workload, rnd, metric):
        c = cells.get((server, workload, rnd))
        return c[metric] if isinstance(c, dict) else None

    def values(server, workload, metric):
        return [value(server, workload, r, metric) for r in rounds]

    def best_peer(workload, rnd, metric, higher_better, keys=PEERS):
        vals = [v for v in (value(k, workload, rnd, metric) for k in keys) if usable(v)]
        if not vals:
            return None
        return max(vals) if higher_better else min(vals)

    def per_round(workload, metric, num, den):
        out = []
        for r in rounds:
            a, b = num(r), den(r)
            if usable(a) and usable(b) and b != 0:
                out.append(a / b)
        return out

    out = []
    for metric, title, higher_better, fmt in METRICS:
        out.append(f"### {title}")
        out.append("")
        ratios = higher_better is not None
        better = "higher" if higher_better else "lower"
        header = ["Workload"] + [s["label"] for s in servers] + ([
            "tracker(on) / best of qemu-nbd, nbdkit", "tracker(on) / tracker(off)"] if ratios else [])
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" + "---:|" * (len(header) - 1))
        for w in workloads:
            row = [w["label"]]
            for s in servers:
                vals = values(s["key"], w["key"], metric)
                m = median(vals)
                if m is not None:
                    row.append(fmt(m) + spread(vals, fmt))
                else:
                    first = cells.get((s["key"], w["key"], rounds[0]))
                    row.append(str(first) if not isinstance(first, dict) else "n/a")
            if ratios:
                row.append(ratio_cell(per_round(
                    w["key"], metric,
                    lambda r: value(TRACKER_ON, w["key"], r, metric),
                    lambda r: best_peer(w["key"], r, metric, higher_better))))
                row.append(ratio_cell(per_round(
                    w["key"], metric,
                    lambda r: value(TRACKER_ON, w["key"], r, metric),
                    lambda r: value(TRACKER_OFF, w["key"], r, metric))))
            out.append("| " + " | ".join(row) + " |")
        out.append("")
        if ratios:
            out.append(f"_{better} is better; each cell is the median over {len(rounds)} round(s) "
                       f"(min–max); \"best of\" = the {better} of qemu-nbd (both) and nbdkit in "
                       f"the same round; a ratio is the median of the per-round ratios (min–max)._")
        else:
            out.append(f"_each cell is the median over {len(rounds)} round(s) (min–max); a "
                       f"client near 100% of its core is what limits that server's IOPS._")
        out.append("")

    # The targets: tracking on at least as fast as the best peer (>= 1.00), tracking costing
    # under 5% (on/off >= 0.95), server CPU per I/O no more than nbdkit's (<= 1.00).
    out.append("### Ratios against the targets")
    out.append("")
    out.append("| Workload | IOPS: on / best peer (target ≥ 1.00) | IOPS: on / off (target ≥ 0.95) "
               "| CPU per I/O: on / nbdkit (target ≤ 1.00) |")
    out.append("|---|---:|---:|---:|")
    for w in workloads:
        k = w["key"]
        out.append("| " + " | ".join([
            w["label"],
            ratio_cell(per_round(k, "iops", lambda r: value(TRACKER_ON, k, r, "iops"),
                                 lambda r: best_peer(k, r, "iops", True))),
            ratio_cell(per_round(k, "iops", lambda r: value(TRACKER_ON, k, r, "iops"),
                                 lambda r: value(TRACKER_OFF, k, r, "iops"))),
            ratio_cell(per_round(k, "cpu_us_per_io",
                                 lambda r: value(TRACKER_ON, k, r, "cpu_us_per_io"),
                                 lambda r: value(NBDKIT, k, r, "cpu_us_per_io"))),
        ]) + " |")
    out.append("")
    print("\n".join(out))

    if args.summary_json:
        summary = {
            "servers": servers,
            "workloads": workloads,
            "rounds": rounds,
            "results": {f"{s}/{w}/{r}": c for (s, w, r), c in cells.items()},
        }
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
            f.write("\n")


if __name__ == "__main__":
    main()
