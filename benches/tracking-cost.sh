#!/usr/bin/env bash
# What dirty tracking costs the tracker, in counts rather than seconds.
#
# benches/nbd-servers.sh compares IOPS, and on a shared 2-core machine the same server's IOPS
# moves by more than the few percent tracking may cost. Instruction, syscall and page-fault
# counts for a fixed number of I/Os hardly move between runs, so this script measures those:
# the tracker with tracking on, and the same tracker with --no-tracking (the "tracker (off)"
# server of nbd-servers.sh: the same command line plus --no-tracking, fresh empty state dir).
#
# For each mode (on, off) and each workload (fio --ioengine=nbd over the unix socket, a FIXED
# number of I/Os, fio's default fixed random seed so the offsets are the same every run):
#   4k random write | 4k random read | 1M sequential write | 1M sequential read
# it records
#   1. instructions per I/O: the tracker runs under `valgrind --tool=callgrind`; the counters are
#      zeroed (callgrind_control -z) once it serves, and dumped (callgrind_control -d) right after
#      each workload, then zeroed again, so a dump holds exactly one workload's instructions (all
#      threads; fio's connect and disconnect included, a few thousand instructions in all).
#      The inclusive instructions of vmreplica_tracker::tracking::Tracking::mark come from
#      callgrind_annotate --inclusive=yes on the same dump.
#   2. syscalls per I/O: a second, native tracker; `strace -f -c -p PID` is attached to all its
#      threads for the length of each workload only.
#   3. minor page faults per I/O: field 10 (minflt, all threads) of that native tracker's
#      /proc/PID/stat, read before and after each workload.
# Ratios are on/off. The I/O counts come from fio's JSON (total_ios), not from the settings.
#
# Notes: under valgrind the threads run one at a time and everything is ~50x slower, so
# requests batch differently than natively; the default queue depth is 1 so that batching,
# and with it the syscall counts, is the same in every run (TC_IODEPTH to change it); futex
# calls still depend on timing (was a thread already asleep when another woke it?), so the
# tables count syscalls with and without them. Each tracker starts on a cold page cache.
# Instructions run by the kernel (copies into and out of the page cache, io_uring) are not in
# callgrind's counts: they cost the same on and off, so the on/off ratio of user-space
# instructions is an upper bound of the ratio of total CPU. Callgrind counts every iteration of
# a `rep movs`/`rep stos` (glibc's memcpy and memset of a few KiB and more) as an instruction:
# a 1 MiB copy or fill counts about a million, so buffer copies and fills weigh far more in
# these counts than in CPU time.
#
# Environment:
#   VMREPLICA=<repo>/target/release/vmreplica   the tracker binary (built with debug info:
#                          the release profile has debug = 1, for callgrind_annotate's names)
#   TC_IOS_4K=20000        I/Os per 4k workload
#   TC_IOS_1M=1000         I/Os per 1M workload
#   TC_IODEPTH=1           fio iodepth for all workloads; TC_IODEPTH_4K and TC_IODEPTH_1M
#                          override it for the 4k and the 1M workloads (nbd-servers.sh uses
#                          32 and 8: TC_PARTS=strace TC_IODEPTH_4K=32 TC_IODEPTH_1M=8 shows
#                          the malloc behaviour of several large buffers in flight)
#   TC_SIZE=256M           image size (fully written before the servers start; the 1M
#                          workloads wrap around it)
#   TC_PARTS="callgrind strace"   which parts to run (page faults come with strace)
#   TC_DIR=<mktemp -d under /var/tmp>   image, sockets, state dirs (removed unless TC_KEEP=1)
#   TC_START_TIMEOUT=120   seconds for a tracker (under valgrind) to serve
#   TC_MAX_SECONDS=900     hard limit for the whole script
#
# Output: markdown on stdout and in benches/results/tracking-cost-<stamp>.md; callgrind dumps,
# strace tables, fio JSON and tracker logs in benches/results/raw/<stamp>/ (git-ignored).
# Exit status 0 when every measurement was taken, 1 if one failed, 2 for setup errors.
set -euo pipefail

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
log() { echo "tracking-cost: $*" >&2; }
die() { log "error: $*"; exit 2; }

VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}
TC_IOS_4K=${TC_IOS_4K:-20000}
TC_IOS_1M=${TC_IOS_1M:-1000}
TC_IODEPTH=${TC_IODEPTH:-1}
TC_IODEPTH_4K=${TC_IODEPTH_4K:-$TC_IODEPTH}
TC_IODEPTH_1M=${TC_IODEPTH_1M:-$TC_IODEPTH}
TC_SIZE=${TC_SIZE:-256M}
TC_PARTS=${TC_PARTS:-"callgrind strace"}
TC_START_TIMEOUT=${TC_START_TIMEOUT:-120}
TC_MAX_SECONDS=${TC_MAX_SECONDS:-900}
TC_KEEP=${TC_KEEP:-0}

for v in TC_IOS_4K TC_IOS_1M TC_IODEPTH TC_IODEPTH_4K TC_IODEPTH_1M TC_START_TIMEOUT TC_MAX_SECONDS; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive whole number (got '${!v}')"
done
size_bytes=$(numfmt --from=iec "${TC_SIZE%B}" 2>/dev/null) || die "cannot parse TC_SIZE='$TC_SIZE'"
(( size_bytes >= 16 << 20 && size_bytes % (1 << 20) == 0 )) || die "TC_SIZE must be a multiple of 1 MiB, at least 16M"
(( TC_IOS_4K * 4096 <= size_bytes )) || die "TC_IOS_4K x 4 KiB must fit in TC_SIZE (random I/O touches each block once)"
do_cg=0; do_st=0
for p in $TC_PARTS; do
  case $p in
    callgrind) do_cg=1 ;;
    strace) do_st=1 ;;
    *) die "unknown part '$p' in TC_PARTS (callgrind, strace)" ;;
  esac
done

[[ -f $VMREPLICA && -x $VMREPLICA ]] || die "no tracker binary at $VMREPLICA (cargo build --release, or set VMREPLICA)"
for t in fio nbdinfo python3 timeout; do command -v "$t" >/dev/null || die "$t not found (scripts/install-deps.sh)"; done
if (( do_cg )); then
  for t in valgrind callgrind_control callgrind_annotate; do command -v "$t" >/dev/null || die "$t not found (apt-get install valgrind)"; done
fi
(( do_st == 0 )) || command -v strace >/dev/null || die "strace not found (apt-get install strace)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no 'nbd' ioengine (it must be built with libnbd)"

# key | label | fio rw | bs | I/Os | JSON section | iodepth
workloads=(
  "randwrite-4k|4k random write, QD$TC_IODEPTH_4K|randwrite|4k|$TC_IOS_4K|write|$TC_IODEPTH_4K"
  "randread-4k|4k random read, QD$TC_IODEPTH_4K|randread|4k|$TC_IOS_4K|read|$TC_IODEPTH_4K"
  "seqwrite-1m|1M sequential write, QD$TC_IODEPTH_1M|write|1M|$TC_IOS_1M|write|$TC_IODEPTH_1M"
  "seqread-1m|1M sequential read, QD$TC_IODEPTH_1M|read|1M|$TC_IOS_1M|read|$TC_IODEPTH_1M"
)

stamp=$(date +%Y-%m-%d-%H%M%S)
results_dir=$repo_dir/benches/results
[[ ! -e $results_dir/raw/$stamp && ! -e $results_dir/tracking-cost-$stamp.md ]] || stamp+="-$$"
raw_dir=$results_dir/raw/$stamp
md_out=$results_dir/tracking-cost-$stamp.md
mkdir -p "$raw_dir"
if [[ -n ${TC_DIR:-} ]]; then
  mkdir -p "$TC_DIR"; work_dir=$(cd "$TC_DIR" && pwd); own_work_dir=0
else
  work_dir=$(mktemp -d /var/tmp/tracking-cost.XXXXXX); own_work_dir=1
fi
img=$work_dir/disk0.raw
sock=$work_dir/nbd.sock
uri="nbd+unix:///disk0?socket=$sock"
(( ${#sock} < 100 )) || die "socket path too long for AF_UNIX: $sock (set TC_DIR shorter)"

server_pid=""
strace_pid=""
watchdog_pid=""

# shellcheck source=benches/procs.sh
source "$script_dir/procs.sh"

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$strace_pid" strace INT 60
  stop_pid "$server_pid" tracker TERM 60
  stop_watchdog
  if [[ $TC_KEEP != 1 ]]; then
    rm -rf "$img" "$sock" "$work_dir"/state-*
    if [[ $own_work_dir == 1 ]]; then rmdir "$work_dir" 2>/dev/null || true; fi
  else
    log "kept $work_dir"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated (time limit ${TC_MAX_SECONDS}s or signal)"; exit 124' TERM
start_watchdog tracking-cost "$TC_MAX_SECONDS"

log "work dir $work_dir; writing a ${size_bytes}-byte image"
dd if=/dev/zero of="$img" bs=1M count=$((size_bytes >> 20)) oflag=direct conv=fsync status=none \
  || die "could not write $img"

# Starts the tracker (server_pid) in mode $1 (on/off), optionally under the command prefix in
# the array `wrap`, and waits until it serves disk0.
start_tracker() {
  local mode=$1 logf=$2 state=$work_dir/state-$1 deadline
  rm -rf "$state" "$sock"; mkdir -p "$state"
  # Every tracker starts on a cold page cache, not on what the one before it left behind.
  sync "$img" 2>/dev/null || sync
  dd if="$img" iflag=nocache count=0 status=none 2>/dev/null || true
  local -a cmd=("$VMREPLICA" tracker --state-dir "$state" --disk "disk0=$img" --socket "$sock")
  [[ $mode == off ]] && cmd+=(--no-tracking)
  log "starting: ${wrap[*]+${wrap[*]} }${cmd[*]}"
  ${wrap[@]+"${wrap[@]}"} "${cmd[@]}" </dev/null >"$logf" 2>&1 &
  server_pid=$!
  deadline=$((SECONDS + TC_START_TIMEOUT))
  until [[ -S $sock ]] && nbdinfo --size "$uri" >/dev/null 2>&1; do
    alive "$server_pid" || { log "tracker ($mode) exited: $(tail -n 5 "$logf" | tr '\n' ' ')"; return 1; }
    (( SECONDS < deadline )) || { log "tracker ($mode) not serving within ${TC_START_TIMEOUT}s"; return 1; }
    sleep 0.2
  done
}

# Runs workload $1 (a line of `workloads`) against the tracker; fio JSON to $2.
run_fio() {
  local wkey rw bs n qd
  IFS='|' read -r wkey _ rw bs n _ qd <<<"$1"
  local bytes
  bytes=$(( n * $(numfmt --from=iec "${bs^^}") ))
  timeout 600 fio --name="$wkey" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" \
    --iodepth="$qd" --numjobs=1 --size="$size_bytes" --io_size="$bytes" \
    --randrepeat=1 --output-format=json --output="$2" </dev/null >"$2.log" 2>&1
}

minflt() { local st; read -r st <"/proc/$1/stat"; st=${st##*) }; local -a f; read -r -a f <<<"$st"; echo "${f[7]}"; }

manifest=$raw_dir/manifest.tsv
: >"$manifest"
failed=0
started_at=$SECONDS

for mode in on off; do
  if (( do_cg )); then
    cg_out=$raw_dir/callgrind.$mode.out
    wrap=(valgrind --tool=callgrind --callgrind-out-file="$cg_out" --dump-instr=no)
    if start_tracker "$mode" "$raw_dir/tracker.$mode.callgrind.log"; then
      callgrind_control -z "$server_pid" >/dev/null 2>&1
      for w in "${workloads[@]}"; do
        IFS='|' read -r wkey _ <<<"$w"
        log "callgrind, tracking $mode: $wkey"
        if ! run_fio "$w" "$raw_dir/cg.$mode.$wkey.json"; then
          log "fio failed: $(tail -n 3 "$raw_dir/cg.$mode.$wkey.json.log" | tr '\n' ' ')"; failed=1; continue
        fi
        before=$(find "$raw_dir" -maxdepth 1 -name "callgrind.$mode.out*" | sort)
        callgrind_control -d "$wkey" "$server_pid" >/dev/null 2>&1
        callgrind_control -z "$server_pid" >/dev/null 2>&1
        dump=$(comm -13 <(echo "$before") <(find "$raw_dir" -maxdepth 1 -name "callgrind.$mode.out*" | sort) | head -n 1)
        if [[ -z $dump ]]; then log "no callgrind dump for $mode/$wkey"; failed=1; continue; fi
        printf 'CG\t%s\t%s\t%s\t%s\n' "$mode" "$wkey" "$dump" "$raw_dir/cg.$mode.$wkey.json" >>"$manifest"
      done
    else
      failed=1
    fi
    stop_pid "$server_pid" tracker TERM 60; server_pid=""
  fi

  if (( do_st )); then
    wrap=()
    if start_tracker "$mode" "$raw_dir/tracker.$mode.native.log"; then
      for w in "${workloads[@]}"; do
        IFS='|' read -r wkey _ <<<"$w"
        log "strace + page faults, tracking $mode: $wkey"
        st_out=$raw_dir/strace.$mode.$wkey.txt
        strace -f -c -o "$st_out" -p "$server_pid" 2>"$st_out.log" &
        strace_pid=$!
        # Attached once the main thread shows a tracer; give the other threads a moment.
        for ((i = 0; i < 100; i++)); do
          grep -q '^TracerPid:[[:space:]]*[1-9]' "/proc/$server_pid/status" && break
          sleep 0.05
        done
        sleep 0.5
        f0=$(minflt "$server_pid")
        run_fio "$w" "$raw_dir/st.$mode.$wkey.json" || { log "fio failed on $mode/$wkey"; failed=1; }
        f1=$(minflt "$server_pid")
        stop_pid "$strace_pid" strace INT 60; strace_pid=""
        printf 'ST\t%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "$wkey" "$st_out" "$raw_dir/st.$mode.$wkey.json" "$f0" "$f1" >>"$manifest"
      done
    else
      failed=1
    fi
    stop_pid "$server_pid" tracker TERM 60; server_pid=""
  fi
done

for w in "${workloads[@]}"; do
  IFS='|' read -r wkey wlabel _ _ _ wsec _ <<<"$w"
  printf 'W\t%s\t%s\t%s\n' "$wkey" "$wlabel" "$wsec" >>"$manifest"
done
# Every part that ran must have one row per mode and workload.
expected=$(( (do_cg + do_st) * 2 * ${#workloads[@]} ))
got=$(grep -c -E '^(CG|ST)' "$manifest" || true)
if (( got != expected )); then
  log "ERROR: $got of $expected measurements taken"
  failed=1
fi

git_rev=$(git -C "$repo_dir" rev-parse --short HEAD 2>/dev/null || echo "no commit")
git_dirty=$(git -C "$repo_dir" status --porcelain 2>/dev/null | head -n 1)
engine=$(grep -ho 'engine[^,]*' "$raw_dir"/tracker.on.native.log 2>/dev/null | head -n 1 || true)
{
  echo "# Tracking cost in counts — $stamp"
  echo
  echo "- repo: $git_rev${git_dirty:+ (uncommitted changes)}; binary: \`${VMREPLICA/#$repo_dir\//}\`; host: $(uname -r), $(nproc) cores"
  echo "- $(fio --version); $(valgrind --version 2>/dev/null || echo 'no valgrind'); $(strace -V 2>/dev/null | head -n 1 || echo 'no strace')"
  echo "- image: $((size_bytes >> 20)) MiB raw, fully written first; tracker (on): \`vmreplica tracker --state-dir STATE --disk disk0=IMG --socket SOCK\`, tracker (off): the same plus \`--no-tracking\`; a fresh state dir for each start${engine:+; tracker log: $engine}"
  echo "- workloads: fio --ioengine=nbd, numjobs=1, iodepth as in the table, a fixed number of I/Os each (below), fixed random seed, run in table order against one tracker per mode and part"
  echo "- instructions: valgrind --tool=callgrind, all threads, counters zeroed before and dumped after each workload; Tracking::mark: its inclusive count (callgrind_annotate --inclusive=yes)"
  echo "- syscalls: strace -f -c attached to the native tracker for each workload; page faults: minflt of /proc/PID/stat (all threads) before and after each workload"
  echo
  python3 - "$manifest" <<'EOF'
import json, re, subprocess, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
work = [(r[1], r[2], r[3]) for r in rows if r[0] == "W"]
def ios(path, sec):
    try:
        return json.load(open(path))["jobs"][0][sec]["total_ios"]
    except Exception:
        return None
def cg_total(path):
    for line in open(path):
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    return None
def cg_mark(path):
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--auto=no", "--threshold=100", path],
                         capture_output=True, text=True).stdout
    # One line per source file the function's inlined code came from, and one (the largest)
    # for its calls from its callers, which is the sum of the others: take the largest.
    total = 0
    for line in out.splitlines():
        if re.search(r"Tracking::mark(\s|$|\[)", line) or line.rstrip().endswith("Tracking::mark"):
            m = re.match(r"\s*([\d,]+)", line)
            if m:
                total = max(total, int(m.group(1).replace(",", "")))
    return total
def strace_calls(path):
    calls, started = {}, False
    for line in open(path):
        f = line.split()
        if line.startswith("------"):
            started = True
            continue
        if not started or len(f) < 5 or f[-1] == "total":
            continue
        try:
            calls[f[-1]] = int(f[3])
        except ValueError:
            pass
    return calls
sec = {k: s for k, _, s in work}
cg, st = {}, {}
for r in rows:
    if r[0] == "CG":
        _, mode, k, dump, js = r
        n = ios(js, sec[k])
        cg[(mode, k)] = (n, cg_total(dump), cg_mark(dump))
    elif r[0] == "ST":
        _, mode, k, out, js, f0, f1 = r
        n = ios(js, sec[k])
        st[(mode, k)] = (n, strace_calls(out), int(f1) - int(f0))
def fmt(x, d=0):
    return "–" if x is None else f"{x:,.{d}f}"
def ratio(a, b):
    return "–" if a is None or b in (None, 0) else f"{a / b:.3f}"
def per(a, n):
    return None if a is None or not n else a / n
if cg:
    print("### User-space instructions per I/O (callgrind)\n")
    print("| Workload | I/Os | tracking on | tracking off | on / off | Tracking::mark per I/O (on) | mark share of on |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, label, _ in work:
        on, off = cg.get(("on", k)), cg.get(("off", k))
        n = on[0] if on else (off[0] if off else None)
        i_on = per(on[1], on[0]) if on else None
        i_off = per(off[1], off[0]) if off else None
        mk = per(on[2], on[0]) if on else None
        share = "–" if mk is None or not i_on else f"{100 * mk / i_on:.1f}%"
        print(f"| {label} | {fmt(n)} | {fmt(i_on)} | {fmt(i_off)} | {ratio(i_on, i_off)} | {fmt(mk)} | {share} |")
    print("\n_Instructions the tracker process ran in user space (all threads) during the workload, "
          "divided by fio's total_ios; the kernel's work (copies, io_uring, the socket) is not counted, "
          "and each iteration of a rep movs/stos (memcpy, memset of a few KiB and more) counts as one. "
          "Reads run no tracking code (Tracking::mark: 0), so the read rows' on/off ratio shows how much "
          "the totals move from run to run by themselves (threads spinning or sleeping in their locks "
          "and queues as the scheduling falls); Tracking::mark's inclusive count is the direct cost of "
          "tracking, and that does not move._\n")
if st:
    print("### Syscalls and minor page faults per I/O (native tracker)\n")
    print("| Workload | I/Os | syscalls on | syscalls off | on / off | other than futex, on | other than futex, off | page faults on | page faults off |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, label, _ in work:
        on, off = st.get(("on", k)), st.get(("off", k))
        s_on = per(sum(on[1].values()), on[0]) if on else None
        s_off = per(sum(off[1].values()), off[0]) if off else None
        n = on[0] if on else (off[0] if off else None)
        nf = lambda x: per(sum(c for name, c in x[1].items() if name != "futex"), x[0]) if x else None
        print(f"| {label} | {fmt(n)} | {fmt(s_on, 2)} | {fmt(s_off, 2)} | {ratio(s_on, s_off)} | "
              f"{fmt(nf(on), 3)} | {fmt(nf(off), 3)} | "
              f"{fmt(per(on[2], on[0]) if on else None, 2)} | {fmt(per(off[2], off[0]) if off else None, 2)} |")
    print("\n_futex calls depend on whether a thread was already waiting when another woke it, that is on timing, "
          "so they differ between runs and between on and off at random; the other syscalls follow the requests._\n")
    print("#### Syscalls by name, calls per I/O (on / off; those at 0.001 per I/O or more in either)\n")
    print("| Workload | syscall | on | off |")
    print("|---|---|---:|---:|")
    for k, label, _ in work:
        on, off = st.get(("on", k)), st.get(("off", k))
        if not on or not off:
            continue
        names = sorted(set(on[1]) | set(off[1]), key=lambda s: -max(on[1].get(s, 0), off[1].get(s, 0)))
        for s in names:
            a, b = per(on[1].get(s, 0), on[0]), per(off[1].get(s, 0), off[0])
            if max(a, b) >= 0.001:
                print(f"| {label} | {s} | {a:.4f} | {b:.4f} |")
    print()
EOF
  echo "Raw callgrind dumps, strace tables and fio JSON: \`benches/results/raw/$stamp/\` (not committed). Total time: $((SECONDS - started_at))s."
} | tee "$md_out"
log "wrote $md_out"
exit "$failed"
