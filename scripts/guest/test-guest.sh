#!/usr/bin/env bash
# End-to-end guest test against an already running NBD server: builds the test guest if needed
# (scripts/guest/build.sh), boots it three times on the export (mkfs-write: make ext4 and write
# /f and /big; write-more: write /g; check: read them back), then verifies the files on the
# server's backing raw image with debugfs and e2fsck -n.
#
# Usage: test-guest.sh OUTDIR NBD_URI IMAGE_PATH
#   The server must already be serving IMAGE_PATH (raw) as NBD_URI. The image is read at the end,
#   so the server must have flushed it by then (it is idle: the guest synced, unmounted and
#   powered off, which makes QEMU flush the export).
# Env: VMR_BOOT_TIMEOUT  per-boot timeout in seconds (default 120); VMR_DRIVE_OPTS and
#      VMR_QEMU_ARGS are passed on to boot.sh.
set -euo pipefail

if [ $# -ne 3 ]; then
  echo "usage: $0 OUTDIR NBD_URI IMAGE_PATH" >&2
  exit 2
fi
outdir=$1 uri=$2 image=$3
here=$(dirname "$(readlink -f "$0")")
tmo=${VMR_BOOT_TIMEOUT:-120}

die() { echo "test-guest.sh: FAIL: $*" >&2; exit 1; }
for tool in debugfs e2fsck sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool (run scripts/install-deps.sh)"
done

"$here/build.sh" "$outdir" || die "building the guest failed"

for mode in mkfs-write write-more check; do
  "$here/boot.sh" "$outdir" "$uri" "$mode" "$tmo" || die "guest boot '$mode' failed (console: $outdir/console-$mode.log)"
done

# Same bytes as big() in the guest's /init (scripts/guest/init).
big() {
  local pad i
  pad=$(head -c 4087 /dev/zero | tr '\0' x)
  for ((i = 0; i < 1024; i++)); do printf '%08d%s\n' "$i" "$pad"; done
}
want_big=$(big | sha256sum | cut -d' ' -f1)

# What the guest read back in the check boot.
console=$(tr -d '\r' <"$outdir/console-check.log")
grep -qx 'hello from the guest' <<<"$console" || die "check boot did not print /f ('hello from the guest'); see $outdir/console-check.log"
grep -qx 'second boot' <<<"$console" || die "check boot did not print /g ('second boot'); see $outdir/console-check.log"
grep -qx "VMR-BIG-SHA256 $want_big" <<<"$console" || die "check boot read a wrong /big (want sha256 $want_big); see $outdir/console-check.log"

# What is on the server's image.
[ -f "$image" ] || die "image $image does not exist"
file_is() { # exact bytes, trailing newline included
  local path=$1 want=$2 got
  got=$(debugfs -R "cat $path" "$image" 2>/dev/null; echo .) || die "debugfs cannot read $path from $image"
  got=${got%.}
  [ "$got" = "$want" ] || die "$path on $image is $(printf %q "$got"), want $(printf %q "$want")"
}
file_is /f $'hello from the guest\n'
file_is /g $'second boot\n'
got_big=$(debugfs -R 'cat /big' "$image" 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$got_big" = "$want_big" ] || die "/big on $image has sha256 $got_big, want $want_big"
fsck_out=$(e2fsck -fn "$image" 2>&1) || die "e2fsck -fn $image reports problems:
$fsck_out"

echo "test-guest.sh: OK (guest mkfs-write, write-more, check; image $image verified)" >&2
