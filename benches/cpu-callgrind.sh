#!/usr/bin/env bash
# CPU cost of replication in instructions, not seconds: one initial-sync cycle of an image
# holding real files, with the shipper under `valgrind --tool=callgrind` (applier native), then
# again with the applier under callgrind (shipper native). Instruction counts are deterministic
# enough to compare two builds on a shared, noisy machine where CPU seconds are not.
#
# Setup as scripts/demo.sh: tracker, applier and shipper of VMREPLICA on loopback (127.0.0.1,
# QUIC with TLS, compression on). The image: a sparse CG_SIZE (1 GiB) ext4 image filled with
# about CG_ALLOC (256 MiB) of files hard-linked from /usr (benches/stage_usr_files.py, as
# benches/replication.sh stages them), and CG_ZERO (64 MiB) of zeroes written at its end. An
# initial cycle skips the holes and ships the rest (zero blocks as zero markers).
#
# Reports, per side: instructions (Ir) of the whole process (start-up and handshake included)
# per MiB of data the cycle shipped, bytes on the wire (the cycle's wire_mib), and the top
# CG_TOP (25) functions by their own instructions (callgrind_annotate). Every replica is checked
# against the image (cmp).
# Output: markdown on stdout and in benches/results/cpu-callgrind-<stamp>.md; the raw callgrind
# files are kept with CG_KEEP=1 (under CG_DIR).
# Environment: VMREPLICA=target/release/vmreplica CG_SIZE=1G CG_ALLOC=256M CG_ZERO=64M CG_TOP=25
#   CG_DIR=<mktemp under /var/tmp> CG_KEEP=0 CG_SIDES="shipper applier" CG_LABEL=<free text
#   for the report's title, e.g. the build>. CG_TUNING=<lines of the shipper's [tuning] table,
#   e.g. 'max_udp_payload = 1452' for the packet size of a 1500-byte path (loopback carries
#   64 KiB datagrams, so MTU discovery otherwise reaches max_udp_payload's default)>.
# Runs in about 5-10 minutes on 2 cores. Needs valgrind, callgrind_annotate, mke2fs, python3.
set -euo pipefail
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_dir=$(cd "$script_dir/.." && pwd)
log() { echo "cpu-callgrind: $*" >&2; }
die() { log "error: $*"; exit 2; }

CG_SIZE=${CG_SIZE:-1G}
CG_ALLOC=${CG_ALLOC:-256M}
CG_TOP=${CG_TOP:-25}
CG_ZERO=${CG_ZERO:-64M}
CG_KEEP=${CG_KEEP:-0}
CG_SIDES=${CG_SIDES:-shipper applier}
CG_LABEL=${CG_LABEL:-}
CG_TUNING=${CG_TUNING:-}
VMREPLICA=${VMREPLICA:-$repo_dir/target/release/vmreplica}
[[ -x $VMREPLICA ]] || die "no $VMREPLICA (cargo build --release --bin vmreplica)"
VMREPLICA=$(cd "$(dirname "$VMREPLICA")" && pwd)/$(basename "$VMREPLICA")
for t in valgrind callgrind_annotate mke2fs python3 cmp; do
  command -v $t >/dev/null || die "$t not found (scripts/install-deps.sh)"
done
size_bytes=$(numfmt --from=iec "${CG_SIZE%iB}")
alloc_bytes=$(numfmt --from=iec "${CG_ALLOC%iB}")
work=${CG_DIR:-$(mktemp -d /var/tmp/cpu-callgrind.XXXXXX)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
stamp=$(date +%Y-%m-%d-%H%M%S)
md_out=$repo_dir/benches/results/cpu-callgrind-$stamp.md
mkdir -p "$repo_dir/benches/results"
pids=()
start() { "$@" & pids+=($!); }
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ $CG_KEEP == 1 ]]; then log "kept $work"; else rm -rf "$work"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
wait_for() { # SECONDS CMD...
  local t=$1; shift
  for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  die "timed out waiting for: $*"
}

# ---- the image ---------------------------------------------------------------------------------
log "building a $CG_SIZE image with ~$CG_ALLOC of files from /usr"
mkdir -p "$work/stage"
staged=$(python3 "$script_dir/stage_usr_files.py" "$work/stage" $((alloc_bytes * 93 / 100)))
img=$work/vm1-sys.img
mke2fs -q -t ext4 -d "$work/stage" -E lazy_itable_init=0,lazy_journal_init=0 "$img" \
  "$((size_bytes / 1024))k" >/dev/null
rm -rf "$work/stage"
# Zeroes written at the end of the image (past ext4's used blocks), as a guest that zero-filled
# its free space leaves them: allocated, so shipped, as zero markers.
zero_bytes=$(numfmt --from=iec "${CG_ZERO%iB}")
if ((zero_bytes > 0)); then
  dd if=/dev/zero of="$img" bs=1M seek=$(((size_bytes - zero_bytes) >> 20)) count=$((zero_bytes >> 20)) \
    conv=notrunc status=none
fi
allocated=$(( $(stat -c %b "$img") * 512 ))

# ---- sites on loopback ---------------------------------------------------------------------------
cd "$work"
"$VMREPLICA" certs init-ca --dir ca >/dev/null
"$VMREPLICA" certs issue --ca ca --name primary-1 --ip 127.0.0.1 >/dev/null
"$VMREPLICA" certs issue --ca ca --name replica-1 --ip 127.0.0.1 >/dev/null
port=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >shipper.toml <<TOML
vm = "vm1"
tracker = "primary/control.sock"
replica = "127.0.0.1:$port"
server_name = "replica-1"
ca = "ca/ca.pem"
cert = "ca/primary-1.pem"
key = "ca/primary-1.key"
interval = "1h"
compression = true
TOML
if [[ -n $CG_TUNING ]]; then printf '[tuning]\n%s\n' "$CG_TUNING" >>shipper.toml; fi
cg() { # side, command...: the command under callgrind (exec: in place of the background subshell), its output in cg.<side>
  local side=$1; shift
  exec valgrind --tool=callgrind --callgrind-out-file="$work/cg.$side" --dump-instr=no \
    --log-file="$work/valgrind.$side.log" "$@"
}

# One initial cycle with `side` under callgrind; sets data_mib, wire_mib.
run_cycle() {
  local side=$1 app=() ship=() line
  # A new tracker and replica for each side, and the image out of the page cache, so that both
  # ship the same initial cycle: ext4's SEEK_DATA counts the unwritten (zeroed) extents that
  # mke2fs leaves as data once their pages are cached, as the previous side's cmp left them.
  rm -rf replica primary
  python3 -c 'import os, sys; f = os.open(sys.argv[1], os.O_RDONLY); os.posix_fadvise(f, 0, 0, os.POSIX_FADV_DONTNEED)' "$img"
  "$VMREPLICA" tracker --state-dir primary --disk "sys=$img" 2>"tracker.$side.log" &
  local tracker_pid=$!
  pids+=("$tracker_pid")
  wait_for 20 test -S primary/control.sock
  [[ $side == applier ]] && app=(cg applier)
  [[ $side == shipper ]] && ship=(cg shipper)
  "${app[@]}" "$VMREPLICA" applier --store replica --listen "127.0.0.1:$port" --cert ca/replica-1.pem \
    --key ca/replica-1.key --ca ca/ca.pem --allow primary-1 2>"applier.$side.log" &
  local app_pid=$!
  pids+=("$app_pid")
  wait_for 300 bash -c "ss -Hunl 'sport = :$port' | grep -q ."
  : >"shipper.$side.log"   # there before the loop below looks into it
  "${ship[@]}" "$VMREPLICA" shipper --config shipper.toml 2>"shipper.$side.log" &
  local ship_pid=$!
  pids+=("$ship_pid")
  for _ in $(seq 9000); do
    line=$(grep 'cycle applied on the replica' "shipper.$side.log" | tail -n 1 || true)
    [[ -n $line ]] && break
    kill -0 "$ship_pid" 2>/dev/null || die "shipper exited: $(tail -n 3 "shipper.$side.log")"
    sleep 0.2
  done
  [[ -n $line ]] || die "no cycle applied within 30 min ($side under callgrind)"
  kill -TERM "$ship_pid"; wait "$ship_pid" 2>/dev/null || true
  kill -TERM "$app_pid"; wait "$app_pid" 2>/dev/null || true
  kill -TERM "$tracker_pid"; wait "$tracker_pid" 2>/dev/null || true
  [[ -s $work/cg.$side ]] || die "no callgrind output for the $side: $(tail -n 3 "valgrind.$side.log")"
  cmp "$img" replica/vm1/disks/sys.img >/dev/null || die "replica differs from the image ($side under callgrind)"
  field() { sed -n "s/.*$1=\"\{0,1\}\([^\" ]*\).*/\1/p" <<<"$line"; }
  data_mib=$(field data_mib) wire_mib=$(field wire_mib)
  log "$side: cycle of $data_mib MiB data, $wire_mib MiB on the wire"
}

# callgrind_annotate's report of a side, written once to a file (awk reading only its head
# from a pipe would end callgrind_annotate with SIGPIPE, which pipefail makes fatal).
annotate() { callgrind_annotate --auto=no --threshold=100 "$work/cg.$1" >"$work/cg.$1.txt" 2>/dev/null; }
ir_total() { awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1; exit }' "$work/cg.$1.txt"; }
top_fns() { # side: the top CG_TOP functions by own instructions (the lines callgrind_annotate
  # gives per source file of a function, inlined code included, summed), as markdown rows
  awk 'f && NF >= 3 && $1 ~ /^[0-9,]+$/ {
      ir = $1; gsub(",", "", ir); $1 = ""; $2 = ""; fn = $0
      sub(/^ +/, "", fn); sub(/ \[[^]]*\]$/, "", fn); sub(/^[^:]*:/, "", fn); sum[fn] += ir }
    /file:function/ { f = 1 }
    END { for (fn in sum) printf "%d\t%s\n", sum[fn], fn }' "$work/cg.$1.txt" |
    sort -t$'\t' -k1,1nr | awk -v n="$CG_TOP" 'NR <= n' |
    awk -F'\t' -v t="$(ir_total "$1")" '{ fn = $2; gsub(/\|/, "\\|", fn)
      if (length(fn) > 110) fn = substr(fn, 1, 107) "..."
      printf "| %.2f | %.1f | `%s` |\n", $1 / 1e6, 100 * $1 / t, fn }'
}

{
  echo "# CPU of one initial cycle under callgrind${CG_LABEL:+: $CG_LABEL} ($stamp)"
  echo
  echo "Image: $CG_SIZE ext4, $(awk -v b="$allocated" 'BEGIN { printf "%.1f", b / 1048576 }') MiB allocated" \
    "($(awk -v b="$staged" 'BEGIN { printf "%.1f", b / 1048576 }') MiB of files from /usr, $CG_ZERO of zeroes written at its end)." \
    "Binary: \`$VMREPLICA\` (script run from $(git -C "$repo_dir" rev-parse --short HEAD 2>/dev/null || echo '?'))."
  echo "Loopback, QUIC + TLS, lz4 compression on; one side under callgrind at a time.${CG_TUNING:+ Shipper tuning: \`$CG_TUNING\`.}"
  echo
} >"$work/report.md"
declare -A ir_mib
for side in $CG_SIDES; do
  log "initial cycle with the $side under callgrind"
  run_cycle "$side"
  annotate "$side"
  total=$(ir_total "$side")
  ir_mib[$side]=$(awk -v t="$total" -v d="$data_mib" 'BEGIN { printf "%.0f", t / d }')
  {
    echo "## $side: $(awk -v v="${ir_mib[$side]}" 'BEGIN { printf "%.2f", v / 1e6 }') M instructions per MiB of data"
    echo
    echo "Instructions: $total for $data_mib MiB of data ($wire_mib MiB on the wire, ratio" \
      "$(awk -v w="$wire_mib" -v d="$data_mib" 'BEGIN { printf "%.3f", w / d }'))."
    echo
    echo "| M Ir (own) | % | function |"
    echo "|---:|---:|---|"
    top_fns "$side"
    echo
  } >>"$work/report.md"
done
{
  echo "## Summary"
  echo
  echo "| side | M Ir / MiB data |"
  echo "|---|---:|"
  for side in $CG_SIDES; do
    echo "| $side | $(awk -v v="${ir_mib[$side]}" 'BEGIN { printf "%.2f", v / 1e6 }') |"
  done
} >>"$work/report.md"
cp "$work/report.md" "$md_out"
cat "$md_out"
log "wrote $md_out"
