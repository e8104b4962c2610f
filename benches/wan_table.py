#!/usr/bin/env python3
"""benches/wan.sh's analysis: turns one case's logs into a JSON row, and the rows into the
markdown report.

    wan_table.py case DIR LABEL CC LOSS RATE DELAY_MS LIMIT FINISHED APPLIED CAP_WALL \\
                 CPU_SHIPPER CPU_APPLIER LOAD1 SIZE_MIB          -> one JSON line
    wan_table.py pair DIR CCA+CCB LOSS RATE DELAY_MS WARM_S CPU_A CPU_B CPU_APPLIER LOAD1
    wan_table.py ceiling RELAY_JSON
    wan_table.py report ROWS_JSONL                                -> markdown
(report reads WAN_COMMIT, WAN_STAMP, WAN_CORES, WAN_KERNEL, WAN_ELAPSED, WAN_CCS_ORDER and the
WAN_* settings from the environment.)
"""

import glob
import json
import os
import re
import sys
from datetime import datetime

MIB = 1048576


def ts(line):
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()


def clean(s):
    return re.sub(r"\x1b\[[0-9;]*m", "", s)


def read_log(path):
    try:
        return [clean(l) for l in open(path, errors="replace").read().splitlines()]
    except OSError:
        return []


def relay_stats(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return {}


def bdp_bytes(rate, delay_ms):
    return rate / 8 * 2 * delay_ms / 1000


def case(a):
    (d, label, cc, loss, rate, delay, limit, finished, applied, cap_wall, cs, ca, load1,
     size_mib) = a
    rate, delay = int(rate), float(delay)
    log = read_log(f"{d}/shipper.log")
    planned = [l for l in log if "cycle planned" in l]
    done = [l for l in log if "cycle applied on the replica" in l]
    progress = [l for l in log if re.search(r"cycle \d+ \([^)]*\): [\d.]+ / [\d.]+ MiB", l)]
    interrupted = [l for l in log if "replication interrupted" in l]
    relay = relay_stats(f"{d}/relay.json")
    c2s = relay.get("client->server", {})
    s2c = relay.get("server->client", {})
    row = dict(label=label, cc=cc, loss=float(loss), rate=rate, delay_ms=delay, limit=limit,
               finished=finished == "1", load1=load1, interrupted=len(interrupted),
               size_mib=int(size_mib), cpu_shipper=float(cs), cpu_applier=float(ca),
               cpu_relay=relay.get("cpu_s", 0), relay_elapsed=relay.get("elapsed_s", 0))
    if interrupted:
        row["first_error"] = interrupted[0].split("replication interrupted: ", 1)[-1][:160]
    t0 = ts(planned[0]) if planned else None
    if done:
        kv = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', done[-1]))
        get = lambda k: float(kv.get(k, "0").strip('"'))
        row.update(data_mib=get("data_mib"), wire_mib=get("wire_mib"), cycle_s=get("secs"))
        end = relay.get("big_c2s_last_wall") or 0
        if t0 and end:
            row["transfer_s"] = end - t0
    elif t0 and float(cap_wall):
        row["transfer_s"] = float(cap_wall) - t0
        row["data_mib"] = int(applied) / MIB
    # steady rate of data accepted by the sender between the 5 s and 10 s progress lines
    pts = []
    for l in progress:
        m = re.search(r": ([\d.]+) / [\d.]+ MiB", l)
        pts.append((ts(l), float(m.group(1)) * MIB))
    if len(pts) >= 2 and pts[1][0] > pts[0][0]:
        row["steady_Bps"] = (pts[1][1] - pts[0][1]) / (pts[1][0] - pts[0][0])
    row["kernel_rx_drops"] = relay.get("kernel_rx_drops") or 0
    row["drops"] = dict(loss=c2s.get("dropped_loss", 0) + s2c.get("dropped_loss", 0),
                        queue=c2s.get("dropped_queue", 0) + s2c.get("dropped_queue", 0),
                        c2s_loss=c2s.get("dropped_loss", 0), c2s_queue=c2s.get("dropped_queue", 0))
    row["c2s_pkts"] = c2s.get("forwarded_packets", 0)
    row["c2s_bytes"] = c2s.get("forwarded_bytes", 0)
    row["queue_mean"] = c2s.get("mean_queue_bytes_busy")
    row["queue_max"] = c2s.get("max_queue_bytes", 0)
    try:
        st = json.loads(open(f"{d}/applier-status.json").read())["result"]["vms"][0]
        rcv = st.get("receiving") or {}
        row["applier"] = (f"applier: cycle {rcv.get('cycle')} ({rcv.get('kind')}) in progress"
                          if rcv else f"applier: last cycle {st.get('last_cycle')}")
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    rate = steady_udp_rate(d)
    if rate and row.get("data_mib") and row["c2s_bytes"]:
        row["steady_goodput_bps"] = rate * 8 * row["data_mib"] * MIB / row["c2s_bytes"]
    print(json.dumps(row))


def snapshots(d):
    """The relay's per-second snapshots of a case or pair: (elapsed s, stats), in order."""
    out = []
    for p in glob.glob(f"{d}/snap/*.json"):
        try:
            s = json.load(open(p))
        except (OSError, ValueError):
            continue
        out.append((s["elapsed_s"], s))
    out.sort(key=lambda x: x[0])
    return out


def steady_udp_rate(d, skip=5.0):
    """Client->server UDP payload bytes/s from `skip` s after the transfer got going to the
    last second it was still going at full pace, or None."""
    pts = [(t, s["client->server"]["forwarded_bytes"]) for t, s in snapshots(d)]
    going = next((t for t, b in pts if b > MIB), None)
    if going is None:
        return None
    later = []
    for t, b in pts:
        if t >= going + skip and (not later or t > later[-1][0]):
            later.append((t, b))
    pts = later
    # Drop the tail once the rate falls under half the median (the last chunks, the end).
    steps = [(b1 - b0) / (t1 - t0) for (t0, b0), (t1, b1) in zip(pts, pts[1:])]
    if len(steps) < 3:
        return None
    med = sorted(steps)[len(steps) // 2]
    end = len(pts) - 1
    while end > 1 and steps[end - 1] < med / 2:
        end -= 1
    (ta, ba), (tb, bb) = pts[0], pts[end]
    return (bb - ba) / (tb - ta) if tb > ta else None


def pair(a):
    d, label, loss, rate, delay, warm, csa, csb, ca, load1 = a
    rate, delay, warm = int(rate), float(delay), float(warm)
    snaps = [(t, {c["n"]: c["c2s_forwarded_bytes"] for c in s.get("clients", [])})
             for t, s in snapshots(d)]
    row = dict(label="pair", cc=label, loss=float(loss), rate=rate, delay_ms=delay,
               load1=load1, cpu=[float(csa), float(csb), float(ca)])
    # The window: from `warm` seconds on, to the last snapshot at which both were still sending.
    both = [(t, cl) for t, cl in snaps if 1 in cl and 2 in cl]
    start = next((i for i, (t, _) in enumerate(both) if t >= warm), None)
    end = None
    if start is not None:
        for i in range(start + 1, len(both)):
            prev, cur = both[i - 1][1], both[i][1]
            if all(cur[k] - prev[k] > 0 for k in (1, 2)):
                end = i
            else:
                break
    if start is not None and end is not None:
        (ta, a0), (tb, b0) = both[start], both[end]
        secs = tb - ta
        row["window_s"] = round(secs, 1)
        row["mbit"] = [(b0[k] - a0[k]) * 8 / secs / 1e6 for k in (1, 2)]
    relay = relay_stats(f"{d}/relay.json")
    c2s = relay.get("client->server", {})
    row["queue_mean"] = c2s.get("mean_queue_bytes_busy")
    row["queue_max"] = c2s.get("max_queue_bytes", 0)
    row["drops"] = dict(loss=c2s.get("dropped_loss", 0), queue=c2s.get("dropped_queue", 0))
    row["cpu_relay"] = relay.get("cpu_s", 0)
    row["relay_elapsed"] = relay.get("elapsed_s", 0)
    print(json.dumps(row))


def ceiling(a):
    s = relay_stats(a[0])
    fwd = s.get("client->server", {}).get("forwarded_packets", 0)
    cpu = s.get("cpu_s", 0)
    row = dict(label="ceiling", forwarded=fwd, cpu_s=cpu, elapsed_s=s.get("elapsed_s", 0))
    if cpu:
        row["pps_per_core"] = fwd / cpu
    print(json.dumps(row))


def pct(x):
    return f"{100 * x:.0f}%"


def targets(r):
    """The issue's target for a link row: (min goodput share, max sent/delivered) or None."""
    rate, rtt, loss = r["rate"], 2 * r["delay_ms"], r["loss"]
    if rate == 200_000_000 and rtt == 100:
        if loss <= 0.01:
            return 0.90, 1.05 + loss
        if loss == 0.02:
            return 0.80, 1.10
    if rate == 50_000_000 and rtt == 300 and loss == 0.01:
        return 0.85, 1.05 + loss
    return None


def measures(r):
    """goodput share of the link, sent/delivered, queue mean and max in BDPs."""
    t = r.get("transfer_s")
    mib = r.get("data_mib", 0)
    share = mib * MIB * 8 / t / r["rate"] if t and r["rate"] else 0.0
    sent = r["c2s_pkts"] + r["drops"]["c2s_queue"] + r["drops"]["c2s_loss"] + r["kernel_rx_drops"]
    waste = sent / r["c2s_pkts"] if r["c2s_pkts"] else None
    bdp = max(bdp_bytes(r["rate"], r["delay_ms"]), 1)
    q = r.get("queue_mean")
    return share, waste, (q / bdp if q is not None else None), r.get("queue_max", 0) / bdp


def report(rows_file):
    rows = [json.loads(l) for l in open(rows_file) if l.strip()]
    env = os.environ
    order = env.get("WAN_CCS_ORDER", "cubic bbr vmr").split()
    size = next((r["size_mib"] for r in rows if "size_mib" in r), "?")
    print(f"# WAN replication benchmark — {env.get('WAN_STAMP', '')}\n")
    print(f"> Shipper, applier, tracker and the python WAN relay share this machine's "
          f"{env.get('WAN_CORES', '?')} cores and its disk: compare rows within a run, read the "
          "load1 column, and the relay's ceiling below.\n")
    print(f"- repo: {env.get('WAN_COMMIT', '?')}; kernel {env.get('WAN_KERNEL', '?')}; "
          f"{env.get('WAN_CORES', '?')} cores; the run took {env.get('WAN_ELAPSED', '?')} s")
    print(f"- one case = the initial sync of an image holding {size} MiB of random data, fresh "
          f"tracker/applier/relay/shipper, {env.get('WAN_STREAMS', '4')} streams over "
          f"{env.get('WAN_CONNECTIONS', '1')} QUIC connection(s), compression on (incompressible data)")
    print("- link: scripts/wan-relay.py, loss per datagram in both directions, bottleneck rate "
          "with a drop-tail queue of one BDP (at least 64 KiB)")
    print("- goodput: data / transfer s (the shipper's \"cycle planned\" to the last big datagram "
          "the relay delivered; startup included) as a share of the link rate (QUIC, UDP and IP "
          "headers take ~3.5%, so ~96% is a full link); steady: the same from 5 s into the "
          "transfer to its last full second; sent ÷ delivered: client->server datagrams sent per "
          "datagram delivered; queue: the bottleneck queue's time-weighted mean over the "
          "transfer, in BDPs. The targets are checked on the whole-transfer goodput.")
    print(f"- \"> cap\": not finished after {env.get('WAN_CAP_S', '?')} s; data = what the "
          "applier had applied by then (allocated bytes of the replica image: the initial copy "
          "writes in place; the applier's admin socket names the cycle but counts no bytes)\n")

    link = [r for r in rows if r["label"] == "link"]
    if link:
        keys = []
        for r in link:
            k = (r["rate"], r["delay_ms"], r["loss"])
            if k not in keys:
                keys.append(k)
        print("## The issue's table\n")
        print("Per controller: goodput (% of link) / sent ÷ delivered / mean queue (BDP).\n")
        head = " | ".join(order)
        print(f"| link | loss | target | {head} | vmr meets the target |")
        print("|---|---:|---|" + "---|" * len(order) + "---|")
        for k in keys:
            cells, met = [], ""
            tgt = None
            for cc in order:
                r = next((x for x in link if (x["rate"], x["delay_ms"], x["loss"]) == k
                          and x["cc"] == cc), None)
                if r is None:
                    cells.append("")
                    continue
                if r.get("skipped"):
                    cells.append("skipped")
                    continue
                tgt = targets(r)
                share, waste, qm, _ = measures(r)
                c = f"{pct(share)} / {waste:.2f}" if waste else f"{pct(share)} / ?"
                c += f" / {qm:.2f}" if qm is not None else " / ?"
                if not r["finished"]:
                    c += " (> cap)"
                cells.append(c)
                if cc == "vmr" and tgt:
                    ok = share >= tgt[0] and waste is not None and waste <= tgt[1] and r["finished"]
                    met = "yes" if ok else "**no**"
            rate, delay, loss = k
            t = f"≥ {pct(tgt[0])}, ≤ {tgt[1]:.3f}" if tgt else "—"
            print(f"| {rate / 1e6:g} Mbit/s, {2 * delay:g} ms | {loss * 100:g}% | {t} | "
                  + " | ".join(cells) + f" | {met} |")
        print()
        print("## Every case\n")
        print("| congestion | link | loss | data MiB | transfer s | goodput Mbit/s | % of link | "
              "steady % of link | sent ÷ delivered | queue mean / max (BDP) | relay drops loss / "
              "queue / kernel | cpu s/GiB shipper / applier | relay cpu | cycle s | load1 | notes |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|---:|---:|---|")
        for r in link:
            linkdesc = f"{r['rate'] / 1e6:g} Mbit/s, {2 * r['delay_ms']:g} ms"
            if r.get("skipped"):
                print(f"| {r['cc']} | {linkdesc} | {r['loss'] * 100:g}% | | | | | | | | | | | | | "
                      "skipped (time budget) |")
                continue
            share, waste, qm, qx = measures(r)
            t = r.get("transfer_s")
            mib = r.get("data_mib", 0)
            ts_ = f"{t:.1f}" if t else "?"
            if not r["finished"]:
                ts_ = f"> cap ({ts_})"
            gib = mib / 1024
            per = (f"{r['cpu_shipper'] / gib:.1f} / {r['cpu_applier'] / gib:.1f}"
                   if gib > 0.01 else "—")
            relay_share = r["cpu_relay"] / r["relay_elapsed"] if r["relay_elapsed"] else 0
            notes = []
            if r["interrupted"]:
                notes.append(f"{r['interrupted']} reconnect(s): {r.get('first_error', '')}")
            if r.get("applier"):
                notes.append(r["applier"])
            if not r["finished"] and t:
                notes.append(f"relay delivered {r['c2s_bytes'] / MIB:.1f} MiB of UDP payload "
                             f"({r['c2s_bytes'] * 8 / t / 1e6:.1f} Mbit/s)")
            dr = r["drops"]
            qs = f"{qm:.2f} / {qx:.2f}" if qm is not None else f"? / {qx:.2f}"
            steady = r.get("steady_goodput_bps")
            st = pct(steady / r["rate"]) if steady else "—"
            print(f"| {r['cc']} | {linkdesc} | {r['loss'] * 100:g}% | {mib:.1f} | {ts_} | "
                  f"{share * r['rate'] / 1e6:.1f} | {pct(share)} | {st} | "
                  f"{waste:.3f} | {qs} | {dr['loss']} / {dr['queue']} / {r['kernel_rx_drops']} | "
                  f"{per} | {pct(relay_share)} | {r.get('cycle_s') or 0:.1f} | {r['load1']} | "
                  f"{'; '.join(notes)} |" if waste else
                  f"| {r['cc']} | {linkdesc} | {r['loss'] * 100:g}% | {mib:.1f} | {ts_} | | | | | | | "
                  f"{per} | | | {r['load1']} | nothing delivered |")
        print()

    pairs = [r for r in rows if r["label"] == "pair"]
    if pairs:
        print("## Two shippers sharing one bottleneck\n")
        print(f"Started together through one relay (--multi); each one's rate = its UDP payload "
              f"delivered by the relay from {env.get('WAN_FAIR_WARM_S', '?')} s after the start "
              "to the last second both were still sending. Targets: two vmr shippers within "
              "60/40; beside a cubic shipper, cubic keeps at least a third.\n")
        print("| shippers | link | Mbit/s first / second | share first / second | % of link "
              "(both) | window s | queue mean / max (BDP) | relay drops loss / queue | "
              "target met | load1 |")
        print("|---|---|---|---|---:|---:|---|---|---|---:|")
        for r in pairs:
            if r.get("skipped") or "mbit" not in r:
                print(f"| {r['cc']} | | | | | | | | {'skipped (time budget)' if r.get('skipped') else 'no common window'} | |")
                continue
            a, b = r["mbit"]
            tot = a + b
            bdp = max(bdp_bytes(r["rate"], r["delay_ms"]), 1)
            qm = r.get("queue_mean")
            qs = (f"{qm / bdp:.2f}" if qm is not None else "?") + f" / {r['queue_max'] / bdp:.2f}"
            first, second = r["cc"].split("+")
            if first == second:
                ok = 0.4 <= a / tot <= 0.6 if tot else False
            elif second == "cubic":
                ok = b / tot >= 1 / 3 if tot else False
            else:
                ok = None
            print(f"| {first} + {second} | {r['rate'] / 1e6:g} Mbit/s, {2 * r['delay_ms']:g} ms, "
                  f"{r['loss'] * 100:g}% | {a:.1f} / {b:.1f} | {pct(a / tot)} / {pct(b / tot)} | "
                  f"{pct(tot * 1e6 / r['rate'])} | {r['window_s']} | {qs} | "
                  f"{r['drops']['loss']} / {r['drops']['queue']} | "
                  f"{'—' if ok is None else 'yes' if ok else '**no**'} | {r['load1']} |")
        print()

    lim = [r for r in rows if r["label"] == "limit"]
    if lim:
        def parse_limit(s):
            s = s.strip().upper()
            m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            return int(s[:-1] if m != 1 else s) * m
        print("## bandwidth_limit accuracy\n")
        print("No relay rate limit, no loss. The limiter paces chunk frames (payload + 48 B), "
              "so the frame rate is what must match, whatever the controller; QUIC headers, "
              "ACKs and retransmissions come on top (UDP payload at the relay; IP/UDP headers "
              "not counted).\n")
        print("| congestion | bandwidth_limit | configured B/s | measured, whole transfer (frames) | "
              "error | steady 5→10 s (data) | error | UDP payload at the relay | error | "
              "transfer s | notes |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in lim:
            if r.get("skipped"):
                print(f"| {r['cc']} | {r['limit']} | | | | | | | | | skipped (time budget) |")
                continue
            want = parse_limit(r["limit"])
            t = r.get("transfer_s")
            whole = r.get("wire_mib", 0) * MIB / t if t and r["finished"] else 0
            steady = r.get("steady_Bps", 0)
            e = lambda v: f"{100 * (v - want) / want:+.1f}%" if v else "—"
            f = lambda v: f"{v:,.0f}" if v else "— (transfer < 10 s)"
            udp = r["c2s_bytes"] / t if t and r["finished"] else 0
            notes = "" if r["finished"] else "not finished within the cap"
            print(f"| {r['cc']} | {r['limit']} | {want:,} | {f(whole)} | {e(whole)} | "
                  f"{f(steady)} | {e(steady)} | {f(udp)} | {e(udp)} | {t or 0:.1f} | {notes} |")
        print()

    ceil = [r for r in rows if r["label"] == "ceiling"]
    print("## The relay's ceiling\n")
    if ceil and ceil[0].get("pps_per_core"):
        pps = ceil[0]["pps_per_core"]
        print(f"Flooded with 1200-byte datagrams, the relay forwarded {pps:,.0f} datagrams per "
              f"CPU-second: one core carries about {pps * 1228 * 8 / 1e6:,.0f} Mbit/s of them "
              "(IP/UDP headers counted). Beside 1200-byte data, a QUIC sender's ACKs cost the "
              "relay about one datagram per two.")
    else:
        print("Not measured (WAN_CEILING_S=0).")
    busy = [(r["cpu_relay"] / r["relay_elapsed"], r) for r in link + pairs
            if not r.get("skipped") and r.get("relay_elapsed")]
    if busy:
        share, r = max(busy, key=lambda x: x[0])
        print(f"The busiest relay of this run used {pct(share)} of a core ({r['cc']}, "
              f"{r['rate'] / 1e6:g} Mbit/s, {r['loss'] * 100:g}% loss): "
              + ("it was not the bottleneck." if share < 0.8 else
                 "**near its ceiling: that case may be bounded by the relay.**"))
    print()


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    {"case": case, "pair": pair, "ceiling": ceiling, "report": report}[mode](*(
        [args] if mode != "report" else args))


if __name__ == "__main__":
    main()
