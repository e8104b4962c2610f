#!/usr/bin/env bash
# vmreplica demo: serves a disk through the tracker, writes to it with QEMU's qemu-io as a VM
# would, shows the dirty-block map QEMU's tooling sees, then freezes a generation and
# releases it. Everything runs on loopback in a temporary directory that is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh >/dev/null
cargo build --release --bin vmreplica
BIN=$PWD/target/release/vmreplica
WORK=$(mktemp -d /tmp/vmreplica-demo.XXXXXX)
TRACKER_PID=
cleanup() {
  [ -n "$TRACKER_PID" ] && kill "$TRACKER_PID" 2>/dev/null && wait "$TRACKER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== creating a 1 GiB sparse disk image"
truncate -s 1G "$WORK/vm1-disk0.img"
"$BIN" tracker --state-dir "$WORK/state" --disk disk0="$WORK/vm1-disk0.img" \
  --socket "$WORK/nbd.sock" 2> "$WORK/tracker.log" &
TRACKER_PID=$!
for _ in $(seq 100); do [ -S "$WORK/state/control.sock" ] && break; sleep 0.1; done
URI="nbd+unix:///disk0?socket=$WORK/nbd.sock"
echo "== the tracker serves $URI"
nbdinfo "$URI" | sed -n '1,12p'

echo "== a 'guest' writes: 4 MiB at 100 MiB, 64 KiB at 500 MiB, zeroes 1 MiB at 700 MiB"
qemu-io -f raw "$URI" -c 'write -P 0x5a 100M 4M' -c 'write -P 0x33 500M 64k' -c 'write -z 700M 1M' -c flush | grep -v '^[0-9]'

echo "== blocks changed and not yet replicated (qemu:dirty-bitmap:vmreplica)"
nbdinfo --map=qemu:dirty-bitmap:vmreplica "$URI"

echo "== freeze a generation (what the shipper does at a cycle boundary)"
GEN=$("$BIN" ctl --socket "$WORK/state/control.sock" freeze | sed -n 's/.*"generation": \([0-9]*\).*/\1/p' | head -1)
"$BIN" ctl --socket "$WORK/state/control.sock" status
echo "== the guest keeps writing; the frozen generation keeps its point-in-time view"
qemu-io -f raw "$URI" -c 'write -P 0x77 100M 64k' | grep -v '^[0-9]'
nbdinfo --map=qemu:dirty-bitmap:vmreplica "$URI"
echo "== release generation $GEN (the replica has it)"
"$BIN" ctl --socket "$WORK/state/control.sock" release "$GEN"
nbdinfo --map=qemu:dirty-bitmap:vmreplica "$URI"
qemu-img compare -f raw -F raw "$URI" "$WORK/vm1-disk0.img"
echo "== demo done"
