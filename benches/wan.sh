#!/usr/bin/env bash
# WAN benchmark: one replication cycle over an emulated long, lossy link, per congestion
# controller, side by side; two shippers sharing one bottleneck; the bandwidth limit's accuracy;
# the relay's own CPU ceiling.
#
# Every case starts afresh on loopback: tracker (serving a raw image holding the row's MiB of
# random, incompressible data in a sparse image of twice that size) -> shipper -> WAN relay
# (scripts/wan-relay.py: one-way delay, loss, bottleneck rate with a drop-tail queue of one
# bandwidth-delay product, both directions alike) -> applier with an empty store. The case is
# the shipper's INITIAL SYNC of that image: one cycle shipping exactly the random data (holes
# are skipped), a clean bulk-transfer measurement (no guest, no compression gain).
#
# Measured per case:
#   transfer s   from the shipper's "cycle planned" log line (chunks start flowing right
#                after it) to the last big (>= 1000 B) client->server datagram the relay
#                delivered to the applier: the time on the wire, startup and retransmissions
#                included.
#   goodput      data MiB / transfer s, in Mbit/s (10^6 bits/s) and as % of the link rate.
#                The rows' data sizes make startup (about a second at 100 ms) a few percent.
#   steady       the same from 5 s after the first big datagram to the last second of the
#                transfer (per-second snapshots of the relay's counters; UDP payload scaled
#                by data / payload of the whole case): the rate once startup is over.
#   sent/deliv.  client->server datagrams the shipper sent (delivered + dropped by emulated
#                loss, by the queue, by the kernel) per datagram delivered: 1.00 = no waste.
#   queue        the relay's bottleneck queue (client->server), time-weighted mean over the
#                transfer and maximum, in BDPs of the link.
#   cpu s/GiB    CPU seconds (utime+stime) of the shipper and of the applier per GiB of data.
#   If the cycle has not finished after WAN_CAP_S seconds, the case is stopped and reports what
#   the applier had APPLIED by then: its admin socket (STORE/applier.sock) says which cycle it
#   is receiving but has no byte count, so the bytes are the allocated bytes of the replica
#   images (the initial copy writes in place, behind no undo log: there is no older point);
#   goodput = that / time since "cycle planned", the table marks it "> cap".
# Pairs (WAN_FAIR): two shippers (two trackers, two VMs, one applier) through ONE relay
#   bottleneck (--multi: each shipper counted apart), started together; each one's rate is its
#   client->server bytes delivered by the relay between WAN_FAIR_WARM_S after the start and the
#   end of the window (WAN_FAIR_S later, or the last second both were still sending).
# Bandwidth-limit rows: bandwidth_limit = WAN_LIMIT (bytes/s, K/M/G = 2^10/2^20/2^30, as in
#   the shipper's config) through the relay with the same delay, no loss, NO relay rate limit;
#   "measured" is the rate over the whole transfer of the chunk frames the shipper wrote (its
#   wire_mib, which is what the limiter paces) and the steady rate between the shipper's 5 s
#   and 10 s progress lines (data accepted by the limiter).
# Relay ceiling: a python sender floods the relay (no delay, no loss, an unreachable rate) for
#   WAN_CEILING_S seconds; datagrams forwarded per CPU-second of the relay = what one core
#   of this machine lets the relay carry. A case whose relay CPU share nears 100% was bounded
#   by the relay, not by the controller.
#
# THE MACHINE: shipper, applier, tracker and the python relay share this machine's cores and
# its disk; compare rows within a run, and read the load1 column.
#
# Environment:
#   WAN_SIZE_MIB=256        random data in the image (MiB) of rows that do not say
#   WAN_ROWS="200M/100/0/1024 200M/100/0.005/1024 200M/100/0.01/1024 200M/100/0.02/1024 50M/300/0.01/256"
#                           link rows: rate (bits/s, K/M/G = 10^3/10^6/10^9) / RTT ms / loss
#                           (per datagram, each direction) [/ MiB of data]; "" skips them
#   WAN_CCS="cubic bbr vmr" congestion controllers ([tuning] congestion), side by side per row
#   WAN_FAIR="vmr+vmr vmr+cubic"   pairs sharing one bottleneck ("" skips them)
#   WAN_FAIR_LINK=200M/100/0       their link
#   WAN_FAIR_MIB=1024       data per shipper of a pair
#   WAN_FAIR_WARM_S=10 WAN_FAIR_S=30   the measuring window of a pair
#   WAN_LIMIT=20M           bandwidth_limit for the accuracy rows; "" skips them
#   WAN_LIMIT_CCS="cubic vmr"
#   WAN_STREAMS=4           shipper streams
#   WAN_CONNECTIONS=1       QUIC connections the streams are spread over (shipper `connections`)
#   WAN_CAP_S=90            per case: stop if the cycle has not finished by then
#   WAN_CEILING_S=5         relay ceiling measurement (0 skips it)
#   WAN_MAX_SECONDS=2700    hard limit for the whole script (cases left are skipped)
#   WAN_KEEP=0              1: keep the work directory (logs, images) under /var/tmp
#   VMREPLICA=<repo>/target/release/vmreplica   (built with cargo if missing)
# Output: markdown on stdout and in benches/results/wan-<stamp>.md. Exit 0 unless setup fails.
# With the defaults the whole run takes about 25 minutes on 2 cores.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
die() { echo "wan: error: $*" >&2; exit 2; }
log() { echo "wan: $*" >&2; }

WAN_SIZE_MIB=${WAN_SIZE_MIB:-256}
WAN_ROWS=${WAN_ROWS-"200M/100/0/1024 200M/100/0.005/1024 200M/100/0.01/1024 200M/100/0.02/1024 50M/300/0.01/256"}
WAN_CCS=${WAN_CCS:-"cubic bbr vmr"}
WAN_FAIR=${WAN_FAIR-"vmr+vmr vmr+cubic"}
WAN_FAIR_LINK=${WAN_FAIR_LINK:-200M/100/0}
WAN_FAIR_MIB=${WAN_FAIR_MIB:-1024}
WAN_FAIR_WARM_S=${WAN_FAIR_WARM_S:-10}
WAN_FAIR_S=${WAN_FAIR_S:-30}
WAN_LIMIT=${WAN_LIMIT-20M}
WAN_LIMIT_CCS=${WAN_LIMIT_CCS:-"cubic vmr"}
WAN_STREAMS=${WAN_STREAMS:-4}
WAN_CONNECTIONS=${WAN_CONNECTIONS:-1}
WAN_CAP_S=${WAN_CAP_S:-90}
WAN_CEILING_S=${WAN_CEILING_S:-5}
WAN_MAX_SECONDS=${WAN_MAX_SECONDS:-2700}
WAN_KEEP=${WAN_KEEP:-0}
VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}
RELAY=$repo_dir/scripts/wan-relay.py

for v in WAN_SIZE_MIB WAN_CAP_S WAN_MAX_SECONDS WAN_STREAMS WAN_CONNECTIONS WAN_FAIR_MIB \
  WAN_FAIR_WARM_S WAN_FAIR_S; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive whole number (got '${!v}')"
done
[[ $WAN_CEILING_S =~ ^[0-9]+$ ]] || die "WAN_CEILING_S must be a whole number of seconds"
command -v python3 >/dev/null || die "python3 is required"
[[ -f $RELAY ]] || die "missing $RELAY"
valid_cc() { case $1 in cubic | bbr | newreno | vmr) ;; *) die "unknown congestion controller '$1'" ;; esac; }
for c in $WAN_CCS $WAN_LIMIT_CCS; do valid_cc "$c"; done
for p in $WAN_FAIR; do
  [[ $p =~ ^[a-z]+\+[a-z]+$ ]] || die "WAN_FAIR: '$p' is not CC+CC"
  valid_cc "${p%+*}"; valid_cc "${p#*+}"
done
# rate_bits RATE: the relay's parse of a link rate (bits/s).
rate_bits() {
  python3 -c "import importlib.util as u,sys
s=u.spec_from_file_location('r',sys.argv[1]); m=u.module_from_spec(s); s.loader.exec_module(m)
print(int(m.parse_rate(sys.argv[2])))" "$RELAY" "$1"
}
# parse_row ROW: "RATE_BITS DELAY_MS LOSS MIB" (one-way delay = RTT / 2).
parse_row() {
  local rate rtt loss mib
  IFS=/ read -r rate rtt loss mib <<<"$1"
  mib=${mib:-$WAN_SIZE_MIB}
  [[ -n $rate && $rtt =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "row '$1': expected RATE/RTT_MS/LOSS[/MIB]"
  [[ $mib =~ ^[0-9]+$ && $mib -gt 0 ]] || die "row '$1': '$mib' is not a size in MiB"
  python3 -c "import sys; v=float(sys.argv[1]); assert 0<=v<1" "$loss" 2>/dev/null \
    || die "row '$1': loss '$loss' is not a probability"
  local bits
  bits=$(rate_bits "$rate") || die "row '$1': cannot parse the rate '$rate'"
  echo "$bits $(python3 -c "import sys; print(float(sys.argv[1])/2)" "$rtt") $loss $mib"
}
for r in $WAN_ROWS $WAN_FAIR_LINK; do parse_row "$r" >/dev/null; done

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
free_udp_ports() { # N free UDP ports on 127.0.0.1
  python3 -c "import socket,sys
s=[socket.socket(socket.AF_INET,socket.SOCK_DGRAM) for _ in range(int(sys.argv[1]))]
[x.bind(('127.0.0.1',0)) for x in s]; print(*[x.getsockname()[1] for x in s])" "$1"
}
allocated() { # allocated bytes of the files matching a glob (0 if none)
  find "$1" -path "$2" -type f -printf '%b\n' 2>/dev/null | awk '{s+=$1*512} END { printf "%.0f\n", s }'
}
over_budget() { # over_budget SECONDS_NEEDED: would the script exceed WAN_MAX_SECONDS?
  ((SECONDS - script_start + $1 > WAN_MAX_SECONDS))
}

cd "$WORK"
log "work dir $WORK"
"$VMREPLICA" certs init-ca --dir ca >/dev/null
"$VMREPLICA" certs issue --ca ca --name primary-1 >/dev/null
"$VMREPLICA" certs issue --ca ca --name replica-1 --ip 127.0.0.1 >/dev/null
make_image() { # make_image PATH MIB: MIB of random data in a sparse image of twice that size
  truncate -s $((2 * $2))M "$1"
  dd if=/dev/urandom of="$1" bs=1M count="$2" conv=notrunc status=none
}
# image MIB: the path of an image holding MIB of random data (made once per size).
image() {
  local img=$WORK/vm1-sys-$1.img
  if [[ ! -f $img ]]; then
    make_image "$img" "$1"
    log "image: $1 MiB random data in a $((2 * $1)) MiB sparse image"
  fi
  echo "$img"
}

ROWS=$WORK/rows.jsonl
: >"$ROWS"
n=0

start_tracker() { # start_tracker DIR IMG -> $tpid
  "$VMREPLICA" tracker --state-dir "$1/primary" --disk sys="$2" 2>"$1/tracker.log" &
  tpid=$!
  PIDS+=("$tpid")
  wait_for 20 test -S "$1/primary/control.sock" || { tail -5 "$1/tracker.log" >&2; die "tracker did not start"; }
}
start_applier() { # start_applier DIR PORT -> $apid
  "$VMREPLICA" applier --store "$1/replica" --listen "127.0.0.1:$2" --cert ca/replica-1.pem \
    --key ca/replica-1.key --ca ca/ca.pem --allow primary-1 2>"$1/applier.log" &
  apid=$!
  PIDS+=("$apid")
}
start_relay() { # start_relay DIR RELAY_PORT APPLIER_PORT RATE DELAY LOSS SEED [ARGS...] -> $rpid
  local d=$1 rport=$2 aport=$3 rate=$4 delay=$5 loss=$6 seed=$7
  shift 7
  local rargs=(--listen "127.0.0.1:$rport" --to "127.0.0.1:$aport" --delay-ms "$delay"
    --loss "$loss" --seed "$seed" --stats-json "$d/relay.json" "$@")
  [[ $rate != 0 ]] && rargs+=(--rate "$rate")
  python3 "$RELAY" "${rargs[@]}" 2>"$d/relay.log" &
  rpid=$!
  PIDS+=("$rpid")
  wait_for 10 grep -q '^wan-relay: 127' "$d/relay.log" || { tail -5 "$d/relay.log" >&2; die "relay did not start"; }
}
write_config() { # write_config FILE VM TRACKER_DIR RELAY_PORT CC LIMIT
  {
    echo "vm = \"$2\""
    echo "tracker = \"$3/primary/control.sock\""
    echo "replica = \"127.0.0.1:$4\""
    echo "server_name = \"replica-1\""
    echo "ca = \"$WORK/ca/ca.pem\""
    echo "cert = \"$WORK/ca/primary-1.pem\""
    echo "key = \"$WORK/ca/primary-1.key\""
    echo "interval = \"24h\""
    echo "compression = true"
    echo "streams = $WAN_STREAMS"
    echo "connections = $WAN_CONNECTIONS"
    [[ -n $6 ]] && echo "bandwidth_limit = \"$6\""
    echo "[tuning]"
    echo "congestion = \"$5\""
  } >"$1"
}
start_shipper() { # start_shipper CONFIG LOG -> $spid
  # vmr's phase changes (debug) go to the log too: why a case went as it did.
  VMREPLICA_LOG=${VMREPLICA_LOG:-info,vmreplica_common::congestion=debug} \
    "$VMREPLICA" shipper --config "$1" 2>"$2" &
  spid=$!
  PIDS+=("$spid")
}

# run_case LABEL CONGESTION RATE_BITS DELAY_MS LOSS MIB LIMIT: one initial sync through the relay.
run_case() {
  local label=$1 cc=$2 rate=$3 delay=$4 loss=$5 mib=$6 limit=$7
  n=$((n + 1))
  local d=$WORK/case-$n
  mkdir -p "$d"
  if over_budget $((WAN_CAP_S + 20)); then
    log "skipping $label $cc loss=$loss: WAN_MAX_SECONDS=$WAN_MAX_SECONDS would be exceeded"
    printf '{"label":"%s","cc":"%s","loss":%s,"rate":%s,"delay_ms":%s,"limit":"%s","skipped":true}\n' \
      "$label" "$cc" "$loss" "$rate" "$delay" "$limit" >>"$ROWS"
    return
  fi
  log "case $n: $label cc=$cc rate=$rate bit/s rtt=$(python3 -c "print(2*$delay)") ms loss=$loss limit=${limit:-none}"
  local aport rport load1
  read -r aport rport < <(free_udp_ports 2)
  load1=$(cut -d' ' -f1 /proc/loadavg)
  local img
  img=$(image "$mib")
  start_tracker "$d" "$img"
  start_applier "$d" "$aport"
  start_relay "$d" "$rport" "$aport" "$rate" "$delay" "$loss" "$n"
  write_config "$d/shipper.toml" vm1 "$d" "$rport" "$cc" "$limit"
  start_shipper "$d/shipper.toml" "$d/shipper.log"
  local t_start=$SECONDS finished=0 applied=0 cap_wall=0 i=0 tick=0
  mkdir -p "$d/snap"
  while ((SECONDS - t_start < WAN_CAP_S)); do
    if grep -q 'cycle applied on the replica' "$d/shipper.log"; then finished=1; break; fi
    kill -0 "$spid" 2>/dev/null || break
    sleep 0.2
    # One snapshot of the relay's counters a second (the steady rate).
    tick=$((tick + 1))
    if ((tick % 5 == 0)) && kill -USR2 "$rpid" 2>/dev/null; then
      sleep 0.05
      i=$((i + 1))
      cp "$d/relay.json" "$d/snap/$i.json" 2>/dev/null || true
    fi
  done
  if ((!finished)); then
    cap_wall=$(date +%s.%N)
    applied=$(allocated "$d/replica" '*/disks/*.img')
    # What the applier says of the cycle (its admin socket; it has no byte count yet).
    python3 -c "import json,socket,sys
s=socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])
s.sendall(b'{\"op\":\"status\"}\n'); print(s.makefile().readline().strip())" \
      "$d/replica/applier.sock" >"$d/applier-status.json" 2>/dev/null || true
  fi
  local cs ca
  cs=$(cpu_s "$spid"); ca=$(cpu_s "$apid")
  stop "$spid"
  stop "$rpid" "$apid" "$tpid"
  python3 "$script_dir/wan_table.py" case "$d" "$label" "$cc" "$loss" "$rate" "$delay" "$limit" \
    "$finished" "$applied" "$cap_wall" "$cs" "$ca" "$load1" "$mib" >>"$ROWS" \
    || log "analysing case $n failed: left out of the table (WAN_KEEP=1 keeps its logs in $d)"
  tail -1 "$ROWS" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('wan:   ->', {k: r.get(k) for k in ('finished','transfer_s','data_mib','cycle_s','interrupted')})" >&2
  [[ $WAN_KEEP == 1 ]] || rm -rf "$d/replica" "$d/primary"
}

# run_pair CC_A CC_B RATE_BITS DELAY_MS LOSS: two shippers through one relay bottleneck.
IMG_A=$WORK/pair-a.img
IMG_B=$WORK/pair-b.img
run_pair() {
  local cca=$1 ccb=$2 rate=$3 delay=$4 loss=$5
  n=$((n + 1))
  local d=$WORK/pair-$n
  mkdir -p "$d/a" "$d/b"
  local need=$((WAN_FAIR_WARM_S + WAN_FAIR_S + 40))
  if over_budget "$need"; then
    log "skipping pair $cca+$ccb: WAN_MAX_SECONDS=$WAN_MAX_SECONDS would be exceeded"
    printf '{"label":"pair","cc":"%s+%s","skipped":true}\n' "$cca" "$ccb" >>"$ROWS"
    return
  fi
  if [[ ! -f $IMG_A ]]; then
    make_image "$IMG_A" "$WAN_FAIR_MIB"
    cp --sparse=always "$IMG_A" "$IMG_B"
  fi
  log "pair $n: $cca + $ccb sharing rate=$rate bit/s rtt=$(python3 -c "print(2*$delay)") ms loss=$loss"
  local aport rport load1
  read -r aport rport < <(free_udp_ports 2)
  load1=$(cut -d' ' -f1 /proc/loadavg)
  start_tracker "$d/a" "$IMG_A"
  local tpa=$tpid
  start_tracker "$d/b" "$IMG_B"
  local tpb=$tpid
  start_applier "$d" "$aport"
  start_relay "$d" "$rport" "$aport" "$rate" "$delay" "$loss" "$n" --multi
  write_config "$d/a/shipper.toml" vma "$d/a" "$rport" "$cca" ""
  write_config "$d/b/shipper.toml" vmb "$d/b" "$rport" "$ccb" ""
  # A first, so that the relay numbers it client #1.
  start_shipper "$d/a/shipper.toml" "$d/a/shipper.log"
  local spa=$spid
  wait_for 20 grep -q 'client #1 is' "$d/relay.log" || log "pair $n: shipper A did not reach the relay"
  start_shipper "$d/b/shipper.toml" "$d/b/shipper.log"
  local spb=$spid
  local t0=$SECONDS i=0
  mkdir -p "$d/snap"
  # One snapshot of the relay's per-client counters a second.
  while ((SECONDS - t0 < WAN_FAIR_WARM_S + WAN_FAIR_S)); do
    sleep 1
    kill -USR2 "$rpid" 2>/dev/null || break
    sleep 0.1
    i=$((i + 1))
    cp "$d/relay.json" "$d/snap/$i.json" 2>/dev/null || true
    if grep -q 'cycle applied on the replica' "$d/a/shipper.log" "$d/b/shipper.log"; then break; fi
  done
  local csa csb ca
  csa=$(cpu_s "$spa"); csb=$(cpu_s "$spb"); ca=$(cpu_s "$apid")
  stop "$spa" "$spb"
  stop "$rpid" "$apid" "$tpa" "$tpb"
  python3 "$script_dir/wan_table.py" pair "$d" "$cca+$ccb" "$loss" "$rate" "$delay" \
    "$WAN_FAIR_WARM_S" "$csa" "$csb" "$ca" "$load1" >>"$ROWS"
  tail -1 "$ROWS" | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print('wan:   ->', {k: r.get(k) for k in ('mbit','window_s')})" >&2
  [[ $WAN_KEEP == 1 ]] || rm -rf "$d/replica" "$d/a/primary" "$d/b/primary"
}

# relay_ceiling SECONDS: the relay's forwarding rate per CPU-second, flooded by a python sender.
relay_ceiling() {
  local d=$WORK/ceiling
  mkdir -p "$d"
  local sport rport
  read -r sport rport < <(free_udp_ports 2)
  # The sink is a bound socket nobody reads: the relay's sends succeed, the kernel drops.
  python3 -c "import socket,time,sys
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.bind(('127.0.0.1',int(sys.argv[1]))); time.sleep(float(sys.argv[2]))" \
    "$sport" $(($1 + 10)) &
  local sink=$!
  PIDS+=("$sink")
  start_relay "$d" "$rport" "$sport" 100G 0 0 1
  python3 -c "import socket,time,sys
c=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); c.connect(('127.0.0.1',int(sys.argv[1])))
buf=b'x'*1200; end=time.time()+float(sys.argv[2])
while time.time()<end:
    for _ in range(500):
        try: c.send(buf)
        except OSError: pass" "$rport" "$1"
  sleep 0.5
  stop "$rpid" "$sink"
  python3 "$script_dir/wan_table.py" ceiling "$d/relay.json" >>"$ROWS"
}

if ((WAN_CEILING_S > 0)); then
  log "relay ceiling: flooding it for $WAN_CEILING_S s"
  relay_ceiling "$WAN_CEILING_S"
fi
for row in $WAN_ROWS; do
  read -r rate delay loss mib < <(parse_row "$row")
  for cc in $WAN_CCS; do
    run_case link "$cc" "$rate" "$delay" "$loss" "$mib" ""
  done
done
if [[ -n $WAN_FAIR ]]; then
  read -r rate delay loss _ < <(parse_row "$WAN_FAIR_LINK")
  for p in $WAN_FAIR; do
    run_pair "${p%+*}" "${p#*+}" "$rate" "$delay" "$loss"
  done
fi
if [[ -n $WAN_LIMIT ]]; then
  first_row=$(echo $WAN_ROWS)
  first_row=${first_row%% *}
  read -r _ delay _ _ < <(parse_row "${first_row:-$WAN_FAIR_LINK}")
  for cc in $WAN_LIMIT_CCS; do
    run_case limit "$cc" 0 "$delay" 0 "$WAN_SIZE_MIB" "$WAN_LIMIT"
  done
fi

stamp=$(date +%Y-%m-%d-%H%M%S)
mkdir -p "$repo_dir/benches/results"
out=$repo_dir/benches/results/wan-$stamp.md
commit=$(git -C "$repo_dir" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$repo_dir" status --porcelain 2>/dev/null | grep -q . && echo " (uncommitted changes)" || true)
WAN_COMMIT="$commit$dirty" WAN_STAMP=$stamp WAN_CORES=$(nproc) WAN_KERNEL=$(uname -r) \
  WAN_ELAPSED=$((SECONDS - script_start)) WAN_CCS_ORDER="$WAN_CCS" WAN_STREAMS=$WAN_STREAMS \
  WAN_CONNECTIONS=$WAN_CONNECTIONS WAN_CAP_S=$WAN_CAP_S WAN_FAIR_WARM_S=$WAN_FAIR_WARM_S \
  python3 "$script_dir/wan_table.py" report "$ROWS" >"$out"
cat "$out"
log "written $out ($((SECONDS - script_start)) s)"
