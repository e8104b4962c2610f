#!/usr/bin/env bash
# vmreplica demo: protects a VM disk end to end on loopback with built-in defaults.
#   primary side: the tracker serves the disk over NBD (as QEMU would use it) and the shipper
#                 ships its changes every few seconds;
#   replica side: the applier keeps a sparse replica and recovery points;
# with a private CA and mutual TLS between them. It runs the initial sync, several cycles
# under a write load (fio through the NBD export), then shows the replica verified equal,
# the recovery points, and the first point, exported while the VM writes again and cycles
# keep landing, equal to the disk before the writes. Then a planned failover moves the VM to
# the replica host without losing a write (checksums), the VM writes there, replication
# runs back, and a failback returns it with identical disks. Any difference fails the demo.
# Everything lives in a temporary directory that is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh >/dev/null
cargo build --release --bin vmreplica
BIN=$PWD/target/release/vmreplica
WORK=$(mktemp -d /tmp/vmreplica-demo.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  # What the appliers started after the failovers (detached; PIDs in their locks).
  for lock in "$WORK"/*/vm1/primary/tracker/shipper.lock "$WORK"/*/vm1/primary/tracker/lock; do
    [ -f "$lock" ] && kill "$(cat "$lock")" 2>/dev/null || true
  done
  sleep 0.5
  rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"
say() { printf '\n== %s\n' "$*"; }
wait_for() { # wait_for SECONDS CMD...: until CMD succeeds
  local t=$1; shift
  for _ in $(seq $((t * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for: $*" >&2; return 1
}

say "certificates: a private CA, one for the primary host, one for the replica host"
"$BIN" certs init-ca --dir ca >/dev/null
"$BIN" certs issue --ca ca --name primary-1 --ip 127.0.0.1 >/dev/null
"$BIN" certs issue --ca ca --name replica-1 --ip 127.0.0.1 >/dev/null
ls ca

say "primary: a 1 GiB VM disk with 64 MiB of data, served by the tracker"
truncate -s 1G vm1-sys.img
qemu-io -f raw vm1-sys.img -c 'write -P 0x11 0 32M' -c 'write -P 0x22 512M 32M' >/dev/null
"$BIN" tracker --state-dir primary --disk sys="$WORK/vm1-sys.img" 2> tracker.log &
PIDS+=($!)
wait_for 20 test -S primary/control.sock
URI="nbd+unix:///sys?socket=$WORK/primary/nbd.sock"
echo "QEMU would use: -drive file=$URI,format=raw,if=virtio"

say "replica: the applier admits only primary-1"
"$BIN" applier --store replica --listen 127.0.0.1:7443 --cert ca/replica-1.pem \
  --key ca/replica-1.key --ca ca/ca.pem --allow primary-1 --keep 24 2> applier.log &
APPLIER=$!
PIDS+=($APPLIER)

cat > shipper.toml <<TOML
vm = "vm1"
tracker = "primary/control.sock"
replica = "127.0.0.1:7443"
server_name = "replica-1"
ca = "ca/ca.pem"
cert = "ca/primary-1.pem"
key = "ca/primary-1.key"
interval = "3s"
compression = true
streams = 4
[reverse]                  # the primary host's own applier, for replication back
replica = "127.0.0.1:7444"
server_name = "primary-1"
TOML
say "shipper: initial sync, then a cycle every 3 s"
cat shipper.toml
"$BIN" shipper --config shipper.toml 2> shipper.log &
SHIPPER=$!
PIDS+=($SHIPPER)
wait_for 120 grep -q 'cycle applied.*kind=Initial' shipper.log
grep 'cycle applied' shipper.log | tail -1

# The disk as the initial copy froze it (nothing wrote since): recovery point 1 must equal it.
cp --sparse=always vm1-sys.img before-writes.img

say "the VM writes for 10 s (fio, 4k-64k random writes through NBD) while replication runs"
fio --name=guest --ioengine=nbd --uri="$URI" --rw=randwrite --bsrange=4k-64k --iodepth=8 \
  --size=256M --time_based --runtime=10 --refill_buffers --buffer_compress_percentage=50 \
  --output-format=terse --terse-version=3 >/dev/null
echo "writes stopped; waiting for a cycle that starts after them"
n=$(grep -c 'cycle applied' shipper.log)
wait_for 60 bash -c "[ \$(grep -c 'cycle applied' shipper.log) -ge $((n + 2)) ]"
grep 'cycle applied' shipper.log | tail -4

say "verify: block checksums of primary and replica compared over the link"
"$BIN" verify vm1 --config shipper.toml
cmp vm1-sys.img replica/vm1/disks/sys.img
echo "cmp: replica image is byte-for-byte equal"
du -h --apparent-size replica/vm1/disks/sys.img | sed 's/^/apparent size: /'
du -h replica/vm1/disks/sys.img | sed 's/^/allocated (sparse): /'

say "recovery points (listed while the applier runs)"
"$BIN" applier points vm1 --store replica
first=$("$BIN" applier points vm1 --store replica | awk 'NR==2 {print $1}')

say "point $first exported while replication goes on and the VM writes again"
fio --name=guest2 --ioengine=nbd --uri="$URI" --rw=randwrite --bsrange=4k-64k --iodepth=8 \
  --size=256M --time_based --runtime=6 --refill_buffers --buffer_compress_percentage=50 \
  --output-format=terse --terse-version=3 >/dev/null &
FIO=$!
PIDS+=($FIO)
sleep 1
"$BIN" applier export vm1 --store replica --point "$first" --out "point-$first" >/dev/null
cmp "point-$first/sys.img" before-writes.img
echo "point $first (the initial copy), read through the undo logs of later cycles, equals the disk before the VM wrote"
if cmp -s "point-$first/sys.img" vm1-sys.img; then
  echo "error: point $first equals the disk after the writes" >&2
  exit 1
fi
wait "$FIO"
"$BIN" applier status --store replica > status.json
python3 - <<'PY'
import json
for v in json.load(open("status.json"))["vms"]:
    print("replica of %s: lineage %s, cycle %d, %d points"
          % (v["vm"], v["lineage"], v["last_cycle"], v["points"]))
PY
say "planned failover: the VM moves to the replica host, no write lost"
"$BIN" applier --store primary-store --listen 127.0.0.1:7444 --cert ca/primary-1.pem \
  --key ca/primary-1.key --ca ca/ca.pem --allow replica-1 2> primary-applier.log &
PIDS+=($!)
wait_for 20 test -S primary-store/applier.sock
at_shutdown=$(sha256sum < vm1-sys.img)
"$BIN" failover planned vm1 --config shipper.toml --store primary-store --no-start
REPLICA_URI="nbd+unix:///sys?socket=$WORK/replica/vm1/primary/nbd.sock"
nbdcopy "$REPLICA_URI" at-start.img
[ "$(sha256sum < at-start.img)" = "$at_shutdown" ] || { echo "error: the planned failover lost writes" >&2; exit 1; }
echo "sha256 of the disk at the primary's shutdown = at the replica's start: no write lost"
echo "the replica host serves it: $REPLICA_URI"
"$BIN" applier status --store replica | python3 -c 'import json,sys; v=json.load(sys.stdin)["vms"][0]; print("replica host: vm1 is", v["role"]["kind"], "in lineage", v["role"]["lineage"])'

say "the VM writes on the replica host; its changes replicate back to the primary host"
fio --name=guest3 --ioengine=nbd --uri="$REPLICA_URI" --rw=randwrite --bsrange=4k-64k \
  --iodepth=8 --size=256M --time_based --runtime=4 --refill_buffers \
  --buffer_compress_percentage=50 --output-format=terse --terse-version=3 >/dev/null
role() { "$BIN" applier status --store "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["vms"][0]["role"]["kind"])'; }
is_role() { [ "$(role "$1")" = "$2" ]; }
wait_for 60 is_role primary-store replica
echo "primary host: vm1 is $(role primary-store) of the replica host"

say "failback: the same command, the other way"
"$BIN" failover planned vm1 --config replica/vm1/primary/shipper.toml --store replica --no-start
cmp vm1-sys.img replica/vm1/disks/sys.img
echo "cmp: both hosts' disks are byte-for-byte equal; the primary host serves the VM again:"
echo "  nbd+unix:///sys?socket=$WORK/primary-store/vm1/primary/nbd.sock (replicating to the replica host)"
kill -TERM "$APPLIER" 2>/dev/null || true
wait "$SHIPPER" "$APPLIER" || true
say "demo done"
