#!/usr/bin/env bash
# NBD server benchmark: vmreplica's tracker against qemu-nbd and nbdkit, side by side.
#
# The same server's IOPS moves by up to 2x between back-to-back runs on the dev machines, so
# one pass per server cannot show a 5% difference: the servers run in BENCH_ROUNDS alternating
# rounds (every server once per round), and the report gives each cell's median over the rounds
# with its spread, and the ratios between servers as the median of the per-round ratios (runs of
# one round are minutes apart, not hours).
#
# Order within a round: odd rounds run the servers in BENCH_SERVERS order rotated by one more
# place every two rounds; each even round runs the round before it REVERSED. So rounds 1 and 2
# (3 and 4, ...) are mirror images and every pair of servers meets in both orders: whatever the
# one that runs first leaves behind (page cache, dirty pages still being written back, a warm or
# throttled CPU, a neighbour's load that fades), it is charged to each side of a ratio once.
# With rotation alone, adjacent servers kept their order (tracker-on always just before
# tracker-off), and an order effect showed up as a tracking cost of 7-8%. BENCH_ROUNDS is
# even by default (4): with an odd count the last round's order is not mirrored (a warning says so).
#
# For each server under test it serves the SAME raw image over a unix socket, runs four fio
# workloads through fio's nbd ioengine (libnbd client: --ioengine=nbd --uri=nbd+unix:///...),
# stops the server and records, per (server, workload):
#   IOPS, MB/s, p99 completion latency (fio clat percentile, µs),
#   the server process's CPU (utime+stime from /proc/PID/stat) as % of one core, and CPU µs per I/O.
#
# Workloads (numjobs=1, time based: BENCH_RAMP s of ramp, then BENCH_RUNTIME s measured):
#   4k random write  iodepth 32 | 4k random read  iodepth 32
#   1M seq write     iodepth 8  | 1M seq read     iodepth 8
#
# Servers (each skipped with a note if its binary is absent; choose with BENCH_SERVERS):
#   qemu-uring    qemu-nbd --cache=none --aio=io_uring -f raw -x disk0 -k SOCK --persistent IMG
#   qemu-default  qemu-nbd -f raw -x disk0 -k SOCK --persistent IMG
#   nbdkit        nbdkit --foreground -U SOCK file IMG
#                 (nbdkit's file plugin serves the same disk under ANY export name -- it only
#                 advertises "" in NBD_OPT_LIST -- so every server is reached as .../disk0)
#   tracker-on    $VMREPLICA tracker --state-dir STATEDIR --disk disk0=IMG --socket SOCK
#   tracker-off   the same plus --no-tracking
#   (STATEDIR is a fresh empty directory for every tracker start.)
#
# Image: created ONCE at BENCH_SIZE and fully written (dd of zeros, O_DIRECT, fsync), so every
# block is allocated before any server runs and random writes never measure block allocation or
# unwritten-extent conversion. The same file is then reused for every server; before each server
# it is synced and its page cache dropped (posix_fadvise DONTNEED via `dd iflag=nocache`), so each
# server starts with a cold cache. Workloads run in the fixed order above for every server, so
# whatever one workload leaves in the page cache (for servers that use it) is the same for all.
#
# READ THIS BEFORE QUOTING NUMBERS: fio and the server share the machine's cores (2 on the dev
# machines) and the disk is a virtual one. The numbers are for comparing servers side by side
# within one run of this script, not absolute figures for any of them.
#
# Environment:
#   BENCH_ROUNDS=4          alternating rounds (3 or more for a median that means something;
#                           even, so that every round's order is also run mirrored)
#   BENCH_RUNTIME=10        measured seconds per workload
#   BENCH_RAMP=2            ramp seconds per workload (not measured)
#   BENCH_SIZE=1G           image size (IEC suffixes: 512M, 1G, 2G; multiple of 1 MiB)
#   BENCH_SERVERS="qemu-uring qemu-default nbdkit tracker-on tracker-off"   subset / order
#   VMREPLICA=<repo>/target/release/vmreplica   tracker binary; both tracker servers are skipped
#                           automatically if it is not an executable file
#   BENCH_TRACKER_EXTRA_ARGS=""   extra args for both tracker runs (word-split)
#   BENCH_STATE_DIR=<BENCH_DIR>   where the trackers' state dirs are made (a fresh directory
#                           under it, removed at exit unless BENCH_KEEP=1); /dev/shm takes the
#                           bitmap's and the activity log's writeback off the image's disk
#   BENCH_DIR=<mktemp -d under /var/tmp>   where the image, sockets and state dirs live (removed
#                           at exit unless BENCH_KEEP=1); must not be tmpfs (O_DIRECT)
#   BENCH_START_TIMEOUT=10  seconds to wait for a server to accept NBD connections
#   BENCH_STOP_TIMEOUT=10   seconds to wait after SIGTERM before SIGKILL
#   BENCH_MAX_SECONDS=<estimate x2>   hard limit for the whole script
#
# Output: markdown on stdout and in benches/results/nbd-servers-<stamp>.md; raw fio JSON, server
# logs and a summary JSON in benches/results/raw/<stamp>/ (git-ignored).
# Exit status: 0 if every selected server that is installed ran every workload; 1 if a server
# failed to start or a workload failed (the table is still written); 2 for setup errors.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)

die() { echo "nbd-servers: error: $*" >&2; exit 2; }
log() { echo "nbd-servers: $*" >&2; }

BENCH_ROUNDS=${BENCH_ROUNDS:-4}
BENCH_RUNTIME=${BENCH_RUNTIME:-10}
BENCH_RAMP=${BENCH_RAMP:-2}
BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_SERVERS=${BENCH_SERVERS:-"qemu-uring qemu-default nbdkit tracker-on tracker-off"}
VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}
BENCH_TRACKER_EXTRA_ARGS=${BENCH_TRACKER_EXTRA_ARGS:-}
BENCH_STATE_DIR=${BENCH_STATE_DIR:-}
BENCH_START_TIMEOUT=${BENCH_START_TIMEOUT:-10}
BENCH_STOP_TIMEOUT=${BENCH_STOP_TIMEOUT:-10}
BENCH_KEEP=${BENCH_KEEP:-0}

for v in BENCH_ROUNDS BENCH_RUNTIME BENCH_RAMP BENCH_START_TIMEOUT BENCH_STOP_TIMEOUT; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number of seconds (got '${!v}')"
done
[[ $BENCH_RUNTIME -ge 1 ]] || die "BENCH_RUNTIME must be >= 1"
[[ $BENCH_ROUNDS -ge 1 ]] || die "BENCH_ROUNDS must be >= 1"
[[ $BENCH_ROUNDS -ge 3 ]] || log "warning: BENCH_ROUNDS=$BENCH_ROUNDS: medians of fewer than 3 rounds say little"
(( BENCH_ROUNDS % 2 == 0 )) || log "warning: BENCH_ROUNDS=$BENCH_ROUNDS is odd: round $BENCH_ROUNDS's order is not run mirrored"

size_spec=${BENCH_SIZE%iB}; size_spec=${size_spec%B}
size_bytes=$(numfmt --from=iec "$size_spec" 2>/dev/null) || die "cannot parse BENCH_SIZE='$BENCH_SIZE'"
(( size_bytes >= 1048576 && size_bytes % 1048576 == 0 )) || die "BENCH_SIZE must be a multiple of 1 MiB (got $size_bytes bytes)"

# Workloads: key, label, fio rw, block size, iodepth, which JSON section holds the numbers.
workloads=(
  "randwrite-4k|4k random write, QD32|randwrite|4k|32|write"
  "randread-4k|4k random read, QD32|randread|4k|32|read"
  "seqwrite-1m|1M sequential write, QD8|write|1M|8|write"
  "seqread-1m|1M sequential read, QD8|read|1M|8|read"
)
n_workloads=${#workloads[@]}

server_label() {
  case "$1" in
    qemu-uring) echo "qemu-nbd io_uring/none" ;;
    qemu-default) echo "qemu-nbd default" ;;
    nbdkit) echo "nbdkit file" ;;
    tracker-on) echo "tracker (on)" ;;
    tracker-off) echo "tracker (off)" ;;
    *) return 1 ;;
  esac
}
read -r -a servers <<<"$BENCH_SERVERS"
[[ ${#servers[@]} -gt 0 ]] || die "BENCH_SERVERS is empty"
for s in "${servers[@]}"; do server_label "$s" >/dev/null || die "unknown server '$s' in BENCH_SERVERS"; done

# ---- tools -----------------------------------------------------------------------------------
command -v fio >/dev/null || die "fio not found (apt-get install fio, or scripts/install-deps.sh)"
command -v nbdinfo >/dev/null || die "nbdinfo not found (apt-get install libnbd-bin)"
command -v python3 >/dev/null || die "python3 not found"
if ! fio --enghelp=nbd >/dev/null 2>&1; then
  die "this fio ($(fio --version 2>/dev/null || echo '?')) has no 'nbd' ioengine: it must be built with libnbd (Debian's fio package is)"
fi
clk_tck=$(getconf CLK_TCK)

# ---- bounded total runtime ---------------------------------------------------------------------
per_workload=$((BENCH_RUNTIME + BENCH_RAMP + 15))
per_server=$((BENCH_START_TIMEOUT + BENCH_STOP_TIMEOUT + 5 + n_workloads * per_workload))
BENCH_MAX_SECONDS=${BENCH_MAX_SECONDS:-$(( 2 * (BENCH_ROUNDS * ${#servers[@]} * per_server + 60 + size_bytes / 20000000) ))}
[[ $BENCH_MAX_SECONDS =~ ^[0-9]+$ ]] || die "BENCH_MAX_SECONDS must be a whole number"

# ---- state & cleanup ---------------------------------------------------------------------------
stamp=$(date +%Y-%m-%d-%H%M%S)
results_dir=$repo_dir/benches/results
[[ ! -e $results_dir/raw/$stamp && ! -e $results_dir/nbd-servers-$stamp.md ]] || stamp+="-$$"
raw_dir=$results_dir/raw/$stamp
md_out=$results_dir/nbd-servers-$stamp.md
mkdir -p "$raw_dir"

if [[ -n ${BENCH_DIR:-} ]]; then
  mkdir -p "$BENCH_DIR"; work_dir=$(cd "$BENCH_DIR" && pwd); own_work_dir=0
else
  work_dir=$(mktemp -d /var/tmp/nbd-bench.XXXXXX); own_work_dir=1
fi
state_base=$work_dir
if [[ -n $BENCH_STATE_DIR ]]; then
  mkdir -p "$BENCH_STATE_DIR" && state_base=$(mktemp -d "$BENCH_STATE_DIR/nbd-bench-state.XXXXXX") \
    || die "cannot make a state directory under BENCH_STATE_DIR=$BENCH_STATE_DIR"
fi
img=$work_dir/disk0.raw
sock=$work_dir/nbd.sock
(( ${#sock} < 100 )) || die "socket path too long for AF_UNIX: $sock (set BENCH_DIR shorter)"

server_pid=""
fio_pid=""
watchdog_pid=""

# shellcheck source=benches/procs.sh
source "$script_dir/procs.sh"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$fio_pid" fio TERM "$BENCH_STOP_TIMEOUT"
  stop_pid "$server_pid" server TERM "$BENCH_STOP_TIMEOUT"
  stop_watchdog
  if [[ $BENCH_KEEP != 1 ]]; then
    rm -f "$sock" "$img"
    rm -rf "$work_dir"/state-* 2>/dev/null || true
    if [[ -n ${state_base:-} && $state_base != "$work_dir" ]]; then rm -rf "$state_base"; fi
    if [[ $own_work_dir == 1 ]]; then rmdir "$work_dir" 2>/dev/null || true; fi
  else
    log "kept work dir $work_dir"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated (time limit ${BENCH_MAX_SECONDS}s or signal)"; exit 124' TERM

start_watchdog nbd-servers "$BENCH_MAX_SECONDS"

# ---- image ------------------------------------------------------------------------------------
log "work dir $work_dir; preparing ${size_bytes}-byte image (fully written)"
rm -f "$img"
dd if=/dev/zero of="$img" bs=1M count=$((size_bytes / 1048576)) oflag=direct conv=fsync status=none \
  || die "could not write the image $img"
alloc_bytes=$(( $(stat -c %b "$img") * $(stat -c %B "$img") ))
(( alloc_bytes >= size_bytes )) || log "warning: image only has $alloc_bytes of $size_bytes bytes allocated"
img_fs=$(df --output=fstype "$img" 2>/dev/null | tail -n 1) || img_fs=$(stat -f -c %T "$img")
[[ $img_fs != tmpfs ]] || log "warning: image is on tmpfs: qemu-nbd --cache=none (O_DIRECT) will fail; set BENCH_DIR"

drop_image_cache() {
  sync "$img" 2>/dev/null || sync
  dd if="$img" iflag=nocache count=0 status=none 2>/dev/null || true
}

# ---- servers ----------------------------------------------------------------------------------
# Sets server_cmd (array) for $1, or returns 1 with skip_reason set.
skip_reason=""
build_server_cmd() {
  local key=$1 state
  server_cmd=()
  case "$key" in
    qemu-uring|qemu-default)
      command -v qemu-nbd >/dev/null || { skip_reason="qemu-nbd not installed"; return 1; }
      if [[ $key == qemu-uring ]]; then
        server_cmd=(qemu-nbd --cache=none --aio=io_uring -f raw -x disk0 -k "$sock" --persistent "$img")
      else
        server_cmd=(qemu-nbd -f raw -x disk0 -k "$sock" --persistent "$img")
      fi ;;
    nbdkit)
      command -v nbdkit >/dev/null || { skip_reason="nbdkit not installed"; return 1; }
      server_cmd=(nbdkit --foreground -U "$sock" file "$img") ;;
    tracker-on|tracker-off)
      [[ -f $VMREPLICA && -x $VMREPLICA ]] || { skip_reason="no tracker binary at $VMREPLICA (build with cargo build --release, or set VMREPLICA)"; return 1; }
      state=$state_base/state-$key
      rm -rf "$state"; mkdir -p "$state"
      local -a extra=()
      read -r -a extra <<<"$BENCH_TRACKER_EXTRA_ARGS"
      server_cmd=("$VMREPLICA" tracker --state-dir "$state" --disk "disk0=$img" --socket "$sock")
      [[ $key == tracker-off ]] && server_cmd+=(--no-tracking)
      server_cmd+=(${extra[@]+"${extra[@]}"}) ;;
  esac
}

uri="nbd+unix:///disk0?socket=$sock"

# Starts the server (server_pid), waits until it serves disk0 with the right size.
start_server() {
  local key=$1 logf=$2 deadline size
  rm -f "$sock"
  log "starting $key: ${server_cmd[*]}"
  "${server_cmd[@]}" </dev/null >"$logf" 2>&1 &
  server_pid=$!
  deadline=$((SECONDS + BENCH_START_TIMEOUT))
  while :; do
    if ! alive "$server_pid"; then
      wait "$server_pid" 2>/dev/null && rc=0 || rc=$?
      server_pid=""
      start_error="exited with status $rc before serving; log: $(tail -n 5 "$logf" | tr '\n' ' ')"
      return 1
    fi
    if [[ -S $sock ]] && size=$(nbdinfo --size "$uri" 2>>"$logf.nbdinfo"); then
      if [[ $size != "$size_bytes" ]]; then
        start_error="export disk0 has size $size, expected $size_bytes"
        return 1
      fi
      return 0
    fi
    if (( SECONDS >= deadline )); then
      start_error="not serving $uri within ${BENCH_START_TIMEOUT}s (socket $( [[ -S $sock ]] && echo present || echo absent )); last nbdinfo error: $(tail -n 1 "$logf.nbdinfo" 2>/dev/null || true)"
      [[ ${start_error: -1} != " " ]] || start_error+="(none)"
      return 1
    fi
    sleep 0.1
  done
}

# Sets ticks to utime+stime of process $1 in clock ticks (all its threads), or "" if it is gone.
read_ticks() {
  local st
  local -a f
  ticks=""
  { read -r st <"/proc/$1/stat"; } 2>/dev/null || return 0
  st=${st##*) }
  read -r -a f <<<"$st"
  ticks=$(( f[11] + f[12] ))
}

# Wall clock in integer microseconds (EPOCHREALTIME minus its locale's decimal separator).
now_us() { local t=$EPOCHREALTIME; now=${t//[!0-9]/}; }

manifest=$raw_dir/manifest.tsv
: >"$manifest"
for w in "${workloads[@]}"; do
  IFS='|' read -r wkey wlabel _ _ _ wsec <<<"$w"
  printf 'W\t%s\t%s\t%s\n' "$wkey" "$wlabel" "$wsec" >>"$manifest"
done

notes=()
failed=0
started_at=$SECONDS

# Servers that can run at all (the others are skipped once, with the reason).
runnable=()
for key in "${servers[@]}"; do
  label=$(server_label "$key")
  if ! build_server_cmd "$key"; then
    log "skipping $key: $skip_reason"
    printf 'S\t%s\t%s\tskipped\t%s\n' "$key" "$label" "$skip_reason" >>"$manifest"
    notes+=("- **$label**: skipped — $skip_reason")
    continue
  fi
  printf 'S\t%s\t%s\tok\t%s\n' "$key" "$label" "${server_cmd[*]}" >>"$manifest"
  notes+=("- **$label**: \`${server_cmd[*]//$work_dir/\$BENCH_DIR}\`")
  runnable+=("$key")
done

# Server order of round $1 (see the header): rotated by (round-1)/2 places, reversed in even rounds.
round_order() {
  local round=$1 n=${#runnable[@]} rot i
  order=()
  (( n > 0 )) || return 0
  rot=$(( (round - 1) / 2 ))
  for ((i = 0; i < n; i++)); do order+=("${runnable[(i + rot) % n]}"); done
  if (( round % 2 == 0 )); then
    local -a rev=()
    for ((i = n - 1; i >= 0; i--)); do rev+=("${order[i]}"); done
    order=("${rev[@]}")
  fi
}

for ((round = 1; round <= BENCH_ROUNDS; round++)); do
  round_order "$round"
  log "round $round of $BENCH_ROUNDS: ${order[*]}"
  for key in "${order[@]}"; do
    label=$(server_label "$key")
    build_server_cmd "$key"
    drop_image_cache
    start_error=""
    if ! start_server "$key" "$raw_dir/$key.r$round.server.log"; then
      log "ERROR: $key failed to start in round $round: $start_error"
      stop_pid "$server_pid" "$key" TERM "$BENCH_STOP_TIMEOUT"; server_pid=""
      notes+=("- **$label**: FAILED TO START in round $round — $start_error")
      for w in "${workloads[@]}"; do
        IFS='|' read -r wkey _ <<<"$w"
        printf 'R\t%s\t%s\tstart failed\t-\t-\t-\t%s\n' "$key" "$wkey" "$round" >>"$manifest"
      done
      failed=1
      continue
    fi

    for w in "${workloads[@]}"; do
      IFS='|' read -r wkey wlabel rw bs qd wsec <<<"$w"
      out=$raw_dir/$key.$wkey.r$round.json
      errf=$raw_dir/$key.$wkey.r$round.fio.log
      if ! alive "$server_pid"; then
        log "ERROR: $key died before $wkey"
        printf 'R\t%s\t%s\tserver died\t-\t-\t-\t%s\n' "$key" "$wkey" "$round" >>"$manifest"
        failed=1
        continue
      fi
      log "$key: $wkey (${BENCH_RAMP}s ramp + ${BENCH_RUNTIME}s)"
      fio --name="$key-$wkey" --ioengine=nbd --uri="$uri" \
        --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
        --time_based --runtime="$BENCH_RUNTIME" --ramp_time="$BENCH_RAMP" \
        --percentile_list=50:99:99.9 \
        --output-format=json --output="$out" </dev/null >"$errf" 2>&1 &
      fio_pid=$!
      # Sample the server's CPU every 50 ms while fio runs. fio spends a few hundred ms starting up
      # and connecting before its ramp, so the window is anchored at fio's exit: the server's CPU
      # over the last BENCH_RUNTIME seconds = fio's measured window (give or take 50 ms and fio's
      # teardown). Samples are kept in raw/ for inspection.
      samples=$raw_dir/$key.$wkey.r$round.cpu.tsv
      : >"$samples"
      s_t=(); s_c=()
      fio_deadline=$((SECONDS + BENCH_RAMP + BENCH_RUNTIME + 30))   # on top of the global watchdog
      while alive "$fio_pid" && (( SECONDS < fio_deadline )); do
        read_ticks "$server_pid"; now_us
        s_t+=("$now"); s_c+=("$ticks")
        printf '%s\t%s\n' "$now" "$ticks" >>"$samples"
        sleep 0.05
      done
      read_ticks "$server_pid"; now_us
      s_t+=("$now"); s_c+=("$ticks")
      printf '%s\t%s\n' "$now" "$ticks" >>"$samples"
      if alive "$fio_pid"; then
        log "ERROR: fio overran $((BENCH_RAMP + BENCH_RUNTIME))+30s on $key/$wkey; stopping it"
        stop_pid "$fio_pid" fio TERM "$BENCH_STOP_TIMEOUT"; fio_pid=""
        printf 'R\t%s\t%s\tfio timeout\t%s\t-\t-\t%s\n' "$key" "$wkey" "$out" "$round" >>"$manifest"
        failed=1
        continue
      fi
      last=$(( ${#s_t[@]} - 1 ))
      t1=${s_t[last]}; c1=${s_c[last]}
      first=0
      while (( first < last && s_t[first] < t1 - BENCH_RUNTIME * 1000000 )); do first=$((first + 1)); done
      t0=${s_t[first]}; c0=${s_c[first]}
      wait "$fio_pid" && frc=0 || frc=$?
      fio_pid=""
      if [[ $frc -ne 0 ]]; then
        log "ERROR: fio failed ($frc) on $key/$wkey: $(tail -n 3 "$errf" | tr '\n' ' ')"
        printf 'R\t%s\t%s\tfio failed\t%s\t-\t-\t%s\n' "$key" "$wkey" "$out" "$round" >>"$manifest"
        failed=1
        continue
      fi
      if [[ -z $c0 || -z $c1 ]]; then
        log "ERROR: $key exited during $wkey"
        printf 'R\t%s\t%s\tserver died\t%s\t-\t-\t%s\n' "$key" "$wkey" "$out" "$round" >>"$manifest"
        failed=1
        continue
      fi
      cpu_s=$(awk -v a="$c0" -v b="$c1" -v hz="$clk_tck" 'BEGIN { printf "%.4f", (b - a) / hz }')
      wall_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", (b - a) / 1e6 }')
      printf 'R\t%s\t%s\tok\t%s\t%s\t%s\t%s\n' "$key" "$wkey" "$out" "$cpu_s" "$wall_s" "$round" >>"$manifest"
    done

    stop_pid "$server_pid" "$key" TERM "$BENCH_STOP_TIMEOUT"; server_pid=""
    rm -f "$sock"
  done
done

# ---- report -----------------------------------------------------------------------------------
orders_note=""
for ((r = 1; r <= BENCH_ROUNDS; r++)); do
  round_order "$r"
  (( r == 1 )) || orders_note+=" / "
  orders_note+="${order[*]}"
done
unmirrored=""
if (( BENCH_ROUNDS % 2 == 1 )); then unmirrored=" (the last round's order is not mirrored: BENCH_ROUNDS is odd)"; fi
ver() { "$@" 2>/dev/null | head -n 1 || true; }
git_rev=$(git -C "$repo_dir" rev-parse --short HEAD 2>/dev/null || echo "no commit")
git_dirty=$(git -C "$repo_dir" status --porcelain 2>/dev/null | head -n 1)
{
  echo "# NBD server benchmark — $stamp"
  echo
  echo "> fio and the server share this machine's $(nproc) cores and its (virtual) disk: compare the"
  echo "> servers side by side within this run; these are not absolute numbers for any of them."
  echo
  echo "- repo: $git_rev${git_dirty:+ (uncommitted changes)}; host: $(uname -r), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
  echo "- $(ver fio --version); $(ver qemu-nbd --version); $(ver nbdkit --version); $(ver nbdinfo --version)"
  echo "- image: $((size_bytes / 1048576)) MiB raw, fully written once (dd, O_DIRECT), on $img_fs; reused for every server, page cache dropped before each server"
  if [[ $state_base != "$work_dir" ]]; then
    echo "- tracker state dirs: under $BENCH_STATE_DIR ($(stat -f -c %T "$state_base")), not beside the image"
  fi
  echo "- workloads: numjobs=1, ${BENCH_RAMP}s ramp + ${BENCH_RUNTIME}s measured each, in table order, fio ioengine=nbd over a unix socket, export disk0"
  echo "- $BENCH_ROUNDS alternating rounds: every server once per round; even rounds run the round before them in reverse order (odd rounds rotate the list by one more place every two rounds), so every pair of servers meets in both orders$unmirrored (orders: $orders_note); cells are the median over the rounds with the spread (min–max); ratios are the median of the per-round ratios"
  echo "- server CPU: utime+stime of the server process (all threads) from /proc/PID/stat, sampled every 50 ms; the window is the last ${BENCH_RUNTIME}s before fio exits (= fio's measured window)"
  echo "- I/O paths (what is compared): nbdkit's file plugin does buffered pread/pwrite on its worker threads (thread model parallel, 16 per connection); the tracker is buffered too: reads the page cache holds are copied on the connection's reader thread (preadv2 RWF_NOWAIT), others go through io_uring, writes up to 64 KiB are a pwrite on the reader thread (larger ones io_uring), after the dirty bits are set; qemu-nbd io_uring/none uses O_DIRECT (no page cache), so it is not like for like on reads of cached data; qemu-nbd default is buffered on a thread pool"
  echo
  python3 "$script_dir/fio_table.py" "$manifest" --summary-json "$raw_dir/summary.json"
  echo "### Servers"
  echo
  printf '%s\n' "${notes[@]}"
  echo
  echo "Raw fio JSON and server logs: \`benches/results/raw/$stamp/\` (not committed). Total time: $((SECONDS - started_at))s."
} | tee "$md_out"
log "wrote $md_out"

exit "$failed"
