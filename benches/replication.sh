#!/usr/bin/env bash
# Replication benchmark: vmreplica against nbdcopy, qemu-img convert and rsync, side by side.
#
# The replica site is a network namespace joined to the host by a veth pair, so every byte
# between the sites crosses one interface whose counters count nothing else (IP + transport
# headers included, both directions). The primary (tracker, shipper, qemu-nbd, rsync client)
# runs on the host; the applier, rsync daemon and the NBD copy tools' destination in the
# namespace.
#
# Data: a sparse BENCH_SIZE (8 GiB) image holding an ext4 filesystem filled with real files
# (hard-linked from /usr into a staging tree, so it is the kind of data a guest disk holds:
# binaries, libraries, text) up to about BENCH_ALLOC (2 GiB) allocated.
#
#   (3) initial sync of that image: vmreplica's initial cycle (freeze --full, holes skipped,
#       lz4, packed on a pool of threads) vs `nbdcopy` and `qemu-img convert` pulling the same
#       image from qemu-nbd over the veth, BENCH_INIT_ROUNDS (3) alternating rounds (the
#       replica emptied before each). Time (until the copy is durable: a sync of the copy is
#       included, as vmreplica acknowledges a cycle only after fsync) and bytes on the wire;
#       medians. Target: at least nbdcopy's speed, at most half its bytes.
#   (4) compression: bytes of data vs bytes on the wire for that initial sync.
#   (2) BENCH_CHANGE_PCT (1) % of the image's 64 KiB blocks rewritten at random through the
#       tracker (fio, nbd engine, 50%-compressible data): vmreplica's delta cycle vs
#       `rsync --inplace --no-whole-file` of the same change to an rsync daemon holding the
#       pre-change copy. Time and bytes on the wire.
#   (1) BENCH_CYCLE_MIB (1024) MiB of dirty 64 KiB blocks: the delta cycle's time over (reading
#       the same blocks locally + a bare write of them on the replica store), each round timing
#       its own; target <= 1.0. (Local read: python preads in offset order, cold page cache;
#       also shown with O_DIRECT.) BENCH_CYCLE_ROUNDS (3) rounds, each on a fresh dirty set. The report
#       says where the cycle's time went: bytes read and written on the disk under the work
#       directory, the shipper's and applier's CPU seconds, and how
#       busy all cores were; and the ceilings on the ratio that disk traffic and CPU alone set.
#
# BENCH_PARTS (1,2,3) picks the parts to run, e.g. BENCH_PARTS=1 or BENCH_PARTS=1,3; (4) comes with
# (3). A delta part without (3) first ships one untimed initial cycle to have a replica; (2)
# without (3) gives rsync a copy of the image as its pre-change copy.
#
# Every copy is checked: replica == primary (cmp), nbdcopy/qemu-img/rsync copies == source.
# Output: markdown on stdout and in benches/results/replication-<stamp>.md.
# Environment: BENCH_SIZE=8G BENCH_ALLOC=2G BENCH_CHANGE_PCT=1 BENCH_CYCLE_MIB=1024
#   VMREPLICA=target/release/vmreplica BENCH_DIR=<mktemp under /var/tmp> BENCH_KEEP=0
#   BENCH_CYCLE_ROUNDS=3 BENCH_MAX_SECONDS=1800 BENCH_REPLICA_DIR=<unset: the replica store lives under BENCH_DIR>
#   BENCH_REPLICA_DIR puts the replica site's store on another filesystem (a second disk, or
#   /dev/shm standing in for one), so that (1) shows the cycle without both sites sharing one disk.
#   BENCH_STREAMS (4) and BENCH_CONNECTIONS (1) set the shipper's data streams and QUIC connections.
#   BENCH_AB=<another vmreplica binary> makes (3) an A/B comparison of two builds: rounds alternate
#   A (VMREPLICA) and B (BENCH_AB), BENCH_INIT_ROUNDS of each, shipper and applier of the round's
#   build (the tracker stays A's); a table gives each build's medians and B / A. B may be the
#   same binary as A with another shipper configuration: BENCH_CONNECTIONS_B, and
#   BENCH_TUNING_B (lines of the shipper's [tuning] table, e.g. 'stream_window = 33554432'; A's are
#   BENCH_TUNING).
#   BENCH_MTU (1500) sets the veth's MTU (both ends), e.g. 9000 for a jumbo-frame DR link:
#   vmreplica's QUIC packets follow it (MTU discovery, up to max_udp_payload, 6500 bytes by
#   default), and so do the TCP tools'.
#   BENCH_PERF=1 samples every cycle with `perf record -a -e cpu-clock` and writes each side's
#   hottest functions to benches/results/replication-<stamp>-perf.txt (needs perf).
#   BENCH_PERF_EVENTS=<perf event list> (with BENCH_PERF=1) records those events instead, e.g.
#   'io_uring:io_uring_submit_req,io_uring:io_uring_complete,block:block_rq_complete', and keeps
#   each cycle's recording as <BENCH_DIR>/perf-<cycle>.data (BENCH_KEEP=1) for `perf script`.
# Needs root (network namespace), rsync, qemu-nbd, qemu-img, nbdcopy, fio, mke2fs.
set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
log() { echo "replication-bench: $*" >&2; }
die() { log "error: $*"; exit 2; }

BENCH_SIZE=${BENCH_SIZE:-8G}
BENCH_ALLOC=${BENCH_ALLOC:-2G}
BENCH_CHANGE_PCT=${BENCH_CHANGE_PCT:-1}
BENCH_CYCLE_MIB=${BENCH_CYCLE_MIB:-1024}
BENCH_CYCLE_ROUNDS=${BENCH_CYCLE_ROUNDS:-3}
BENCH_INIT_ROUNDS=${BENCH_INIT_ROUNDS:-3}
BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-1800}
BENCH_KEEP=${BENCH_KEEP:-0}
BENCH_PARTS=${BENCH_PARTS:-1,2,3}
BENCH_PERF=${BENCH_PERF:-0}
BENCH_STREAMS=${BENCH_STREAMS:-4}
BENCH_CONNECTIONS=${BENCH_CONNECTIONS:-1}
BENCH_MTU=${BENCH_MTU:-1500}
part() { [[ ,$BENCH_PARTS, == *,$1,* ]]; }
[[ $BENCH_PARTS =~ ^[123](,[123])*$ ]] || die "BENCH_PARTS=$BENCH_PARTS: a comma-separated list of 1, 2, 3"
VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}
[[ -x $VMREPLICA ]] || die "no $VMREPLICA (cargo build --release --bin vmreplica)"
BENCH_AB=${BENCH_AB:-}
[[ -z $BENCH_AB || -x $BENCH_AB ]] || die "BENCH_AB=$BENCH_AB is not an executable"
BENCH_TUNING=${BENCH_TUNING:-}
BENCH_TUNING_B=${BENCH_TUNING_B:-$BENCH_TUNING}
BENCH_CONNECTIONS_B=${BENCH_CONNECTIONS_B:-$BENCH_CONNECTIONS}
bin_a=$VMREPLICA
for t in rsync qemu-nbd qemu-img nbdcopy fio mke2fs ip python3; do
  command -v $t >/dev/null || die "$t not found (scripts/install-deps.sh)"
done
size_bytes=$(numfmt --from=iec "${BENCH_SIZE%iB}")
alloc_bytes=$(numfmt --from=iec "${BENCH_ALLOC%iB}")

work=${BENCH_DIR:-$(mktemp -d /var/tmp/repl-bench.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
if [[ -n ${BENCH_REPLICA_DIR:-} ]]; then
  mkdir -p "$BENCH_REPLICA_DIR"
  store=$(mktemp -d "$BENCH_REPLICA_DIR/vmreplica-bench.XXXXXX")
else
  store=$work/replica
fi
ns=vmrb$$
hveth=vrb$$h
rveth=vrb$$r
host_ip=10.231.7.1
rep_ip=10.231.7.2
pids=()
stamp=$(date +%Y-%m-%d-%H%M%S)
md_out=$repo_dir/benches/results/replication-$stamp.md
perf_out=$repo_dir/benches/results/replication-$stamp-perf.txt
mkdir -p "$repo_dir/benches/results"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  [[ -n ${perf_running:-} ]] && kill -INT "$perf_running" 2>/dev/null
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [[ -n ${watchdog:-} ]] && { kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null; } || true
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  ip link del "$hveth" 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  if [[ $BENCH_KEEP == 1 ]]; then log "kept $work $store"; else rm -rf "$work" "$store"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'log "time limit or signal"; exit 124' TERM
( sleep "$BENCH_MAX_SECONDS"; log "time limit ${BENCH_MAX_SECONDS}s reached"; kill -TERM $$ ) &
watchdog=$!

# ---- two sites --------------------------------------------------------------------------------
ip netns add "$ns"
ip link add "$hveth" type veth peer name "$rveth"
ip link set "$rveth" netns "$ns"
ip link set "$hveth" mtu "$BENCH_MTU"
ip -n "$ns" link set "$rveth" mtu "$BENCH_MTU"
ip addr add "$host_ip/30" dev "$hveth"
ip link set "$hveth" up
ip -n "$ns" addr add "$rep_ip/30" dev "$rveth"
ip -n "$ns" link set "$rveth" up
ip -n "$ns" link set lo up
inns() { ip netns exec "$ns" "$@"; }
wire() { # bytes both ways on the veth so far
  echo $(( $(cat /sys/class/net/$hveth/statistics/tx_bytes) + $(cat /sys/class/net/$hveth/statistics/rx_bytes) ))
}
packets() { # packets on the veth so far: to the replica site, and back
  echo "$(cat /sys/class/net/$hveth/statistics/tx_packets) $(cat /sys/class/net/$hveth/statistics/rx_packets)"
}
udp_drops() { # UDP datagrams dropped so far for a full receive buffer: at the replica site, and here
  local f='$1 == "Udp:" && $2 ~ /^[0-9]/ { print $6 }'
  echo "$(inns awk "$f" /proc/net/snmp) $(awk "$f" /proc/net/snmp)"
}
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
cold() { sync; echo 1 >/proc/sys/vm/drop_caches; }
wait_for() { # SECONDS CMD...
  local t=$1; shift
  for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out waiting for: $*"
}
start() { "$@" & pids+=($!); }

# ---- the image: real files in ext4, BENCH_ALLOC allocated ---------------------------------------
log "building a ${BENCH_SIZE} image with ~${BENCH_ALLOC} of files from /usr"
stage=$work/stage
mkdir -p "$stage"
budget=$((alloc_bytes * 93 / 100))   # leave room for ext4's metadata
python3 "$script_dir/stage_usr_files.py" "$stage" "$budget" >/dev/null

img=$work/vm1-sys.img
rm -f "$img"
mke2fs -q -t ext4 -d "$stage" -E lazy_itable_init=0,lazy_journal_init=0 "$img" "$((size_bytes / 1024))k" >/dev/null
rm -rf "$stage"
allocated=$(( $(stat -c %b "$img") * 512 ))
log "image: $(mib "$size_bytes") MiB, $(mib "$allocated") MiB allocated"

# ---- certificates, applier in the replica namespace -------------------------------------------
"$VMREPLICA" certs init-ca --dir "$work/ca" >/dev/null
"$VMREPLICA" certs issue --ca "$work/ca" --name primary-1 >/dev/null
"$VMREPLICA" certs issue --ca "$work/ca" --name replica-1 --ip "$rep_ip" >/dev/null
# Not through inns: `ip netns exec` execs the applier, so the pid started is the applier's.
start_applier() {
  start ip netns exec "$ns" "$VMREPLICA" applier --store "$store" --listen "$rep_ip:7443" \
    --cert "$work/ca/replica-1.pem" --key "$work/ca/replica-1.key" --ca "$work/ca/ca.pem" \
    --allow primary-1 2>>"$work/applier.log"
  applier_pid=${pids[-1]}
}
start_applier
start "$VMREPLICA" tracker --state-dir "$work/primary" --disk "sys=$img" 2>"$work/tracker.log"
wait_for 20 test -S "$work/primary/control.sock"
uri="nbd+unix:///sys?socket=$work/primary/nbd.sock"
shipper_toml() { # connections, [tuning] lines
  cat <<TOML
vm = "vm1"
tracker = "$work/primary/control.sock"
replica = "$rep_ip:7443"
server_name = "replica-1"
ca = "$work/ca/ca.pem"
cert = "$work/ca/primary-1.pem"
key = "$work/ca/primary-1.key"
interval = "1h"
compression = true
streams = $BENCH_STREAMS
connections = $1
[tuning]
$2
TOML
}
shipper_toml "$BENCH_CONNECTIONS" "$BENCH_TUNING" >"$work/shipper.toml"
shipper_cfg=$work/shipper.toml
if [[ -n $BENCH_AB ]]; then
  shipper_toml "$BENCH_CONNECTIONS_B" "$BENCH_TUNING_B" >"$work/shipper-b.toml"
fi
replica_img=$store/vm1/disks/sys.img
shipper_pid=""
# Where a cycle's time goes: bytes through the disk under $work, CPU seconds of the shipper
# and the applier, and how busy the whole machine was (all cores; kernel threads included).
# The disk's own counters would count every other process on a shared machine: the bytes the
# two processes sent to storage (/proc/PID/io; a tmpfs store sends none) count instead.
proc_io() { # bytes read, bytes written by process $1 so far
  awk '/^read_bytes:/ { r = $2 } /^write_bytes:/ { w = $2 } END { printf "%.0f %.0f\n", r, w }' "/proc/$1/io"
}
machine_cpu() { # busy and total clock ticks so far, all cores
  awk '/^cpu / { printf "%.0f %.0f\n", $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8 }' /proc/stat
}
proc_cpu() { awk '{ printf "%.0f\n", $14 + $15 }' "/proc/$1/stat"; }  # user + system clock ticks
hz=$(getconf CLK_TCK)
# Per thread of a process: "tid name ticks" lines (user + system clock ticks), the name without
# its number (pack-3 -> pack) so that threads of one stage add up. Sampled while a cycle runs,
# as threads that end with the cycle (packers, the receive pipeline) take their ticks with them.
thread_snap() {
  for f in /proc/"$1"/task/*/stat; do cat "$f" 2>/dev/null || true; done |
    sed -E 's/^([0-9]+) \((.*)\) [A-Za-z] (.*)$/\1\t\2\t\3/' |
    awk -F'\t' '{ split($3, v, " "); n = $2; gsub(/[- ]?[0-9]+$/, "", n); gsub(/ /, "_", n); print $1, n, v[11] + v[12] }'
}
# CPU per thread name between a snapshot file $1 (may be empty) and samples file $2 (each
# thread's last sample counts): "name×threads seconds", busiest first, joined by commas.
thread_delta() {
  awk -v hz="$hz" 'FILENAME == ARGV[1] { b[$1] = $3; next } { n[$1] = $2; if ($3 > t[$1]) t[$1] = $3 }
    END { for (i in t) { d[n[i]] += (t[i] - b[i]) / hz; if (t[i] > b[i]) c[n[i]]++ }
          for (k in d) if (d[k] >= 0.005) printf "%s %.2f %d\n", k, d[k], c[k] }' "$1" "$2" |
    sort -k2 -g -r | awk '{ printf "%s%s×%d %.2f s", (NR > 1 ? ", " : ""), $1, $3, $2 }'
}

# From a cold page cache, runs the shipper until it has applied one cycle, checks the replica
# equals the primary, and sets cyc_secs, cyc_data, cyc_appwire (MiB, from its log line) and
# cyc_net (bytes on the veth); cyc_read/cyc_written (MiB through the disk, written back),
# cyc_cpu_ship/cyc_cpu_app (CPU seconds), cyc_busy (% of all cores) and cyc_rss_ship/cyc_rss_app
# (peak resident memory during the cycle, MiB), cyc_pkts_out/cyc_pkts_in (packets on the veth
# to the replica site and back: every QUIC packet, acknowledgements included), cyc_drops_rep/
# cyc_drops_pri (UDP datagrams dropped for a full receive buffer at the replica site and at the
# primary's: losses that QUIC's congestion control answers by slowing down). $1 names the cycle.
ship_one_cycle() {
  local logf=$work/shipper.log line w0 d0 d1 m0 m1 a0 s1 p0 p1 u0 u1
  cold
  w0=$(wire)
  read -r -a p0 < <(packets)
  read -r -a u0 < <(udp_drops)
  read -r -a d0 < <(proc_io "$applier_pid"); read -r -a m0 < <(machine_cpu); a0=$(proc_cpu "$applier_pid")
  echo 5 >"/proc/$applier_pid/clear_refs"   # the applier's peak RSS counts from here
  thread_snap "$applier_pid" >"$work/app.t0"; : >"$work/app.ts"; : >"$work/ship.ts"
  local perf_pid=""
  if [[ $BENCH_PERF == 1 ]]; then
    local events=(-e cpu-clock -F 999)
    [[ -n ${BENCH_PERF_EVENTS:-} ]] && events=(-e "$BENCH_PERF_EVENTS")
    perf record -q -a "${events[@]}" -o "$work/perf.data" 2>/dev/null &
    perf_pid=$! perf_running=$!
  fi
  "$VMREPLICA" shipper --config "$shipper_cfg" 2>"$logf" &
  shipper_pid=$!
  for _ in $(seq 3000); do
    line=$(grep 'cycle applied' "$logf" | tail -n 1 || true)
    thread_snap "$applier_pid" >>"$work/app.ts"; thread_snap "$shipper_pid" >>"$work/ship.ts"
    [[ -n $line ]] && break
    kill -0 "$shipper_pid" 2>/dev/null || die "shipper exited: $(tail -n 3 "$logf")"
    sleep 0.2
  done
  [[ -n $line ]] || die "no cycle applied within 600 s: $(tail -n 3 "$logf")"
  s1=$(proc_cpu "$shipper_pid")
  read -r -a sio < <(proc_io "$shipper_pid")
  thread_snap "$applier_pid" >>"$work/app.ts"; thread_snap "$shipper_pid" >>"$work/ship.ts"
  cyc_threads_ship=$(thread_delta /dev/null "$work/ship.ts")
  cyc_threads_app=$(thread_delta "$work/app.t0" "$work/app.ts")
  peak_mib() { awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
  cyc_rss_ship=$(peak_mib "$shipper_pid") cyc_rss_app=$(peak_mib "$applier_pid")
  cyc_cpu_app=$(awk -v a="$a0" -v b="$(proc_cpu "$applier_pid")" -v hz="$hz" 'BEGIN { printf "%.2f", (b - a) / hz }')
  read -r -a m1 < <(machine_cpu)
  if [[ -n $perf_pid ]]; then
    kill -INT "$perf_pid"; wait "$perf_pid" 2>/dev/null || true; perf_running=""
    if [[ -n ${BENCH_PERF_EVENTS:-} ]]; then
      mv "$work/perf.data" "$work/perf-${1// /-}.data"
      log "$1: events recorded in $work/perf-${1// /-}.data (shipper pid $shipper_pid, applier pid $applier_pid)"
    else
      {
        echo "== $1: hottest functions per side (share of that side's samples)"
        for side in "shipper $shipper_pid" "applier $applier_pid"; do
          read -r name pid <<<"$side"
          echo "-- $name (pid $pid), by thread name and function"
          perf report -i "$work/perf.data" --pid "$pid" --no-children --sort comm,sym --stdio 2>/dev/null |
            awk '!/^#/ && NF { if (++n <= 30) print }' || true
        done
      } >>"$perf_out"
      rm -f "$work/perf.data"
    fi
  fi
  kill -TERM "$shipper_pid"; wait "$shipper_pid" 2>/dev/null || true; shipper_pid=""
  cyc_net=$(( $(wire) - w0 ))
  read -r -a p1 < <(packets)
  cyc_pkts_out=$(( p1[0] - p0[0] )) cyc_pkts_in=$(( p1[1] - p0[1] ))
  read -r -a u1 < <(udp_drops)
  cyc_drops_rep=$(( u1[0] - u0[0] )) cyc_drops_pri=$(( u1[1] - u0[1] ))
  sync   # anything of the cycle's still in the page cache is written back and counted
  read -r -a d1 < <(proc_io "$applier_pid")
  cyc_read=$(mib $(( d1[0] - d0[0] + sio[0] ))) cyc_written=$(mib $(( d1[1] - d0[1] + sio[1] )))
  cyc_cpu_ship=$(awk -v s="$s1" -v hz="$hz" 'BEGIN { printf "%.2f", s / hz }')
  cyc_busy=$(awk -v b="$((m1[0] - m0[0]))" -v t="$((m1[1] - m0[1]))" 'BEGIN { printf "%.0f", t ? 100 * b / t : 0 }')
  field() { sed -n "s/.*$1=\"\{0,1\}\([^\" ]*\).*/\1/p" <<<"$line"; }
  cyc_secs=$(field secs); cyc_data=$(field data_mib); cyc_appwire=$(field wire_mib)
  # On the applier: receiving and applying in place (overlapped), then the commit.
  stamp_of() { local t; t=$(grep "$1" "$work/applier.log" | tail -n 1 | cut -d' ' -f1); [[ -n $t ]] && date -d "$t" +%s.%N || echo 0; }
  cyc_recv_secs=$(secs "$(stamp_of 'cycle started')" "$(stamp_of 'committing')")
  cyc_apply_secs=$(secs "$(stamp_of 'committing')" "$(stamp_of 'cycle applied')")
  log "$1: kind=$(field kind) secs=$cyc_secs data_mib=$cyc_data wire_mib=$cyc_appwire"
  same "$img" "$replica_img" "vmreplica $1"
}
same() { cmp "$1" "$2" >/dev/null || die "$3: $1 differs from $2"; }

# ---- (3)+(4) initial sync, alternating rounds ---------------------------------------------------
if part 3; then
start qemu-nbd --read-only --persistent -f raw -x sys -b "$host_ip" -p 10810 "$img"
qnbd_pid=${pids[-1]}
wait_for 20 nbdinfo --size "nbd://$host_ip:10810/sys"
copy_with() { # label, command in the namespace (dst $store/copy.img: where the replica is)
  rm -f "$store/copy.img"
  cold
  local w t0 t1
  w=$(wire); t0=$(now)
  inns "$@" >/dev/null
  sync "$store/copy.img"   # durable, as vmreplica's replica is when its cycle is acknowledged
  t1=$(now)
  eval "$label_var=\$(secs \$t0 \$t1) ${label_var}_wire=\$(( \$(wire) - w ))"
  same "$img" "$store/copy.img" "$label_var"
}
init_rows=()
init_total=$BENCH_INIT_ROUNDS variant=A
[[ -n $BENCH_AB ]] && init_total=$((2 * BENCH_INIT_ROUNDS))
for round in $(seq "$init_total"); do
  if [[ -n $BENCH_AB ]]; then
    # A/B: odd rounds run A's shipper and applier, even rounds B's.
    if ((round % 2)); then
      variant=A VMREPLICA=$bin_a shipper_cfg=$work/shipper.toml
    else
      variant=B VMREPLICA=$BENCH_AB shipper_cfg=$work/shipper-b.toml
    fi
  fi
  if [[ $round -gt 1 ]]; then
    # An empty replica again: the next cycle is an initial copy (in the tracker's lineage).
    kill -TERM "$applier_pid"; wait "$applier_pid" 2>/dev/null || true
    rm -rf "$store/vm1" "$store/vm1.lock"
    start_applier
  fi
  ship_one_cycle "initial sync, round $round"
  v_init_secs=$cyc_secs v_init_data=$cyc_data v_init_appwire=$cyc_appwire v_init_wire=$cyc_net
  label_var=nbdcopy_secs copy_with nbdcopy "nbd://$host_ip:10810/sys" "$store/copy.img"
  label_var=qemuimg_secs copy_with qemu-img convert -f raw -O raw "nbd://$host_ip:10810/sys" "$store/copy.img"
  init_rows+=("$v_init_secs $v_init_wire $nbdcopy_secs $nbdcopy_secs_wire $qemuimg_secs $qemuimg_secs_wire $v_init_data $v_init_appwire $cyc_cpu_ship $cyc_cpu_app $cyc_pkts_out $cyc_pkts_in $cyc_drops_rep $cyc_drops_pri $variant $cyc_rss_ship $cyc_rss_app")
  log "initial round $round ($variant): vmreplica ${v_init_secs}s, nbdcopy ${nbdcopy_secs}s, qemu-img ${qemuimg_secs}s"
done
kill -TERM "$qnbd_pid"; wait "$qnbd_pid" 2>/dev/null || true
if [[ -n $BENCH_AB && $VMREPLICA != "$bin_a" ]]; then
  # The parts after this one run A's build: its applier, on the replica just made.
  kill -TERM "$applier_pid"; wait "$applier_pid" 2>/dev/null || true
  VMREPLICA=$bin_a shipper_cfg=$work/shipper.toml
  start_applier
fi
median_of() { # the median of the numbers on stdin, one per line (nothing for none)
  sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'
}
med() { # column N of init_rows (of variant $2, A unless given): the median
  printf '%s\n' "${init_rows[@]}" | awk -v c="$1" -v w="${2:-A}" '$15 == w { print $c }' | median_of
}
v_init_secs=$(med 1) v_init_wire=$(med 2) nbdcopy_secs=$(med 3) nbdcopy_secs_wire=$(med 4)
qemuimg_secs=$(med 5) qemuimg_secs_wire=$(med 6) v_init_data=$(med 7) v_init_appwire=$(med 8)
# CPU seconds per GiB of data shipped, each side, median and spread (min-max) over the rounds.
per_gib() { # column N of init_rows over column 7 (data MiB), of variant $2 (A): "median (min-max)"
  printf '%s\n' "${init_rows[@]}" | awk -v c="$1" -v w="${2:-A}" '$15 == w { printf "%.3f\n", $c * 1024 / $7 }' | sort -g |
    awk '{ v[NR] = $1 } END { printf "%.2f (%.2f-%.2f)", v[int((NR + 1) / 2)], v[1], v[NR] }'
}
v_init_gib_ship=$(per_gib 9) v_init_gib_app=$(per_gib 10)
v_init_threads_ship=$cyc_threads_ship v_init_threads_app=$cyc_threads_app
v_init_cpu_ship=$cyc_cpu_ship v_init_cpu_app=$cyc_cpu_app v_init_busy=$cyc_busy
else
  ship_one_cycle "initial sync (only to have a replica: part 3 not selected)"
fi

# ---- (2) 1% random change: vmreplica delta vs rsync ------------------------------------------
if part 2; then
blocks=$((size_bytes / 65536))
nchange=$((blocks * BENCH_CHANGE_PCT / 100))
log "rewriting $nchange random 64 KiB blocks (${BENCH_CHANGE_PCT}%) through the tracker"
# The rsync daemon's copy: the replica as of now (== the primary before the change).
mkdir -p "$store/rsync"
if [[ -f $store/copy.img ]]; then
  mv "$store/copy.img" "$store/rsync/vm1-sys.img"
else
  cp --sparse=always "$img" "$store/rsync/vm1-sys.img"
fi
cat >"$work/rsyncd.conf" <<CONF
use chroot = no
uid = root
gid = root
[site]
path = $store/rsync
read only = no
CONF
start inns rsync --daemon --no-detach --address="$rep_ip" --port=8730 --config="$work/rsyncd.conf"
fio --name=change --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=16 \
  --size="$size_bytes" --io_size=$((nchange * 65536)) --randrepeat=0 --thread \
  --refill_buffers --buffer_compress_percentage=50 --output=/dev/null >/dev/null
ship_one_cycle "1% delta"
v_delta_secs=$cyc_secs v_delta_data=$cyc_data v_delta_appwire=$cyc_appwire v_delta_wire=$cyc_net
cold
w0=$(wire); t0=$(now)
rsync --inplace --no-whole-file --stats "$img" "rsync://$rep_ip:8730/site/vm1-sys.img" >"$work/rsync.stats"
t1=$(now)
rsync_secs=$(secs "$t0" "$t1") rsync_wire=$(( $(wire) - w0 ))
same "$img" "$store/rsync/vm1-sys.img" "rsync"
fi

# ---- (1) cycle throughput vs local read -------------------------------------------------------
# BENCH_CYCLE_ROUNDS rounds, each on a fresh dirty set: this disk's timing varies a lot from
# one minute to the next, so each round times its own local reads next to its own cycle, and
# the report gives every round and the median one.
if part 1; then
nblk=$((BENCH_CYCLE_MIB * 16))
# Reads the dirty ranges ($work/dirty.ranges: offset length, in offset order) of the image, up
# to 1 MiB at a time; $1 = direct (O_DIRECT into an aligned buffer) or buffered. Prints bytes
# and seconds.
local_read() {
  python3 - "$img" "$work/dirty.ranges" "$1" <<'PY'
import mmap, os, sys, time
img, rangef, mode = sys.argv[1], sys.argv[2], sys.argv[3]
ranges = [tuple(map(int, line.split())) for line in open(rangef)]
fd = os.open(img, os.O_RDONLY | (os.O_DIRECT if mode == "direct" else 0))
buf = mmap.mmap(-1, 1 << 20)                  # page-aligned, as O_DIRECT needs
t0 = time.monotonic(); total = 0
for off, n in ranges:
    while n:
        want = min(n, 1 << 20)
        got = os.preadv(fd, [memoryview(buf)[:want]], off)
        off += got; n -= got; total += got
print(total, f"{time.monotonic() - t0:.2f}")
PY
}
# What an apply has to do at the least: write the dirty blocks at their offsets into a sparse
# image of the same size on the replica store, then fsync it (buffered pwrites in offset
# order). Prints seconds.
bare_write() {
  python3 - "$store/wtest" "$size_bytes" "$work/dirty.ranges" <<'PY'
import os, sys, time
path, size, rangef = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ranges = [tuple(map(int, line.split())) for line in open(rangef)]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.ftruncate(fd, size)
buf = os.urandom(1 << 20)
t0 = time.monotonic()
for off, n in ranges:
    while n:
        want = min(n, 1 << 20)
        off += os.pwrite(fd, buf[:want], off); n -= want
os.fsync(fd)
print(f"{time.monotonic() - t0:.2f}")
PY
  rm -f "$store/wtest"
}
for round in $(seq "$BENCH_CYCLE_ROUNDS"); do
  log "round $round: dirtying $nblk random 64 KiB blocks (${BENCH_CYCLE_MIB} MiB)"
  fio --name=dirty --ioengine=nbd --uri="$uri" --rw=randwrite --bs=64k --iodepth=16 \
    --size="$size_bytes" --io_size=$((nblk * 65536)) --randrepeat=0 --thread \
    --refill_buffers --buffer_compress_percentage=50 --output=/dev/null >/dev/null
  # nbdinfo --map lines: offset length type(1 = dirty) description
  nbdinfo --map=qemu:dirty-bitmap:vmreplica "$uri" | awk '$3 == 1 { print $1, $2 }' | sort -n \
    >"$work/dirty.ranges"
  cold
  read -r local_bytes local_secs < <(local_read buffered)
  cold
  read -r _ direct_secs < <(local_read direct)
  if [[ $round == 1 ]]; then
    # What the replica store can write durably: an apply writes as much and fsyncs it.
    t0=$(now)
    dd if=/dev/zero of="$store/ddtest" bs=1M count="$BENCH_CYCLE_MIB" conv=fsync status=none
    dd_secs=$(secs "$t0" "$(now)")
    rm -f "$store/ddtest"
  fi
  cold
  randwrite_secs=$(bare_write)
  ship_one_cycle "${BENCH_CYCLE_MIB} MiB cycle, round $round"
  # Every round's figures, as round_1, round_2, ...; the details reported are the median
  # round's (by local read time over cycle time).
  declare -A "round_$round=( [bare]=$randwrite_secs [local]=$local_secs [direct]=$direct_secs [secs]=$cyc_secs [data]=$cyc_data [wire]=$cyc_net [read]=$cyc_read [written]=$cyc_written [busy]=$cyc_busy [ship]=$cyc_cpu_ship [app]=$cyc_cpu_app [rss_ship]=$cyc_rss_ship [rss_app]=$cyc_rss_app [recv]=$cyc_recv_secs [apply]=$cyc_apply_secs [threads_ship]=\"$cyc_threads_ship\" [threads_app]=\"$cyc_threads_app\" [drops]=\"$cyc_drops_rep / $cyc_drops_pri\" )"
done
median=$(for i in $(seq "$BENCH_CYCLE_ROUNDS"); do
  declare -n o="round_$i"
  awk -v i="$i" -v l="${o[local]}" -v w="${o[bare]}" -v c="${o[secs]}" 'BEGIN { printf "%f %d\n", c / (l + w), i }'
done | sort -n | awk '{ r[NR] = $2 } END { print r[int((NR + 1) / 2)] }')
declare -n m="round_$median"
local_secs=${m[local]} direct_secs=${m[direct]} randwrite_secs=${m[bare]}
v_cyc_secs=${m[secs]} v_cyc_data=${m[data]} v_cyc_wire=${m[wire]}
v_cyc_read=${m[read]} v_cyc_written=${m[written]} v_cyc_busy=${m[busy]}
v_cyc_cpu_ship=${m[ship]} v_cyc_cpu_app=${m[app]}
v_cyc_rss_ship=${m[rss_ship]} v_cyc_rss_app=${m[rss_app]}
v_cyc_recv=${m[recv]} v_cyc_apply=${m[apply]}
v_cyc_threads_ship=${m[threads_ship]} v_cyc_threads_app=${m[threads_app]}
fi

# ---- report ---------------------------------------------------------------------------------
r() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
rate() { awk -v m="$1" -v s="$2" 'BEGIN { printf "%.0f", m / s }'; }
local_mib=$(mib "${local_bytes:-0}")
store_fs=$(df --output=fstype "$store" | tail -n 1)
if [[ $(stat -c %d "$work") == $(stat -c %d "$store") ]]; then
  same_disk=1
  store_where="on the primary image's disk ($store_fs)"
  sharing="$(nproc) cores and one disk"
  io_what="reads: the primary's blocks and the replica's old contents for the undo log; writes: undo log, replica image"
else
  same_disk=0
  store_where="$store_fs, apart from the primary image's disk (the disk figures below count that disk only)"
  sharing="$(nproc) cores"
  io_what="the primary's side only: the replica store is on $store_fs"
fi
{
  echo "# Replication benchmark — $stamp"
  echo
  echo "- repo $(git -C "$repo_dir" rev-parse --short HEAD)$(git -C "$repo_dir" diff --quiet || echo ' (uncommitted changes)'); $(nproc) cores; $(uname -r); $(rsync --version | head -n 1); $(qemu-img --version | head -n 1); $(nbdcopy --version | head -n 1)"
  echo "- sites: host and a network namespace joined by a veth pair (MTU $BENCH_MTU); wire = bytes on the veth, both directions, headers included"
  echo "- replica store: $store_where"
  echo "- image: $(mib "$size_bytes") MiB raw, ext4 with real files from /usr, $(mib "$allocated") MiB allocated; page cache dropped before every run; every copy checked equal with cmp"
  echo "- parts run: $BENCH_PARTS"
  echo
  if part 3; then
  echo "### (3) initial sync, (4) compression (medians of $BENCH_INIT_ROUNDS alternating rounds)"
  echo
  echo "| tool | time s | MiB on wire | wire / allocated |"
  echo "|---|---:|---:|---:|"
  echo "| vmreplica initial cycle (lz4, $BENCH_STREAMS QUIC streams over $BENCH_CONNECTIONS connection(s)) | $v_init_secs | $(mib "$v_init_wire") | $(r "$v_init_wire" "$allocated") |"
  echo "| nbdcopy from qemu-nbd, then sync | $nbdcopy_secs | $(mib "$nbdcopy_secs_wire") | $(r "$nbdcopy_secs_wire" "$allocated") |"
  echo "| qemu-img convert from qemu-nbd, then sync | $qemuimg_secs | $(mib "$qemuimg_secs_wire") | $(r "$qemuimg_secs_wire" "$allocated") |"
  echo
  echo "vmreplica: $v_init_data MiB of data shipped as $v_init_appwire MiB of chunk frames (compression $(r "$v_init_data" "$v_init_appwire")×); time vs nbdcopy $(r "$nbdcopy_secs" "$v_init_secs")× (target ≥ 1.00), vs qemu-img $(r "$qemuimg_secs" "$v_init_secs")× (higher = vmreplica faster); bytes vs nbdcopy $(r "$v_init_wire" "$nbdcopy_secs_wire")× (target ≤ 0.50)."
  echo
  echo "| round | build | vmreplica s | MiB on wire | nbdcopy s | MiB on wire | qemu-img s | shipper CPU s | applier CPU s | peak RSS MiB shipper / applier | packets to replica / back | UDP drops at replica / primary |"
  echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  i=0
  for row in "${init_rows[@]}"; do
    i=$((i + 1)); read -r a b c d e _ _ _ cs ca po pi dr dp v rs ra <<<"$row"
    echo "| $i | $v | $a | $(mib "$b") | $c | $(mib "$d") | $e | $cs | $ca | $rs / $ra | $po / $pi | $dr / $dp |"
  done
  echo
  echo "CPU per GiB of data shipped (median of the rounds, min-max): shipper $v_init_gib_ship s, applier $v_init_gib_app s."
  echo
  # The CPU ceilings of the time target: per round, nbdcopy's time over the least time the two
  # sites' CPU seconds could take spread perfectly over this machine's cores (both sites here),
  # and over the busier site's seconds on cores of its own (two hosts); medians over the rounds.
  ceiling() { # $1 = 1: both sites on this machine's cores; 2: the busier site on its own
    printf '%s\n' "${init_rows[@]}" | awk -v k="$1" -v n="$(nproc)" '$15 == "A" && $9 + $10 > 0 {
        printf "%.2f\n", $3 * n / (k == 1 ? $9 + $10 : ($9 > $10 ? $9 : $10)) }' | median_of
  }
  ceil_shared=$(ceiling 1) ceil_own=$(ceiling 2)
  if [[ -n $ceil_shared ]]; then
    echo "CPU ceilings of the time target: the shipper's and applier's CPU seconds, spread perfectly over the $(nproc) cores both sites share here, let vmreplica reach at most **${ceil_shared}× nbdcopy's speed** on this machine (median of the rounds); on two hosts of $(nproc) cores each, the busier site's seconds allow ${ceil_own}×."
    echo
  fi
  if [[ -n $BENCH_AB ]]; then
  echo "A/B, $BENCH_INIT_ROUNDS alternating rounds each: A = $bin_a (connections $BENCH_CONNECTIONS, tuning '${BENCH_TUNING//$'\n'/; }'), B = $BENCH_AB (connections $BENCH_CONNECTIONS_B, tuning '${BENCH_TUNING_B//$'\n'/; }') (medians; CPU per GiB of data with min-max)"
  echo
  echo "| build | vmreplica s | nbdcopy s (same rounds) | MiB on wire | shipper CPU s / GiB | applier CPU s / GiB | peak RSS MiB shipper / applier |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for v in A B; do
    echo "| $v | $(med 1 $v) | $(med 3 $v) | $(mib "$(med 2 $v)") | $(per_gib 9 $v) | $(per_gib 10 $v) | $(med 16 $v) / $(med 17 $v) |"
  done
  echo
  echo "B / A: time $(r "$(med 1 B)" "$(med 1 A)"), shipper CPU $(r "$(med 9 B)" "$(med 9 A)"), applier CPU $(r "$(med 10 B)" "$(med 10 A)") (medians of seconds; below 1 = B cheaper)."
  echo
  fi
  echo "Last round's CPU by thread (user + system): shipper $v_init_cpu_ship s ($v_init_threads_ship); applier $v_init_cpu_app s ($v_init_threads_app); all $(nproc) cores $v_init_busy% busy. A stage bound to one thread shows as one thread whose seconds come near the sync's time."
  echo
  fi
  if part 2; then
  echo "### (2) ${BENCH_CHANGE_PCT}% of the 64 KiB blocks rewritten ($nchange blocks, $(mib $((nchange * 65536))) MiB, 50% compressible)"
  echo
  echo "| tool | time s | MiB on wire |"
  echo "|---|---:|---:|"
  echo "| vmreplica delta cycle | $v_delta_secs | $(mib "$v_delta_wire") |"
  echo "| rsync --inplace --no-whole-file (daemon) | $rsync_secs | $(mib "$rsync_wire") |"
  echo
  echo "vmreplica is $(r "$rsync_secs" "$v_delta_secs")× faster than rsync and sends $(r "$v_delta_wire" "$rsync_wire")× its bytes (target: ≥ 20× faster, ≤ 1.00× bytes). Cycle: $v_delta_data MiB of data, $v_delta_appwire MiB of chunk frames."
  echo
  fi
  if part 1; then
  echo "### (1) cycle throughput: $nblk dirty 64 KiB blocks (${BENCH_CYCLE_MIB} MiB, 50% compressible)"
  echo
  echo "| what | MiB | s | MiB/s |"
  echo "|---|---:|---:|---:|"
  echo "| local read of the dirty blocks (pread in offset order, cold cache) | $local_mib | $local_secs | $(rate "$local_mib" "$local_secs") |"
  echo "| vmreplica delta cycle (freeze → applied and fsynced on the replica) | $v_cyc_data | $v_cyc_secs | $(rate "$v_cyc_data" "$v_cyc_secs") |"
  echo "| for scale: the same local read with O_DIRECT (no page cache) | $local_mib | $direct_secs | $(rate "$local_mib" "$direct_secs") |"
  echo "| for scale: the replica store's durable write rate (dd conv=fsync; $store_fs) | $BENCH_CYCLE_MIB | $dd_secs | $(rate "$BENCH_CYCLE_MIB" "$dd_secs") |"
  echo "| bare write: the same blocks at their offsets into a sparse image on the replica store ($store_fs), then fsync | $local_mib | $randwrite_secs | $(rate "$local_mib" "$randwrite_secs") |"
  echo "| on the applier: receive, verify, capture undo and write in place (overlapped) | $v_cyc_data | $v_cyc_recv | $(rate "$v_cyc_data" "$v_cyc_recv") |"
  echo "| on the applier: the commit (last fsyncs, undo log finished, point recorded) | $v_cyc_data | $v_cyc_apply | $(rate "$v_cyc_data" "$v_cyc_apply") |"
  echo
  echo "Rounds, each on its own dirty set (the table above and the analysis below are round $median's, the median):"
  echo
  echo "| round | local read s | bare write s | cycle s | receive+write s | commit s | cycle / (read + write) | UDP drops at replica / primary |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
  for i in $(seq "$BENCH_CYCLE_ROUNDS"); do
    declare -n o="round_$i"
    sum=$(awk -v a="${o[local]}" -v b="${o[bare]}" 'BEGIN { print a + b }')
    echo "| $i | ${o[local]} | ${o[bare]} | ${o[secs]} | ${o[recv]} | ${o[apply]} | $(r "${o[secs]}" "$sum") | ${o[drops]} |"
  done
  echo
  echo "Cycle time / (local read + bare write): $(r "$v_cyc_secs" "$(awk -v a="$local_secs" -v b="$randwrite_secs" 'BEGIN { print a + b }')") (target ≤ 1.00; local read alone: cycle rate / read rate $(r "$(rate "$v_cyc_data" "$v_cyc_secs")" "$(rate "$local_mib" "$local_secs")")); $(mib "$v_cyc_wire") MiB on the wire. Both sites share this machine's $sharing: the cycle reads, compresses, encrypts, decrypts, verifies, reads old contents and writes the undo log, and writes and fsyncs the replica on the same $sharing that the local read has to itself."
  echo
  # Floors on the target ratio (cycle / (local read + bare write)) that the disk and the CPU
  # alone set: the least time they leave the cycle, over the same denominator.
  denom=$(awk -v a="$local_secs" -v b="$randwrite_secs" 'BEGIN { print a + b }')
  # The disk floor: every byte the cycle moves through the disk under $work, at the fastest
  # rate this disk showed above (with the store elsewhere only the primary's reads cross it,
  # at its read rate).
  io_mib=$(awk -v a="$v_cyc_read" -v b="$v_cyc_written" 'BEGIN { printf "%.0f", a + b }')
  best=$(awk -v a="$(rate "$BENCH_CYCLE_MIB" "$dd_secs")" -v b="$(rate "$local_mib" "$local_secs")" -v s="$same_disk" 'BEGIN { print (s && a > b ? a : b) }')
  io_floor=$(awk -v m="$io_mib" -v r="$best" 'BEGIN { printf "%.2f", m / r }')
  echo "Where the cycle's time went: $v_cyc_read MiB read and $v_cyc_written MiB written on the disk ($io_what; bytes the shipper and applier sent to or read from storage, /proc/PID/io), $io_mib MiB in all. At the disk's best rate above ($best MiB/s) that takes at least $io_floor s: **the disk alone keeps the ratio at or above $(r "$io_floor" "$denom")** on this machine."
  echo
  if [[ $same_disk == 1 ]]; then
    # The best rate is often the local read's, where the host's cache answers. The cycle's
    # writes must be durable, with a sync between each undo entry and its image write, and
    # with syncs in the mix this disk does not read and write at full rate at once (fio beside
    # an appending, syncing writer: 500-600 MiB/s in all; cycle-readahead-2026-12-05.md). Reads
    # at the local read's rate, then writes at the durable rate (dd conv=fsync):
    read_rate=$(rate "$local_mib" "$local_secs")
    dd_rate=$(rate "$BENCH_CYCLE_MIB" "$dd_secs")
    ser_floor=$(awk -v r="$v_cyc_read" -v w="$v_cyc_written" -v a="$read_rate" -v b="$dd_rate" 'BEGIN { printf "%.2f", r / a + w / b }')
    echo "Read at the local read's rate ($read_rate MiB/s) and written at the store's durable rate ($dd_rate MiB/s), one after the other, the same traffic takes $ser_floor s: ratio $(r "$ser_floor" "$denom") where reads and durable writes do not overlap on the one disk."
    echo
  fi
  # The CPU floors: both sites' CPU seconds spread perfectly over this machine's cores; on two
  # hosts, each site's own seconds over its own cores (the busier site sets it).
  ncpu=$(nproc)
  cpu_floor=$(awk -v a="$v_cyc_cpu_ship" -v b="$v_cyc_cpu_app" -v n="$ncpu" 'BEGIN { printf "%.2f", (a + b) / n }')
  cpu_floor2=$(awk -v a="$v_cyc_cpu_ship" -v b="$v_cyc_cpu_app" -v n="$ncpu" 'BEGIN { printf "%.2f", (a > b ? a : b) / n }')
  echo "CPU: shipper $v_cyc_cpu_ship s ($v_cyc_threads_ship), applier $v_cyc_cpu_app s ($v_cyc_threads_app); all $ncpu cores were $v_cyc_busy% busy during the cycle. Spread perfectly over the $ncpu cores both sites share here, that CPU takes at least $cpu_floor s: **the CPU alone keeps the ratio at or above $(r "$cpu_floor" "$denom")** on this machine. On two hosts of $ncpu cores each, the busier site's CPU takes at least $cpu_floor2 s: ratio floor $(r "$cpu_floor2" "$denom") there."
  echo
  echo "Receiving and applying overlap (each chunk is written in place once its old contents are durable in the undo log): they took $(r "$v_cyc_recv" "$local_secs")× the local read's time; the commit $v_cyc_apply s."
  echo
  echo "Memory: the shipper peaked at $v_cyc_rss_ship MiB resident and the applier at $v_cyc_rss_app MiB during the cycle, for $v_cyc_data MiB of dirty data (neither holds a cycle's data: read-ahead, send and receive windows and the receive pipeline's queue bound it)."
  fi
} | tee "$md_out"
log "wrote $md_out"
