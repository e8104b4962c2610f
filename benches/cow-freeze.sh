#!/usr/bin/env bash
# Guest writes while a frozen generation waits to be shipped (copy-on-write cost).
#
# The tracker serves a fully allocated image; fio (nbd engine) runs 4k random writes at QD32 in
# three phases of BENCH_RUNTIME seconds each:
#   baseline  nothing frozen
#   frozen-1  right after `ctl freeze --full` (every block frozen, so nearly every write must
#             copy its block aside first: worst case, as during an initial sync)
#   frozen-2  the same generation still frozen, its hottest blocks already copied
# Reports IOPS and p99 latency per phase and the ratio to the baseline. The design rule is that
# replication falling behind must not stall the guest; this shows what it costs.
#
# Environment: BENCH_RUNTIME=5, BENCH_SIZE=1G, VMREPLICA=target/release/vmreplica,
# BENCH_DIR=<mktemp under /var/tmp>.
set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
BENCH_RUNTIME=${BENCH_RUNTIME:-5}
BENCH_SIZE=${BENCH_SIZE:-1G}
VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}
[[ -x $VMREPLICA ]] || { echo "cow-freeze: build first (cargo build --release)" >&2; exit 2; }
work=${BENCH_DIR:-$(mktemp -d /var/tmp/cow-bench.XXXXXX)}
mkdir -p "$work/state"
tracker_pid=""
cleanup() {
  [[ -n $tracker_pid ]] && kill -TERM "$tracker_pid" 2>/dev/null && wait "$tracker_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

size_mib=$(( $(numfmt --from=iec "${BENCH_SIZE%iB}") / 1048576 ))
dd if=/dev/zero of="$work/disk0.raw" bs=1M count="$size_mib" oflag=direct conv=fsync status=none
"$VMREPLICA" tracker --state-dir "$work/state" --disk "disk0=$work/disk0.raw" \
  --socket "$work/nbd.sock" 2>"$work/tracker.log" &
tracker_pid=$!
for _ in $(seq 100); do [[ -S $work/state/control.sock ]] && break; sleep 0.1; done
uri="nbd+unix:///disk0?socket=$work/nbd.sock"

phase() {
  timeout $((BENCH_RUNTIME + 60)) fio --name="$1" --ioengine=nbd --uri="$uri" --rw=randwrite \
    --bs=4k --iodepth=32 --numjobs=1 --thread --time_based --runtime="$BENCH_RUNTIME" \
    --percentile_list=99 --output-format=json --output="$work/$1.json" >/dev/null
  python3 - "$work/$1.json" <<'PY'
import json, sys
t = open(sys.argv[1]).read()  # libnbd's "connected" line precedes the JSON
w = json.loads(t[t.index("{"):])["jobs"][0]["write"]
print(f'{w["iops"]:.0f} {w["clat_ns"]["percentile"]["99.000000"] / 1000:.0f}')
PY
}
ctl() { "$VMREPLICA" ctl --socket "$work/state/control.sock" "$@"; }

read -r base_iops base_p99 < <(phase baseline)
ctl freeze --full >/dev/null
read -r f1_iops f1_p99 < <(phase frozen-1)
read -r f2_iops f2_p99 < <(phase frozen-2)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f×", a / b }'; }
echo "| phase (4k randwrite QD32, ${BENCH_RUNTIME}s, ${BENCH_SIZE} image) | IOPS | p99 µs | IOPS vs baseline |"
echo "|---|---:|---:|---:|"
echo "| nothing frozen | $base_iops | $base_p99 | 1.00× |"
echo "| full freeze pending, first ${BENCH_RUNTIME}s | $f1_iops | $f1_p99 | $(ratio "$f1_iops" "$base_iops") |"
echo "| full freeze pending, next ${BENCH_RUNTIME}s | $f2_iops | $f2_p99 | $(ratio "$f2_iops" "$base_iops") |"
