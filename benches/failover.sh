#!/usr/bin/env bash
# Failover benchmarks: how fast a recovery point is served (test failover) and read, how fast
# an unplanned failover serves the disks, and what a failback ships.
#
# 1. Time to a test-failover export: for each disk size in BENCH_SIZES (sparse images with
#    BENCH_DATA of data, replicated to an applier on loopback, BENCH_POINTS_BACK + 2 recovery
#    points made by small writes between cycles), the time from `vmreplica failover test` to
#    the export answering (`nbdinfo --size` succeeds), at the newest point and
#    BENCH_POINTS_BACK points back; also when the command itself returned (URIs printed).
#    BENCH_ROUNDS alternating rounds (the order of newest/back flips each round), each test
#    failover stopped before the next; medians with their spread.
# 2. Read throughput of a test failover against the tracker on the same image: a
#    BENCH_READ_SIZE image filled with random data, replicated, then rewritten in part
#    (BENCH_READ_DELTAS cycles of 32 MiB of random 64 KiB blocks), so the oldest point reads
#    partly through undo logs. fio (nbd engine) reads the tracker's export, the test failover
#    of the newest point and of the oldest point, in BENCH_ROUNDS alternating rounds (the
#    order rotated each round): 4k random reads at QD32 and 1M sequential reads at QD8, for
#    BENCH_FIO_RUNTIME seconds each. Medians with spread, and the ratio test failover /
#    tracker as the median of the per-round ratios.
# 3. RTO of unplanned failover for the BENCH_SIZES disks at the newest point and
#    BENCH_POINTS_BACK back, and the bytes a failback after an unplanned failover ships with
#    BENCH_DIVERGENCE_PCT % divergence against the disk size (see f2_cases below).
#
# READ THIS BEFORE QUOTING NUMBERS: everything shares the machine's cores and one virtual
# disk; the ratios within one run are what the numbers are for.
#
# Environment (the issue's values are the defaults):
#   BENCH_SIZES="1G 64G"      disk sizes for the time to an export
#   BENCH_DATA=64M            data written into each before the initial copy
#   BENCH_POINTS_BACK=20      how far back the older point is
#   BENCH_ROUNDS=5            alternating rounds (all cases)
#   BENCH_READ_SIZE=1G        image of the throughput case (0 skips it)
#   BENCH_READ_DELTAS=3       rewrite cycles after the initial copy in the throughput case
#   BENCH_FIO_RUNTIME=10      seconds per fio workload
#   BENCH_DATA_MIB=256        data in the failover RTO case's disks (MiB)
#   BENCH_POINT_MIB=4         random writes per point in the failover RTO case (MiB)
#   BENCH_FAILBACK_SIZE=1G    disk of the failback case
#   BENCH_DIVERGENCE_PCT=1    share of it rewritten on the new primary
#   BENCH_CASES="export read failover"   which parts run
#   BENCH_DIR                 where images, store and sockets live (default: a new directory
#                             under /var/tmp; removed at exit unless BENCH_KEEP=1)
#   BENCH_MAX_SECONDS=3600    hard limit for the whole script
#   VMREPLICA=<repo>/target/release/vmreplica
#
# Output: markdown on stdout and in benches/results/failover-<stamp>.md.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
die() { echo "failover-bench: error: $*" >&2; exit 2; }
log() { echo "failover-bench: $*" >&2; }

BENCH_SIZES=${BENCH_SIZES:-"1G 64G"}
BENCH_DATA=${BENCH_DATA:-64M}
BENCH_POINTS_BACK=${BENCH_POINTS_BACK:-20}
BENCH_ROUNDS=${BENCH_ROUNDS:-5}
BENCH_READ_SIZE=${BENCH_READ_SIZE:-1G}
BENCH_READ_DELTAS=${BENCH_READ_DELTAS:-3}
BENCH_FIO_RUNTIME=${BENCH_FIO_RUNTIME:-10}
BENCH_CASES=${BENCH_CASES:-"export read failover"}
BENCH_DATA_MIB=${BENCH_DATA_MIB:-256}
BENCH_POINT_MIB=${BENCH_POINT_MIB:-4}
BENCH_FAILBACK_SIZE=${BENCH_FAILBACK_SIZE:-1G}
BENCH_DIVERGENCE_PCT=${BENCH_DIVERGENCE_PCT:-1}
BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-3600}
BENCH_KEEP=${BENCH_KEEP:-0}
VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}

for v in BENCH_POINTS_BACK BENCH_ROUNDS BENCH_READ_DELTAS BENCH_FIO_RUNTIME BENCH_MAX_SECONDS; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
[[ $BENCH_ROUNDS -ge 1 ]] || die "BENCH_ROUNDS must be >= 1"
[[ -x $VMREPLICA ]] || die "$VMREPLICA is not an executable: cargo build --release (or set VMREPLICA)"
for t in fio nbdinfo qemu-io python3 numfmt sha256sum; do
  command -v "$t" >/dev/null || die "$t not found (scripts/install-deps.sh)"
done
bytes() { numfmt --from=iec "${1%B}"; }

# The whole script is bounded: past BENCH_MAX_SECONDS it is stopped and cleans up.
if [[ -z ${FAILOVER_BENCH_BOUNDED:-} ]]; then
  export FAILOVER_BENCH_BOUNDED=1
  exec timeout --signal=TERM --kill-after=30 "$BENCH_MAX_SECONDS" "$0" "$@"
fi

work=${BENCH_DIR:-$(mktemp -d /var/tmp/vmreplica-failover-bench.XXXXXX)}
mkdir -p "$work"
stamp=$(date -u +%Y-%m-%d-%H%M%S)
results="$repo_dir/benches/results/failover-$stamp.md"
mkdir -p "$repo_dir/benches/results"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ $BENCH_KEEP != 1 ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 1' TERM INT

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
now() { date +%s.%N; }

# A replication bed in $1: tracker on image $1/sys.img (of size $2), applier, shipper with
# interval $3. Sets bed_store, bed_uri, bed_shipper_log.
start_bed() {
  local d=$1 size=$2 interval=$3 port
  mkdir -p "$d"
  "$VMREPLICA" certs init-ca --dir "$d/ca" >/dev/null
  "$VMREPLICA" certs issue --ca "$d/ca" --name primary-1 >/dev/null
  "$VMREPLICA" certs issue --ca "$d/ca" --name replica-1 --ip 127.0.0.1 >/dev/null
  [[ -e $d/sys.img ]] || truncate -s "$size" "$d/sys.img"
  port=$(free_port)
  "$VMREPLICA" tracker --state-dir "$d/state" --disk "sys=$d/sys.img" --socket "$d/nbd.sock" \
    >"$d/tracker.log" 2>&1 &
  pids+=($!)
  "$VMREPLICA" applier --store "$d/store" --listen "127.0.0.1:$port" --allow primary-1 \
    --cert "$d/ca/replica-1.pem" --key "$d/ca/replica-1.key" --ca "$d/ca/ca.pem" \
    >"$d/applier.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do [[ -S $d/nbd.sock && -S $d/state/control.sock ]] && break; sleep 0.1; done
  cat >"$d/shipper.toml" <<EOF
vm = "vm1"
tracker = "$d/state/control.sock"
replica = "127.0.0.1:$port"
server_name = "replica-1"
ca = "$d/ca/ca.pem"
cert = "$d/ca/primary-1.pem"
key = "$d/ca/primary-1.key"
interval = "$interval"
EOF
  "$VMREPLICA" shipper --config "$d/shipper.toml" >"$d/shipper.log" 2>&1 &
  pids+=($!)
  bed_store=$d/store
  bed_uri="nbd+unix:///sys?socket=$d/nbd.sock"
  bed_shipper_log=$d/shipper.log
}

stop_bed() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}

points() { "$VMREPLICA" applier points vm1 --store "$bed_store" 2>/dev/null | awk 'NR > 1 { print $1 }'; }
applied() { grep -c "cycle applied on the replica" "$bed_shipper_log" || true; }
wait_applied() { # $1: count to reach
  local deadline=$((SECONDS + 600))
  while [[ $(applied) -lt $1 ]]; do
    [[ $SECONDS -lt $deadline ]] || die "replication stalled; shipper log: $(tail -3 "$bed_shipper_log")"
    sleep 0.2
  done
}

# Median and spread of numbers on stdin: "median (min-max)".
stats() { python3 -c '
import sys, statistics
v = [float(x) for x in sys.stdin.read().split()]
fmt = sys.argv[1]
print((fmt % statistics.median(v)) + (" (" + fmt % min(v) + "-" + fmt % max(v) + ")" if len(v) > 1 else "") if v else "-")
' "$1"; }

report=()
say() { report+=("$*"); echo "$*"; }

say "# Failover benchmarks, $stamp"
say ""
say "PROVISIONAL unless run on a quiet machine: $(nproc) cores, shared. Rounds: $BENCH_ROUNDS."
say ""

# ---- 1. time to a test-failover export ------------------------------------------------------
export_case() {
  say "## Time from \`vmreplica failover test\` to the export answering (nbdinfo)"
  say ""
  say "Disks sparse with $BENCH_DATA of data; $((BENCH_POINTS_BACK + 2)) or more points made by 1 MiB writes between cycles."
  say ""
  say "| disk | point | command returned (s) | export answers (s) |"
  say "|---|---|---:|---:|"
  local size
  for size in $BENCH_SIZES; do
    local d="$work/export-$size"
    log "export case: $size disk"
    mkdir -p "$d"
    truncate -s "$size" "$d/sys.img"
    fio --name=fill --rw=write --bs=1M --refill_buffers --size="$BENCH_DATA" \
      --filename="$d/sys.img" >/dev/null
    start_bed "$d" "$size" "200ms"
    wait_applied 1
    local i=0
    while [[ $(points | wc -l) -lt $((BENCH_POINTS_BACK + 2)) ]]; do
      i=$((i + 1))
      local before; before=$(applied)
      qemu-io -f raw "$bed_uri" -c "write -P $((i % 250 + 1)) $(((i * 7919) % 1000))M 1M" >/dev/null
      wait_applied $((before + 1))
    done
    local r which
    : >"$d/times"
    for r in $(seq "$BENCH_ROUNDS"); do
      local order=(latest back)
      [[ $((r % 2)) -eq 0 ]] && order=(back latest)
      for which in "${order[@]}"; do
        local pts; mapfile -t pts < <(points)
        local p=${pts[-1]}
        [[ $which == back ]] && p=${pts[-1 - BENCH_POINTS_BACK]}
        local t0 t1 t2 uri
        t0=$(now)
        uri=$("$VMREPLICA" failover test vm1 --point "$p" --store "$bed_store" --json |
          python3 -c 'import json, sys; print(json.load(sys.stdin)["disks"][0]["uri"])')
        t1=$(now)
        until nbdinfo --size "$uri" >/dev/null 2>&1; do sleep 0.005; done
        t2=$(now)
        echo "$which $(python3 -c "print($t1 - $t0, $t2 - $t0)")" >>"$d/times"
        "$VMREPLICA" failover test-stop vm1 --point "$p" --store "$bed_store" >/dev/null
      done
    done
    for which in latest back; do
      local label="newest"
      [[ $which == back ]] && label="$BENCH_POINTS_BACK back"
      say "| $size | $label | $(awk -v w=$which '$1 == w { print $2 }' "$d/times" | stats %.3f) | $(awk -v w=$which '$1 == w { print $3 }' "$d/times" | stats %.3f) |"
    done
    stop_bed
    [[ $BENCH_KEEP == 1 ]] || rm -rf "$d"
  done
  say ""
}

# ---- 2. read throughput: test failover vs tracker ---------------------------------------------
fio_read() { # $1 uri, $2 rw, $3 bs, $4 iodepth -> MiB/s
  local out="$work/fio.json"
  fio --name=r --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" --numjobs=1 \
    --time_based --runtime="$BENCH_FIO_RUNTIME" --ramp_time=1 --output-format=json \
    --output="$out" >/dev/null 2>&1 || die "fio $2 $3 on $1 failed"
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["jobs"][0]["read"]["bw_bytes"] / 1048576)' "$out"
}

read_case() {
  [[ $(bytes "$BENCH_READ_SIZE") -gt 0 ]] || return 0
  local d="$work/read"
  log "read case: $BENCH_READ_SIZE image"
  mkdir -p "$d"
  truncate -s "$BENCH_READ_SIZE" "$d/sys.img"
  fio --name=fill --rw=write --bs=1M --refill_buffers --size="$BENCH_READ_SIZE" \
    --filename="$d/sys.img" >/dev/null
  start_bed "$d" "$BENCH_READ_SIZE" "1s"
  wait_applied 1
  local k
  for k in $(seq "$BENCH_READ_DELTAS"); do
    local before; before=$(applied)
    fio --name=delta --ioengine=nbd --uri="$bed_uri" --rw=randwrite --bs=64k \
      --size="$BENCH_READ_SIZE" --io_size=32M --refill_buffers --randseed="$k" >/dev/null
    wait_applied $((before + 2))
  done
  local pts; mapfile -t pts < <(points)
  local newest=${pts[-1]} oldest=${pts[0]}
  local tn to
  tn=$("$VMREPLICA" failover test vm1 --point "$newest" --store "$bed_store" --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["disks"][0]["uri"])')
  to=$("$VMREPLICA" failover test vm1 --point "$oldest" --store "$bed_store" --json |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["disks"][0]["uri"])')
  local targets=(tracker newest oldest) r w
  declare -A uri=([tracker]=$bed_uri [newest]=$tn [oldest]=$to)
  local workloads=("randread 4k 32" "read 1M 8")
  : >"$d/mibs"
  for r in $(seq "$BENCH_ROUNDS"); do
    local n=${#targets[@]} j
    for j in $(seq 0 $((n - 1))); do
      local t=${targets[$(((j + r) % n))]}
      for w in "${workloads[@]}"; do
        # shellcheck disable=SC2086
        echo "$r $t ${w// /_} $(fio_read "${uri[$t]}" $w)" >>"$d/mibs"
      done
    done
  done
  say "## Read throughput: test failover against the tracker on the same $BENCH_READ_SIZE image (fio nbd engine)"
  say ""
  say "Points: newest $newest, oldest $oldest ($BENCH_READ_DELTAS cycles of 32 MiB random 64 KiB writes after the initial copy). MiB/s, median (spread); ratios are medians of per-round ratios."
  say ""
  say "| workload | tracker | test failover, newest | test failover, oldest | newest / tracker | oldest / tracker |"
  say "|---|---:|---:|---:|---:|---:|"
  for w in "${workloads[@]}"; do
    local key=${w// /_}
    local cells=() t
    for t in tracker newest oldest; do
      cells+=("$(awk -v t=$t -v k="$key" '$2 == t && $3 == k { print $4 }' "$d/mibs" | stats %.0f)")
    done
    local ratios=()
    for t in newest oldest; do
      ratios+=("$(python3 - "$d/mibs" "$key" "$t" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
k, t = sys.argv[2], sys.argv[3]
by = {}
for r, target, key, v in rows:
    if key == k:
        by.setdefault(r, {})[target] = float(v)
v = [x[t] / x["tracker"] for x in by.values() if t in x and x.get("tracker")]
print(("%.2f" % statistics.median(v)) + (" (%.2f-%.2f)" % (min(v), max(v)) if len(v) > 1 else "") if v else "-")
EOF
)")
    done
    say "| ${w% *} QD${w##* } | ${cells[0]} | ${cells[1]} | ${cells[2]} | ${ratios[0]} | ${ratios[1]} |"
  done
  say ""
  "$VMREPLICA" failover test-stop vm1 --all --store "$bed_store" >/dev/null
  stop_bed
}

# ---- 3. unplanned failover's RTO and failback bytes ----------------------------------------
# Two sites on loopback as real processes: site A (tracker, shipper, its own applier for the
# replication back) and site B (applier). In a subshell of its own: its helpers, processes
# and cleanup stay apart from the cases above.
#   RTO of `vmreplica failover unplanned` (command to disks served; no guest boot) for sparse
#   disks of each of BENCH_SIZES holding BENCH_DATA_MIB MiB, at the latest point and
#   BENCH_POINTS_BACK points back (each point BENCH_POINT_MIB MiB of random 64 KiB writes),
#   BENCH_ROUNDS alternating rounds, each failover cancelled before the next. Targets: under
#   5 s for any size at the latest point; an older point costs the changes rolled back (the
#   redo log's size), never the disk size.
#   Failback bytes: on a BENCH_FAILBACK_SIZE disk, an unplanned failover, the new primary
#   rewrites BENCH_DIVERGENCE_PCT % of the disk, commit; the old primary returns and
#   `vmreplica reverse` ships back only the divergent ranges: the reverse cycle's bytes against
#   the disk size; then a planned failback, both sites' disks equal (sha256).
f2_cases() (
  f2_md=$1
  work=$work/f2
  mkdir -p "$work"
  pids=()
  cleanup() {
    local p
    for p in "${pids[@]:-}"; do [[ -n $p ]] && kill -9 "$p" 2>/dev/null || true; done
    # (the sites' stores are $work/SIZE/{a,b}/store)
    for lock in "$work"/*/*/store/vm1/primary/tracker/shipper.lock "$work"/*/*/store/vm1/primary/tracker/lock; do
      [[ -f $lock ]] || continue
      p=$(cat "$lock" 2>/dev/null || true)
      [[ $p =~ ^[0-9]+$ ]] && kill -9 "$p" 2>/dev/null || true
    done
  
  }
  trap cleanup EXIT
  ca=$work/ca
  "$VMREPLICA" certs init-ca --dir "$ca" >/dev/null
  for n in primary-1 site-a site-b; do
    "$VMREPLICA" certs issue --ca "$ca" --name "$n" --ip 127.0.0.1 >/dev/null
  done
  free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

  # start_applier DIR CERT PORT: an applier on DIR/store (every point kept).
  start_applier() {
    local d=$1 cert=$2 port=$3
    mkdir -p "$d"
    "$VMREPLICA" applier --store "$d/store" --listen "127.0.0.1:$port" \
      --cert "$ca/$cert.pem" --key "$ca/$cert.key" --ca "$ca/ca.pem" \
      --allow primary-1 --allow site-a --allow site-b --keep-all-for 100d \
      2>>"$d/applier.log" &
    pids+=($!)
    for _ in $(seq 100); do [[ -S $d/store/applier.sock ]] && return; sleep 0.1; done
    die "applier in $d did not start"
  }

  # applied LOG: cycles a shipper log says were applied.
  applied() { grep -c "cycle applied on the replica" "$1" 2>/dev/null || true; }
  wait_applied() { # LOG N
    local deadline=$((SECONDS + 600))
    while (( $(applied "$1") < $2 )); do
      (( SECONDS < deadline )) || die "replication stalled: $(tail -5 "$1")"
      sleep 0.2
    done
  }
  # randwrite URI SIZE MIB: MIB of random 64 KiB writes over the disk, through NBD.
  randwrite() {
    fio --name=w --ioengine=nbd --uri="$1" --rw=randwrite --bs=64k --size="$2" \
      --io_size="$3M" --iodepth=8 --refill_buffers --randrepeat=0 --output=/dev/null >/dev/null
  }
  median() { python3 -c 'import sys,statistics; v=[float(x) for x in sys.argv[1:]]; print("%.2f (%.2f-%.2f)" % (statistics.median(v), min(v), max(v)))' "$@"; }

  # setup SIZE: fresh sites; site A's disk of SIZE holds BENCH_DATA_MIB MiB, replicated.
  setup() {
    local size=$1
    site=$work/$size
    rm -rf "$site"; mkdir -p "$site/a" "$site/b"
    img=$site/a/vm1-sys.img
    truncate -s "$size" "$img"
    port_a=$(free_port); port_b=$(free_port)
    start_applier "$site/a" site-a "$port_a"
    start_applier "$site/b" site-b "$port_b"
    "$VMREPLICA" tracker --state-dir "$site/a/state" --disk "sys=$img" 2>>"$site/a/tracker.log" &
    tracker_pid=$!; pids+=("$tracker_pid")
    for _ in $(seq 100); do [[ -S $site/a/state/nbd.sock ]] && break; sleep 0.1; done
    uri_a="nbd+unix:///sys?socket=$site/a/state/nbd.sock"
    fio --name=fill --ioengine=nbd --uri="$uri_a" --rw=write --bs=1M --size="${BENCH_DATA_MIB}M" \
      --refill_buffers --output=/dev/null >/dev/null
    cat >"$site/a/shipper.toml" <<END
  vm = "vm1"
  tracker = "$site/a/state/control.sock"
  replica = "127.0.0.1:$port_b"
  server_name = "site-b"
  ca = "$ca/ca.pem"
  cert = "$ca/primary-1.pem"
  key = "$ca/primary-1.key"
  interval = "1s"
  [reverse]
  replica = "127.0.0.1:$port_a"
  server_name = "site-a"
END
    "$VMREPLICA" shipper --config "$site/a/shipper.toml" 2>>"$site/a/shipper.log" &
    shipper_pid=$!; pids+=("$shipper_pid")
    wait_applied "$site/a/shipper.log" 1
  }

  points_b() { "$VMREPLICA" applier points vm1 --store "$site/b/store" | awk 'NR>1 {print $1}'; }

  {
  echo "## RTO of an unplanned failover (command to disks served)"
  echo
  echo "Sparse disks with BENCH_DATA_MIB=$BENCH_DATA_MIB MiB of data, $BENCH_POINTS_BACK points back of $BENCH_POINT_MIB MiB each, $BENCH_ROUNDS rounds."
  echo
  echo "| disk | point | command, s: median (min-max) | disks served (applier), s | rolled back (redo log) |"
  echo "|---|---|---:|---:|---:|"
  } | tee "$f2_md"

  for size in $BENCH_SIZES; do
    log "RTO, $size: setting up"
    setup "$size"
    # Until the replica holds BENCH_POINTS_BACK points after the first (a cycle may land
    # between two writes and hold part of one).
    while (( $(points_b | wc -l) <= BENCH_POINTS_BACK )); do
      n=$(applied "$site/a/shipper.log")
      randwrite "$uri_a" "$size" "$BENCH_POINT_MIB"
      wait_applied "$site/a/shipper.log" $((n + 1))
    done
    kill -9 "$shipper_pid" "$tracker_pid" 2>/dev/null || true
    mapfile -t pts < <(points_b)
    (( ${#pts[@]} > BENCH_POINTS_BACK )) || die "only ${#pts[@]} points"
    back=${pts[$(( ${#pts[@]} - 1 - BENCH_POINTS_BACK ))]}
    declare -A cmd=() served=() redo=()
    for r in $(seq "$BENCH_ROUNDS"); do
      for which in latest back; do
        point=latest; [[ $which == back ]] && point=$back
        t0=$(date +%s.%N)
        out=$("$VMREPLICA" failover unplanned vm1 --point "$point" --store "$site/b/store")
        t1=$(date +%s.%N)
        cmd[$which]+=" $(python3 -c "print($t1 - $t0)")"
        served[$which]+=" $(sed -n 's/.*disks served after \([0-9.]*\) s.*/\1/p' <<<"$out")"
        redo[$which]=$(stat -c %s "$site/b/store/vm1/failover/redo.log" 2>/dev/null || echo 0)
        "$VMREPLICA" failover cancel vm1 --store "$site/b/store" >/dev/null
      done
    done
    for which in latest back; do
      label="latest"; [[ $which == back ]] && label="$BENCH_POINTS_BACK back (cycle $back)"
      # shellcheck disable=SC2086
      echo "| $size | $label | $(median ${cmd[$which]}) | $(median ${served[$which]}) | $(numfmt --to=iec "${redo[$which]}") |" | tee -a "$f2_md"
    done
    unset cmd served redo
  done

  log "failback bytes: $BENCH_FAILBACK_SIZE"
  setup "$BENCH_FAILBACK_SIZE"
  size_b=$(numfmt --from=iec "$BENCH_FAILBACK_SIZE")
  div_mib=$(( size_b * BENCH_DIVERGENCE_PCT / 100 / 1048576 ))
  kill -9 "$shipper_pid" "$tracker_pid" 2>/dev/null || true
  "$VMREPLICA" failover unplanned vm1 --store "$site/b/store" >/dev/null
  uri_b="nbd+unix:///sys?socket=$site/b/store/vm1/primary/nbd.sock"
  randwrite "$uri_b" "$BENCH_FAILBACK_SIZE" "$div_mib"
  "$VMREPLICA" failover commit vm1 --store "$site/b/store" >/dev/null
  "$VMREPLICA" tracker --state-dir "$site/a/state" --disk "sys=$img" 2>>"$site/a/tracker.log" &
  pids+=($!)
  for _ in $(seq 100); do [[ -S $site/a/state/control.sock ]] && break; sleep 0.1; done
  t0=$(date +%s.%N)
  "$VMREPLICA" reverse vm1 --config "$site/a/shipper.toml" --store "$site/a/store" >/dev/null
  deadline=$((SECONDS + 600))
  until grep -q "kind=Reverse" "$site/b/store/vm1/primary/shipper.log" 2>/dev/null; do
    (( SECONDS < deadline )) || die "no reverse cycle: $(tail -5 "$site/b/store/vm1/primary/shipper.log")"
    sleep 0.2
  done
  t1=$(date +%s.%N)
  line=$(grep "kind=Reverse" "$site/b/store/vm1/primary/shipper.log" | tail -1)
  data=$(sed -n 's/.*data_mib="\([0-9.]*\)".*/\1/p' <<<"$line")
  wire=$(sed -n 's/.*wire_mib="\([0-9.]*\)".*/\1/p' <<<"$line")
  "$VMREPLICA" failover planned vm1 --no-start --config "$site/b/store/vm1/primary/shipper.toml" \
    --store "$site/b/store" >/dev/null
  a_sum=$(sha256sum "$img" | cut -d' ' -f1)
  b_sum=$(sha256sum "$site/b/store/vm1/disks/sys.img" | cut -d' ' -f1)
  [[ $a_sum == "$b_sum" ]] || die "the sites' disks differ after the failback"
  {
  echo
  echo "## Failback after an unplanned failover"
  echo
  echo "| disk | rewritten on the new primary | reverse cycle: data | on the wire (lz4) | share of the disk | reverse, s |"
  echo "|---|---:|---:|---:|---:|---:|"
  echo "| $BENCH_FAILBACK_SIZE (${BENCH_DATA_MIB} MiB allocated) | $div_mib MiB ($BENCH_DIVERGENCE_PCT %) | $data MiB | $wire MiB | $(python3 -c "print('%.2f %%' % (100 * $data * 1048576 / $size_b))") | $(python3 -c "print('%.1f' % ($t1 - $t0))") |"
  echo
  echo "Then a planned failback returned the VM to site A: both sites' disks equal (sha256)."
  } | tee -a "$f2_md"
)

for c in $BENCH_CASES; do
  case "$c" in
    export) export_case ;;
    read) read_case ;;
    failover) f2_cases "$work/f2.md"; report+=("$(cat "$work/f2.md")") ;;
    *) die "unknown case '$c' in BENCH_CASES (export read failover)" ;;
  esac
done

printf '%s\n' "${report[@]}" >"$results"
log "results: $results"
