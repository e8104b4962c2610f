#!/usr/bin/env bash
# WAN benchmark: one replication cycle over an emulated long fat link, per congestion
# controller and loss rate, plus the accuracy of the shipper's bandwidth_limit.
#
# Every case starts afresh on loopback: tracker (serving a raw image holding WAN_SIZE_MIB of
# random, incompressible data in a sparse image of twice that size) -> shipper -> WAN relay
# (scripts/wan-relay.py: one-way delay, loss, bottleneck rate with a drop-tail queue of one
# bandwidth-delay product, both directions alike) -> applier with an empty store. The case is
# the shipper's INITIAL SYNC of that image: one cycle shipping exactly the random data (holes
# are skipped), which is a clean bulk-transfer measurement (no guest, no compression gain).
#
# Measured per case:
#   transfer s   from the shipper's "cycle planned" log line (chunks start flowing right
#                after it) to the last big (>= 1000 B) client->server datagram the relay
#                delivered to the applier: the time on the wire, retransmissions included.
#   goodput      data MiB / transfer s, in Mbit/s (10^6 bits/s) and as % of the link rate.
#   cycle s      the shipper's own "secs" of the cycle: planning, transfer, the applier's
#                verification, apply and fsyncs (disk-bound; 2x the data is written).
#   If the cycle has not finished after WAN_CAP_S seconds, the case is stopped and goodput is
#   what the applier staged by then (its staging log size) / time since "cycle planned";
#   the table marks it "> cap". cpu s: CPU seconds (utime+stime) of shipper / applier / relay.
# Bandwidth-limit rows: bandwidth_limit = WAN_LIMIT (bytes/s, K/M/G = 2^10/2^20/2^30, as in
#   the shipper's config) through the relay with the same delay, no loss, NO relay rate
#   limit; "measured" is the rate over the whole transfer of the chunk frames the shipper
#   wrote (its wire_mib, which is what the limiter paces) and the steady rate between the
#   shipper's 5 s and 10 s progress lines (data accepted by the limiter).
#
# THE MACHINE: shipper (TLS, lz4 attempt), applier (TLS, staging writes), the python relay
# and the tracker share this machine's cores (2 on the dev machines) and its virtual disk.
# The relay forwards ~10 us of CPU per datagram (~90 k datagrams/s, ~850 Mbit/s of 1200-byte
# datagrams on one free core); its kernel receive drops and CPU are in the table, so a case
# where the relay (or the CPU in general) was the bottleneck shows as such.
#
# Environment:
#   WAN_SIZE_MIB=256        random data in the image (MiB)
#   WAN_DELAY_MS=50         one-way delay (RTT = 2x)
#   WAN_RATE=200M           relay bottleneck, bits/s (K/M/G = 10^3/10^6/10^9)
#   WAN_LOSSES="0 0.005"    loss probabilities per datagram, each direction
#   WAN_CCS="cubic bbr newreno"   congestion controllers ([tuning] congestion)
#   WAN_LIMIT=20M           bandwidth_limit for the accuracy row; "" skips it
#   WAN_STREAMS=4           shipper streams
#   WAN_CONNECTIONS=1       QUIC connections the streams are spread over (shipper `connections`)
#   WAN_CAP_S=60            per case: stop if the cycle has not finished by then
#   WAN_MAX_SECONDS=570     hard limit for the whole script (cases left are skipped)
#   WAN_KEEP=0              1: keep the work directory (logs, images) under /var/tmp
#   VMREPLICA=<repo>/target/release/vmreplica   (built with cargo if missing)
# Output: markdown on stdout and in benches/results/wan-<stamp>.md. Exit 0 unless setup fails.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
die() { echo "wan: error: $*" >&2; exit 2; }
log() { echo "wan: $*" >&2; }

WAN_SIZE_MIB=${WAN_SIZE_MIB:-256}
WAN_DELAY_MS=${WAN_DELAY_MS:-50}
WAN_RATE=${WAN_RATE:-200M}
WAN_LOSSES=${WAN_LOSSES:-"0 0.005"}
WAN_CCS=${WAN_CCS:-"cubic bbr newreno"}
WAN_LIMIT=${WAN_LIMIT-20M}
WAN_STREAMS=${WAN_STREAMS:-4}
WAN_CONNECTIONS=${WAN_CONNECTIONS:-1}
WAN_CAP_S=${WAN_CAP_S:-60}
WAN_MAX_SECONDS=${WAN_MAX_SECONDS:-570}
WAN_KEEP=${WAN_KEEP:-0}
VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}
RELAY=$repo_dir/scripts/wan-relay.py

for v in WAN_SIZE_MIB WAN_CAP_S WAN_MAX_SECONDS WAN_STREAMS WAN_CONNECTIONS; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive whole number (got '${!v}')"
done
[[ $WAN_DELAY_MS =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "WAN_DELAY_MS must be a number of ms"
for l in $WAN_LOSSES; do
  python3 -c "import sys; v=float(sys.argv[1]); assert 0<=v<1" "$l" 2>/dev/null \
    || die "WAN_LOSSES: '$l' is not a probability"
done
for c in $WAN_CCS; do
  case $c in cubic | bbr | newreno) ;; *) die "WAN_CCS: unknown congestion controller '$c'" ;; esac
done
command -v python3 >/dev/null || die "python3 is required"
[[ -f $RELAY ]] || die "missing $RELAY"
# The relay validates the rate; ask it for the bits/s value once.
rate_bits=$(python3 -c "import importlib.util as u,sys
s=u.spec_from_file_location('r',sys.argv[1]); m=u.module_from_spec(s); s.loader.exec_module(m)
print(int(m.parse_rate(sys.argv[2])))" "$RELAY" "$WAN_RATE") || die "cannot parse WAN_RATE='$WAN_RATE'"

if [[ ! -x $VMREPLICA ]]; then
  log "building $VMREPLICA"
  (cd "$repo_dir" && cargo build --release --bin vmreplica) >&2 || die "cargo build failed"
fi

script_start=$SECONDS
WORK=$(mktemp -d /var/tmp/vmreplica-wan.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
  if [[ $WAN_KEEP == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# stop PID...: SIGTERM, wait up to 5 s, then SIGKILL; forget them.
stop() {
  local p q keep=()
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  for q in "${PIDS[@]}"; do
    for p in "$@"; do [[ $q == "$p" ]] && continue 2; done
    keep+=("$q")
  done
  PIDS=("${keep[@]}")
}
wait_for() { # wait_for SECONDS CMD...
  local t=$1; shift
  for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}
cpu_s() { # utime+stime of a live process, seconds
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat" 2>/dev/null || echo 0
}
free_udp_ports() { # two free UDP ports on 127.0.0.1
  python3 -c "import socket
s=[socket.socket(socket.AF_INET,socket.SOCK_DGRAM) for _ in range(2)]
[x.bind(('127.0.0.1',0)) for x in s]; print(*[x.getsockname()[1] for x in s])"
}

cd "$WORK"
log "work dir $WORK"
"$VMREPLICA" certs init-ca --dir ca >/dev/null
"$VMREPLICA" certs issue --ca ca --name primary-1 >/dev/null
"$VMREPLICA" certs issue --ca ca --name replica-1 --ip 127.0.0.1 >/dev/null
IMG=$WORK/vm1-sys.img
truncate -s $((2 * WAN_SIZE_MIB))M "$IMG"
dd if=/dev/urandom of="$IMG" bs=1M count="$WAN_SIZE_MIB" conv=notrunc status=none
log "image: $WAN_SIZE_MIB MiB random data in a $((2 * WAN_SIZE_MIB)) MiB sparse image"

ROWS=$WORK/rows.jsonl
: >"$ROWS"
n=0

# run_case LABEL CONGESTION LOSS RATE_BITS LIMIT: one initial sync through the relay.
run_case() {
  local label=$1 cc=$2 loss=$3 rate=$4 limit=$5
  n=$((n + 1))
  local d=$WORK/case-$n
  mkdir -p "$d"
  if ((SECONDS - script_start + WAN_CAP_S + 20 > WAN_MAX_SECONDS)); then
    log "skipping $label $cc loss=$loss: WAN_MAX_SECONDS=$WAN_MAX_SECONDS would be exceeded"
    printf '{"label":"%s","cc":"%s","loss":%s,"rate":%s,"limit":"%s","skipped":true}\n' \
      "$label" "$cc" "$loss" "$rate" "$limit" >>"$ROWS"
    return
  fi
  log "case $n: $label cc=$cc loss=$loss rate=$rate bit/s limit=${limit:-none}"
  local aport rport
  read -r aport rport < <(free_udp_ports)
  local load1
  load1=$(cut -d' ' -f1 /proc/loadavg)

  "$VMREPLICA" tracker --state-dir "$d/primary" --disk sys="$IMG" 2>"$d/tracker.log" &
  local tpid=$!
  PIDS+=("$tpid")
  wait_for 20 test -S "$d/primary/control.sock" || { tail -5 "$d/tracker.log" >&2; die "tracker did not start"; }
  "$VMREPLICA" applier --store "$d/replica" --listen "127.0.0.1:$aport" --cert ca/replica-1.pem \
    --key ca/replica-1.key --ca ca/ca.pem --allow primary-1 2>"$d/applier.log" &
  local apid=$!
  PIDS+=("$apid")
  local rargs=(--listen "127.0.0.1:$rport" --to "127.0.0.1:$aport" --delay-ms "$WAN_DELAY_MS"
    --loss "$loss" --seed "$n" --stats-json "$d/relay.json")
  [[ $rate != 0 ]] && rargs+=(--rate "$rate")
  python3 "$RELAY" "${rargs[@]}" 2>"$d/relay.log" &
  local rpid=$!
  PIDS+=("$rpid")
  wait_for 10 grep -q '^wan-relay: 127' "$d/relay.log" || { tail -5 "$d/relay.log" >&2; die "relay did not start"; }
  {
    echo "vm = \"vm1\""
    echo "tracker = \"$d/primary/control.sock\""
    echo "replica = \"127.0.0.1:$rport\""
    echo "server_name = \"replica-1\""
    echo "ca = \"$WORK/ca/ca.pem\""
    echo "cert = \"$WORK/ca/primary-1.pem\""
    echo "key = \"$WORK/ca/primary-1.key\""
    echo "interval = \"24h\""
    echo "compression = true"
    echo "streams = $WAN_STREAMS"
    echo "connections = $WAN_CONNECTIONS"
    [[ -n $limit ]] && echo "bandwidth_limit = \"$limit\""
    echo "[tuning]"
    echo "congestion = \"$cc\""
  } >"$d/shipper.toml"
  "$VMREPLICA" shipper --config "$d/shipper.toml" 2>"$d/shipper.log" &
  local spid=$!
  PIDS+=("$spid")
  local t_start=$SECONDS finished=0 staged=0 cap_wall=0
  while ((SECONDS - t_start < WAN_CAP_S)); do
    if grep -q 'cycle applied on the replica' "$d/shipper.log"; then finished=1; break; fi
    kill -0 "$spid" 2>/dev/null || break
    sleep 0.2
  done
  if ((!finished)); then
    cap_wall=$(date +%s.%N)
    staged=$(find "$d/replica" -path '*/staging/*' -name chunks.log -type f -printf '%s\n' 2>/dev/null | awk '{s+=$1} END {print s+0}')
  fi
  local cs ca cr
  cs=$(cpu_s "$spid"); ca=$(cpu_s "$apid"); cr=$(cpu_s "$rpid")
  stop "$spid"
  stop "$rpid" "$apid" "$tpid"
  python3 - "$d" "$label" "$cc" "$loss" "$rate" "$limit" "$finished" "$staged" "$cap_wall" \
    "$cs" "$ca" "$cr" "$load1" "$WAN_SIZE_MIB" >>"$ROWS" <<'PY'
import json, re, sys
from datetime import datetime
(d, label, cc, loss, rate, limit, finished, staged, cap_wall, cs, ca, cr, load1,
 size_mib) = sys.argv[1:]
def ts(line):
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
log = open(f"{d}/shipper.log", errors="replace").read().splitlines()
planned = [l for l in log if "cycle planned" in l]
applied = [l for l in log if "cycle applied on the replica" in l]
progress = [l for l in log if re.search(r"cycle \d+ \(\w+\): [\d.]+ / [\d.]+ MiB", l)]
interrupted = [l for l in log if "replication interrupted" in l]
try:
    relay = json.load(open(f"{d}/relay.json"))
except (OSError, ValueError):
    relay = {}
row = dict(label=label, cc=cc, loss=float(loss), rate=int(rate), limit=limit,
           finished=finished == "1", cpu=[float(cs), float(ca), float(cr)], load1=load1,
           interrupted=len(interrupted), size_mib=int(size_mib))
if interrupted:
    row["first_error"] = interrupted[0].split("replication interrupted: ", 1)[-1][:160]
t0 = ts(planned[0]) if planned else None
if applied:
    a = applied[-1]
    kv = dict(re.findall(r'(\w+)=("[^"]*"|\S+)', a))
    get = lambda k: float(kv.get(k, "0").strip('"'))
    row.update(data_mib=get("data_mib"), wire_mib=get("wire_mib"), cycle_s=get("secs"))
    end = relay.get("big_c2s_last_wall") or 0
    if t0 and end:
        row["transfer_s"] = end - t0
elif t0 and float(cap_wall):
    row["transfer_s"] = float(cap_wall) - t0
    row["data_mib"] = int(staged) / 1048576
# steady rate of data accepted by the sender between the 5 s and 10 s progress lines
pts = []
for l in progress:
    m = re.search(r": ([\d.]+) / [\d.]+ MiB", l)
    pts.append((ts(l), float(m.group(1)) * 1048576))
if len(pts) >= 2:
    (ta, ba), (tb, bb) = pts[0], pts[1]
    if tb > ta:
        row["steady_Bps"] = (bb - ba) / (tb - ta)
for k in ("kernel_rx_drops", "elapsed_s"):
    row[k] = relay.get(k)
c2s = relay.get("client->server", {})
s2c = relay.get("server->client", {})
row["drops"] = dict(loss=c2s.get("dropped_loss", 0) + s2c.get("dropped_loss", 0),
                    queue=c2s.get("dropped_queue", 0) + s2c.get("dropped_queue", 0),
                    c2s_pkts=c2s.get("forwarded_packets", 0),
                    c2s_bytes=c2s.get("forwarded_bytes", 0),
                    max_queue=c2s.get("max_queue_bytes", 0))
print(json.dumps(row))
PY
  tail -1 "$ROWS" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('wan:   ->', {k: r.get(k) for k in ('finished','transfer_s','data_mib','cycle_s','interrupted')})" >&2
  [[ $WAN_KEEP == 1 ]] || rm -rf "$d/replica" "$d/primary"
}

for loss in $WAN_LOSSES; do
  for cc in $WAN_CCS; do
    run_case link "$cc" "$loss" "$rate_bits" ""
  done
done
if [[ -n $WAN_LIMIT ]]; then
  run_case limit cubic 0 0 "$WAN_LIMIT"
fi

stamp=$(date +%Y-%m-%d-%H%M%S)
mkdir -p "$repo_dir/benches/results"
out=$repo_dir/benches/results/wan-$stamp.md
commit=$(git -C "$repo_dir" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$repo_dir" status --porcelain 2>/dev/null | grep -q . && echo " (uncommitted changes)" || true)
python3 - "$ROWS" "$stamp" "$commit$dirty" "$WAN_DELAY_MS" "$WAN_CAP_S" "$WAN_STREAMS" \
  "$(nproc)" "$(uname -r)" >"$out" <<'PY'
import json, os, sys
rows_file, stamp, commit, delay, cap, streams, cores, kernel = sys.argv[1:]
rows = [json.loads(l) for l in open(rows_file) if l.strip()]
rtt = 2 * float(delay)
print(f"# WAN replication benchmark — {stamp}\n")
print(f"> Shipper, applier, tracker and the python WAN relay share this machine's {cores} cores "
      "and its virtual disk; the relay costs ~10 µs of CPU per datagram. Compare rows within a run.\n")
print(f"- repo: {commit}; kernel {kernel}; {cores} cores")
print(f"- one case = the initial sync of an image holding {rows[0]['size_mib'] if rows else '?'} MiB of random "
      f"data, fresh tracker/applier/relay/shipper, {streams} streams over {os.environ.get('WAN_CONNECTIONS', '1')} QUIC connection(s), compression on (incompressible data)")
print(f"- link: scripts/wan-relay.py, RTT {rtt:g} ms ({float(delay):g} ms each way), loss per datagram in "
      "both directions, bottleneck rate with a drop-tail queue of one BDP")
print("- transfer s: shipper's \"cycle planned\" to the last big client->server datagram delivered by the "
      "relay; goodput = data / transfer s; cycle s = the shipper's cycle time including the applier's "
      f"verify + apply + fsync; \"> cap\": not finished after {cap} s, goodput = bytes staged on the replica by then")
print("- relay drops: emulated loss / bottleneck queue overflow (both directions) / the kernel's receive drops of the "
      "relay's sockets (sender bursts beyond its socket buffer or the relay short of CPU); sent ÷ delivered: "
      "client->server datagrams the shipper sent per datagram delivered (1.0x = no waste)\n")

def mbit(mib, s):
    return mib * 1048576 * 8 / s / 1e6 if s else 0.0

link = [r for r in rows if r["label"] == "link"]
if link:
    print("## One cycle over the emulated WAN\n")
    print("| congestion | link | loss | data MiB | transfer s | goodput Mbit/s | % of link | cycle s | "
          "relay drops loss / queue / kernel | sent ÷ delivered | cpu s shipper / applier / relay | load1 | notes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---|")
    for r in link:
        linkdesc = f"{r['rate'] / 1e6:g} Mbit/s, {rtt:g} ms"
        if r.get("skipped"):
            print(f"| {r['cc']} | {linkdesc} | {r['loss'] * 100:g}% | | | | | | | | | | skipped (time budget) |")
            continue
        t = r.get("transfer_s")
        mib = r.get("data_mib", 0)
        g = mbit(mib, t) if t else 0
        pct = f"{100 * g * 1e6 / r['rate']:.0f}%" if r["rate"] and t else ""
        ts = f"{t:.1f}" if t else "?"
        if not r["finished"]:
            ts = f"> cap ({ts})"
        cyc = f"{r['cycle_s']:.1f}" if r.get("cycle_s") else "—"
        dr = r["drops"]
        notes = []
        if r["interrupted"]:
            notes.append(f"{r['interrupted']} reconnect(s): {r.get('first_error', '')}")
        if not r["finished"] and t:
            # staged counts whole 1 MiB chunks only; the relay's count includes partial chunks,
            # QUIC overhead and retransmissions: the true goodput lies between the two
            notes.append(f"relay delivered {dr['c2s_bytes'] / 1048576:.1f} MiB of UDP payload "
                         f"({dr['c2s_bytes'] * 8 / t / 1e6:.1f} Mbit/s)")
        cpu = " / ".join(f"{c:.1f}" for c in r["cpu"])
        # datagrams the shipper sent (all client->server fates) per datagram delivered
        sent = dr["c2s_pkts"] + dr["queue"] + dr["loss"] + (r.get("kernel_rx_drops") or 0)
        ratio = f"{sent / dr['c2s_pkts']:.2f}" if dr["c2s_pkts"] else "?"
        print(f"| {r['cc']} | {linkdesc} | {r['loss'] * 100:g}% | {mib:.1f} | {ts} | {g:.1f} | {pct} | {cyc} | "
              f"{dr['loss']} / {dr['queue']} / {r.get('kernel_rx_drops')} | {ratio} | {cpu} | {r['load1']} | {'; '.join(notes)} |")
    print()

lim = [r for r in rows if r["label"] == "limit"]
if lim:
    def parse_limit(s):
        s = s.strip().upper()
        m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
        return int(s[:-1] if m != 1 else s) * m
    print("## bandwidth_limit accuracy\n")
    print(f"No relay rate limit, RTT {rtt:g} ms, no loss, cubic. The limiter paces chunk frames "
          "(payload + 48 B), so the frame rate is what must match; QUIC headers, ACKs and "
          "retransmissions come on top (UDP payload at the relay; IP/UDP headers not counted).\n")
    print("| bandwidth_limit | configured B/s | measured, whole transfer (frames) | error | steady 5→10 s (data) | error | UDP payload at the relay | error | transfer s | cycle s | notes |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in lim:
        if r.get("skipped"):
            print(f"| {r['limit']} | | | | | | | | skipped (time budget) |")
            continue
        want = parse_limit(r["limit"])
        t = r.get("transfer_s")
        whole = r.get("wire_mib", 0) * 1048576 / t if t and r["finished"] else 0
        steady = r.get("steady_Bps", 0)
        e = lambda v: f"{100 * (v - want) / want:+.1f}%" if v else "—"
        f = lambda v: f"{v:,.0f}" if v else "— (transfer < 10 s)"
        udp = r["drops"]["c2s_bytes"] / t if t and r["finished"] else 0
        notes = "" if r["finished"] else "not finished within the cap"
        if r["interrupted"]:
            notes += f" {r['interrupted']} reconnect(s)"
        print(f"| {r['limit']} | {want:,} | {f(whole)} | {e(whole)} | {f(steady)} | {e(steady)} | {f(udp)} | {e(udp)} | "
              f"{t or 0:.1f} | {r.get('cycle_s') or 0:.1f} | {notes} |")
    print()
PY
cat "$out"
log "written $out ($((SECONDS - script_start)) s)"
