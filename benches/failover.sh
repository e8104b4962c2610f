#!/usr/bin/env bash
# Failover benchmark: unplanned failover's RTO, and what failback costs.
#
# Two sites on loopback, as real processes: site A (tracker, shipper) replicates a sparse
# disk to site B (applier); site A's applier receives replication back after a failover.
#
#   (1) RTO of an unplanned failover (`vmreplica failover unplanned`, from the command to the
#       disks being served; no guest boot), for sparse disks of each of BENCH_SIZES (1G 64G)
#       holding BENCH_DATA_MIB (256) MiB of data, at the latest point and BENCH_POINTS_BACK
#       (20) points back (each point BENCH_POINT_MIB (4) MiB of random 64 KiB writes), in
#       BENCH_ROUNDS (3) alternating rounds, each failover cancelled before the next; medians
#       and spread. Targets: under 5 s for any size at the latest point; an older point costs
#       the changes rolled back (shown: the redo log's size), never the disk size.
#   (2) Failback bytes: on a BENCH_FAILBACK_SIZE (1G) disk, an unplanned failover, the new
#       primary rewrites BENCH_DIVERGENCE_PCT (1) % of the disk (random 64 KiB blocks), commit;
#       the old primary returns and `vmreplica reverse` ships back only the divergent ranges:
#       the reverse cycle's bytes (data, and on the wire after lz4) against the disk size.
#       Checked: both sites' disks equal afterwards.
#
# Output: markdown on stdout and in benches/results/failover-<stamp>.md.
# Environment: BENCH_SIZES="1G 64G" BENCH_DATA_MIB=256 BENCH_POINTS_BACK=20 BENCH_POINT_MIB=4
#   BENCH_ROUNDS=3 BENCH_FAILBACK_SIZE=1G BENCH_DIVERGENCE_PCT=1 BENCH_MAX_SECONDS=1800
#   VMREPLICA=target/release/vmreplica BENCH_DIR=<mktemp under /var/tmp> BENCH_KEEP=0
# Needs fio (nbd engine), qemu-io, sha256sum, python3.
set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
log() { echo "failover-bench: $*" >&2; }
die() { log "error: $*"; exit 2; }

BENCH_SIZES=${BENCH_SIZES:-"1G 64G"}
BENCH_DATA_MIB=${BENCH_DATA_MIB:-256}
BENCH_POINTS_BACK=${BENCH_POINTS_BACK:-20}
BENCH_POINT_MIB=${BENCH_POINT_MIB:-4}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_FAILBACK_SIZE=${BENCH_FAILBACK_SIZE:-1G}
BENCH_DIVERGENCE_PCT=${BENCH_DIVERGENCE_PCT:-1}
BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-1800}
BENCH_KEEP=${BENCH_KEEP:-0}
VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}
[[ -x $VMREPLICA ]] || die "no $VMREPLICA (cargo build --release --bin vmreplica)"
for t in fio qemu-io sha256sum python3 numfmt; do
  command -v $t >/dev/null || die "$t not found (scripts/install-deps.sh)"
done

work=${BENCH_DIR:-$(mktemp -d /var/tmp/failover-bench.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
stamp=$(date +%Y-%m-%d-%H%M%S)
md_out=$repo_dir/benches/results/failover-$stamp.md
mkdir -p "$repo_dir/benches/results"
pids=()

# Stops what this script started: its own children, and what the sites' appliers started
# (detached; their PIDs are in their locks).
cleanup() {
  local p
  for p in "${pids[@]:-}"; do [[ -n $p ]] && kill -9 "$p" 2>/dev/null || true; done
  for lock in "$work"/*/[ab]/store/vm1/primary/tracker/shipper.lock "$work"/*/[ab]/store/vm1/primary/tracker/lock; do
    [[ -f $lock ]] || continue
    p=$(cat "$lock" 2>/dev/null || true)
    [[ $p =~ ^[0-9]+$ ]] && kill -9 "$p" 2>/dev/null || true
  done
  if [[ $BENCH_KEEP != 1 ]]; then rm -rf "$work"; else log "kept $work"; fi
}
trap cleanup EXIT
( sleep "$BENCH_MAX_SECONDS"; log "time limit ($BENCH_MAX_SECONDS s) reached"; kill -TERM $$ ) &
watchdog=$!
pids+=("$watchdog")

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
echo "# Failover benchmark ($stamp)"
echo
echo "Provisional unless run on a quiet machine. $(nproc) cores; BENCH_DATA_MIB=$BENCH_DATA_MIB, $BENCH_POINTS_BACK points back of $BENCH_POINT_MIB MiB each, $BENCH_ROUNDS rounds."
echo
echo "## (1) RTO of an unplanned failover (command to disks served)"
echo
echo "| disk | point | command, s: median (min-max) | disks served (applier), s | rolled back (redo log) |"
echo "|---|---|---:|---:|---:|"
} | tee "$md_out"

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
    echo "| $size | $label | $(median ${cmd[$which]}) | $(median ${served[$which]}) | $(numfmt --to=iec "${redo[$which]}") |" | tee -a "$md_out"
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
echo "## (2) Failback after an unplanned failover"
echo
echo "| disk | rewritten on the new primary | reverse cycle: data | on the wire (lz4) | share of the disk | reverse, s |"
echo "|---|---:|---:|---:|---:|---:|"
echo "| $BENCH_FAILBACK_SIZE (${BENCH_DATA_MIB} MiB allocated) | $div_mib MiB ($BENCH_DIVERGENCE_PCT %) | $data MiB | $wire MiB | $(python3 -c "print('%.2f %%' % (100 * $data * 1048576 / $size_b))") | $(python3 -c "print('%.1f' % ($t1 - $t0))") |"
echo
echo "Then a planned failback returned the VM to site A: both sites' disks equal (sha256)."
} | tee -a "$md_out"
log "results in $md_out"
