#!/usr/bin/env bash
# RPO under load: how far behind the primary the replica is while a guest writes steadily.
#
# The shipper runs continuously (interval = "continuous": each cycle freezes right after the
# last one was applied) while fio writes random 64 KiB blocks through the tracker at each rate
# of BENCH_RPO_RATES (MB/s) for BENCH_RPO_SECONDS each. The replica store is on
# BENCH_REPLICA_DIR if given (a second disk, or /dev/shm standing in for one), else beside the
# primary on this machine's disk.
#
# How the lag is measured: a write acknowledged at time t is in the first generation the
# tracker freezes after t (a freeze drains the writes in flight first), and it is on the
# replica once the applier committed that generation (images fsynced, point recorded). So the
# lag of a write at t is commit(next freeze after t) - t, from the tracker's "froze all
# disks" and the applier's "cycle applied" log lines (one clock). fio writes at a steady
# rate, so the distribution of writes' lags is that of lag(t) over the run's time: sampled
# every millisecond, it gives p50, p99 and max. (Lag is counted from the acknowledgement:
# a write's own latency is not in it.) The rate is "kept up with" when the lag stays bounded:
# the mean lag over the run's last quarter is at most 1.5x that over its second quarter plus
# 0.25 s, and no cycle was still pending at the end.
#
# Output: markdown on stdout and in benches/results/rpo-<stamp>.md, and a PNG of lag over
# time per rate (benches/results/rpo-<stamp>-<rate>MBps.png, gnuplot).
# Environment: BENCH_RPO_RATES="20 60 100 150 200" BENCH_RPO_SECONDS=120 BENCH_RPO_SIZE=8G
#   VMREPLICA=target/release/vmreplica BENCH_DIR=<mktemp under /var/tmp> BENCH_REPLICA_DIR
#   BENCH_MAX_SECONDS=2400 BENCH_KEEP=0
set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
log() { echo "rpo-bench: $*" >&2; }
die() { log "error: $*"; exit 2; }

RATES=${BENCH_RPO_RATES:-20 60 100 150 200}
SECONDS_EACH=${BENCH_RPO_SECONDS:-120}
SIZE=${BENCH_RPO_SIZE:-8G}
BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-2400}
BENCH_KEEP=${BENCH_KEEP:-0}
VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}
[[ -x $VMREPLICA ]] || die "no $VMREPLICA (cargo build --release --bin vmreplica)"
for t in fio gnuplot python3; do command -v $t >/dev/null || die "$t not found (scripts/install-deps.sh)"; done

work=${BENCH_DIR:-$(mktemp -d /var/tmp/rpo-bench.XXXXXX)}
mkdir -p "$work"
if [[ -n ${BENCH_REPLICA_DIR:-} ]]; then
  mkdir -p "$BENCH_REPLICA_DIR"
  store=$(mktemp -d "$BENCH_REPLICA_DIR/rpo-bench.XXXXXX")
else
  store=$work/replica
fi
stamp=$(date +%Y-%m-%d-%H%M%S)
results=$repo_dir/benches/results
mkdir -p "$results"
md_out=$results/rpo-$stamp.md
pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [[ -n ${watchdog:-} ]] && { kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null; } || true
  if [[ $BENCH_KEEP == 1 ]]; then log "kept $work $store"; else rm -rf "$work" "$store"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'log "time limit or signal"; exit 124' TERM
( sleep "$BENCH_MAX_SECONDS"; log "time limit ${BENCH_MAX_SECONDS}s reached"; kill -TERM $$ ) &
watchdog=$!
start() { "$@" & pids+=($!); }
wait_for() { local t=$1; shift
  for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out waiting for: $*"; }
port=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

img=$work/vm1-sys.img
truncate -s "$SIZE" "$img"
"$VMREPLICA" certs init-ca --dir "$work/ca" >/dev/null
"$VMREPLICA" certs issue --ca "$work/ca" --name primary-1 >/dev/null
"$VMREPLICA" certs issue --ca "$work/ca" --name replica-1 --ip 127.0.0.1 >/dev/null
start "$VMREPLICA" applier --store "$store" --listen "127.0.0.1:$port" --keep 8 \
  --cert "$work/ca/replica-1.pem" --key "$work/ca/replica-1.key" --ca "$work/ca/ca.pem" \
  --allow primary-1 2>"$work/applier.log"
start "$VMREPLICA" tracker --state-dir "$work/primary" --disk "sys=$img" 2>"$work/tracker.log"
wait_for 20 test -S "$work/primary/control.sock"
uri="nbd+unix:///sys?socket=$work/primary/nbd.sock"
cat >"$work/shipper.toml" <<TOML
vm = "vm1"
tracker = "$work/primary/control.sock"
replica = "127.0.0.1:$port"
server_name = "replica-1"
ca = "$work/ca/ca.pem"
cert = "$work/ca/primary-1.pem"
key = "$work/ca/primary-1.key"
interval = "continuous"
compression = true
streams = 4
TOML
start "$VMREPLICA" shipper --config "$work/shipper.toml" 2>"$work/shipper.log"
wait_for 120 grep -q 'cycle applied on the replica' "$work/shipper.log"
log "initial copy done; measuring rates: $RATES MB/s, ${SECONDS_EACH}s each"

rows=()
for rate in $RATES; do
  t0=$(date +%s.%N)
  fio --name=guest --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=8 \
    --thread --time_based --runtime="$SECONDS_EACH" --rate=$((rate * 1000000)) \
    --refill_buffers --buffer_compress_percentage=50 --output-format=json \
    --output="$work/fio-$rate.json" >/dev/null
  t1=$(date +%s.%N)
  # Let the cycles holding the last writes land (they are counted, not the idle tail).
  sleep 5
  png=$results/rpo-$stamp-${rate}MBps.png
  row=$(python3 - "$work" "$rate" "$t0" "$t1" "$png" <<'PY'
import json, re, subprocess, sys
from datetime import datetime
work, rate, t0, t1, png = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
def ts(line):
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()
def field(line, k):
    m = re.search(rf"\b{k}=(\d+)", line)
    return int(m.group(1)) if m else None
freeze = {}
for l in open(f"{work}/tracker.log", errors="replace"):
    if "froze all disks" in l:
        freeze[field(l, "generation")] = ts(l)
commit = {}
for l in open(f"{work}/applier.log", errors="replace"):
    if "cycle applied" in l and "cycle=" in l:
        commit[field(l, "cycle")] = ts(l)
gens = sorted(g for g in freeze if g in commit)
# For every instant t of the run, the first freeze after t, and that cycle's commit.
fz = [(freeze[g], commit[g]) for g in gens if freeze[g] >= t0]
lags, series = [], []
i, t, step = 0, t0, 0.001
pending = False
while t < t1:
    while i < len(fz) and fz[i][0] < t:
        i += 1
    if i == len(fz):
        pending = True
        break
    lags.append(fz[i][1] - t)
    if len(lags) % 100 == 0:
        series.append((t - t0, fz[i][1] - t))
    t += step
lags.sort()
pct = lambda p: lags[min(len(lags) - 1, int(p * len(lags)))] if lags else float("nan")
n = len(lags)
q2 = lags and sum(l for _, l in series[len(series) // 4: len(series) // 2]) / max(1, len(series[len(series) // 4: len(series) // 2]))
q4 = lags and sum(l for _, l in series[3 * len(series) // 4:]) / max(1, len(series[3 * len(series) // 4:]))
kept = (not pending) and n > 0 and q4 <= 1.5 * q2 + 0.25
text = open(f"{work}/fio-{rate}.json").read()
fio = json.loads(text[text.index("{"):])
wrote = fio["jobs"][0]["write"]["bw_bytes"] / 1e6
cycles = len([g for g in gens if t0 <= freeze[g] <= t1])
with open(f"{work}/series-{rate}.dat", "w") as f:
    for x, y in series:
        f.write(f"{x:.3f} {y:.4f}\n")
subprocess.run(["gnuplot", "-e", f"""
set terminal png size 900,400; set output '{png}';
set title 'RPO under load: {rate} MB/s of random 64 KiB writes (achieved {wrote:.0f} MB/s)';
set xlabel 'time into the run (s)'; set ylabel 'lag of a write acknowledged then (s)';
set grid; set yrange [0:*];
plot '{work}/series-{rate}.dat' using 1:2 with lines title 'lag' lw 1
"""], check=True)
print(f"| {rate} | {wrote:.0f} | {cycles} | {pct(0.5):.2f} | {pct(0.99):.2f} | {lags[-1] if lags else float('nan'):.2f} | {'yes' if kept else 'no'} | {png.split('/')[-1]} |")
PY
)
  log "$row"
  rows+=("$row")
done

{
  echo "# RPO under load — $stamp"
  echo
  echo "- repo $(git -C "$repo_dir" rev-parse --short HEAD)$(git -C "$repo_dir" diff --quiet || echo ' (uncommitted changes)'); $(nproc) cores; $(uname -r); $(fio --version)"
  echo "- both sites on this machine over loopback; image $SIZE sparse; replica store: $(df --output=fstype "$store" | tail -n 1)$([[ -n ${BENCH_REPLICA_DIR:-} ]] && echo " ($BENCH_REPLICA_DIR)"); shipper continuous, 4 streams, lz4"
  echo "- lag of a write = the applier's commit of the first generation frozen after its acknowledgement, minus its acknowledgement (from the tracker's and the applier's logs), over every millisecond of each ${SECONDS_EACH} s run"
  echo
  echo "| rate asked MB/s | written MB/s | cycles | lag p50 s | lag p99 s | lag max s | kept up | plot |"
  echo "|---:|---:|---:|---:|---:|---:|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  best=$(printf '%s\n' "${rows[@]}" | awk -F'|' '$8 ~ /yes/ && $3 + 0 > r { r = $3 + 0 } END { print r + 0 }')
  echo "Highest write rate kept up with (lag bounded, not growing), as fio achieved it: ${best} MB/s (fio, the tracker and both sites share this machine: a rate fio did not reach is shown as written)."
} | tee "$md_out"
log "wrote $md_out"
