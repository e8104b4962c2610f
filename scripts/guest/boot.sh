#!/usr/bin/env bash
# Boots the test guest built by scripts/guest/build.sh under qemu-system-x86_64 (TCG) with its
# only disk, /dev/vda, on an NBD export, runs guest mode MODE and waits, in the foreground, for
# the guest to power off. The serial console is saved to OUTDIR/console-MODE.log.
#
# Usage: boot.sh OUTDIR NBD_URI MODE [TIMEOUT_SECONDS]   (timeout default 120)
#   NBD_URI e.g. 'nbd+unix:///disk0?socket=/tmp/x.sock' or nbd://127.0.0.1:10809/disk0
# Exit 0 only if the guest printed VMR-GUEST-DONE, did not print VMR-GUEST-FAIL, and QEMU exited
# cleanly (guest powered off) before the timeout.
#
# Modes (scripts/guest/init has the details and the console protocol):
#   mkfs-write   make ext4, write /f and /big            write-more  write /g
#   check        print /f, /g and /big's sha256          raw-write   two raw writes, no filesystem
#   writer       make ext4 if the disk has none, then write files in /vmr, printing
#                "VMR-FILE <seq> <name> <sha256>" after each file's and directory's fsync,
#                until the ACPI power button (QMP system_powerdown) or vmr.max_files
#   check-files  mount (the journal is replayed), print "VMR-JOURNAL clean|needs-recovery",
#                "VMR-HAVE <name> <sha256>" per file, "VMR-FSCK <rc>" of e2fsck -fn
#
# Parameters reach the guest on the kernel command line (VMR_GUEST_ARGS, e.g.
# 'vmr.max_files=50 vmr.max_kib=32 vmr.pause_ms=100'); they are short by design. Anything
# list-like goes the other way: the guest prints it and the host compares (the writer's
# VMR-FILE lines against the checker's VMR-HAVE lines), so no second disk or fw_cfg is needed.
#
# Env: VMR_DRIVE_OPTS   extra -drive options, e.g. 'discard=unmap' (comma-separated, no leading comma)
#      VMR_QEMU_ARGS    extra qemu arguments (word-split)
#      VMR_GUEST_ARGS   extra kernel command-line parameters (vmr.max_files=N, ...)
#      VMR_QMP_SOCKET   also serve QMP on this unix socket (e.g. to press the power button)
#      VMR_QGA_SOCKET   give the guest a virtio-serial port org.qemu.guest_agent.0 (qemu-ga
#                       runs in the guest) with its host side on this unix socket
# This script runs one boot in the foreground. A guest that keeps running in the background
# (a writer while the test freezes it through qemu-ga, kills it, or fails it over) is
# started with the vm crate's launcher instead (vmreplica_vm::Instance: detached, QMP,
# pidfile, stop by power button); tests/vm_guest.rs shows the definition it uses.
set -euo pipefail

if [ $# -lt 3 ] || [ $# -gt 4 ]; then
  echo "usage: $0 OUTDIR NBD_URI MODE [TIMEOUT_SECONDS]" >&2
  exit 2
fi
outdir=$1 uri=$2 mode=$3 tmo=${4:-120}
case "$mode" in
  mkfs-write|write-more|check|raw-write|writer|check-files) ;;
  *) echo "boot.sh: unknown mode '$mode' (mkfs-write, write-more, check, raw-write, writer, check-files)" >&2; exit 2 ;;
esac
for f in bzImage initramfs.cpio.gz; do
  [ -f "$outdir/$f" ] || { echo "boot.sh: $outdir/$f missing; run scripts/guest/build.sh $outdir" >&2; exit 1; }
done
case "$uri" in
  *,*) echo "boot.sh: NBD_URI must not contain ',' (qemu -drive option syntax)" >&2; exit 2 ;;
esac

log=$outdir/console-$mode.log
drive="file=$uri,format=raw,if=virtio,cache=none"
[ -n "${VMR_DRIVE_OPTS:-}" ] && drive="$drive,$VMR_DRIVE_OPTS"
# shellcheck disable=SC2206
extra=(${VMR_QEMU_ARGS:-})
for v in VMR_QMP_SOCKET VMR_QGA_SOCKET; do
  case "${!v:-}" in
    *,*) echo "boot.sh: $v must not contain ',' (qemu option syntax)" >&2; exit 2 ;;
  esac
done
if [ -n "${VMR_QMP_SOCKET:-}" ]; then
  extra+=(-qmp "unix:$VMR_QMP_SOCKET,server=on,wait=off")
fi
if [ -n "${VMR_QGA_SOCKET:-}" ]; then
  extra+=(-chardev "socket,id=qga0,path=$VMR_QGA_SOCKET,server=on,wait=off"
    -device virtio-serial -device "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0")
fi

start=$(date +%s.%N)
# timeout runs in the background so that a signal to this script can stop it (and so QEMU)
# instead of leaving QEMU running.
timeout -k 10 "$tmo" qemu-system-x86_64 \
  -accel tcg -m 512 -nographic -no-reboot -nic none \
  -kernel "$outdir/bzImage" -initrd "$outdir/initramfs.cpio.gz" \
  -append "console=ttyS0 panic=-1 vmr.mode=$mode ${VMR_GUEST_ARGS:-} quiet" \
  -drive "$drive" \
  "${extra[@]}" </dev/null >"$log" 2>&1 &
qpid=$!
trap 'kill -TERM "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM HUP
rc=0
wait "$qpid" || rc=$?
trap - EXIT
end=$(date +%s.%N)
secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')

clean=$(tr -d '\r' <"$log")
fail_line=$(grep -a '^VMR-GUEST-FAIL' <<<"$clean" || true)
why=
if [ -n "$fail_line" ]; then
  why="guest reported: $fail_line"
elif ! grep -aq '^VMR-GUEST-DONE' <<<"$clean"; then
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    why="timed out after ${tmo}s without VMR-GUEST-DONE"
  else
    why="no VMR-GUEST-DONE (qemu exit status $rc)"
  fi
elif [ "$rc" -ne 0 ]; then
  why="guest printed VMR-GUEST-DONE but qemu exited with status $rc (124 = did not power off in ${tmo}s)"
fi

if [ -n "$why" ]; then
  echo "boot.sh: mode $mode FAILED after ${secs}s: $why" >&2
  echo "boot.sh: last console lines ($log):" >&2
  tail -n 30 <<<"$clean" | sed 's/^/  | /' >&2
  exit 1
fi
echo "boot.sh: mode $mode ok in ${secs}s (console: $log)" >&2
