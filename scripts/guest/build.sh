#!/usr/bin/env bash
# Builds a tiny Linux guest for the NBD integration tests: OUTDIR/bzImage (the Debian cloud
# kernel, fetched with `apt-get download`) and OUTDIR/initramfs.cpio.gz (static busybox, the
# virtio-blk modules, the host's mke2fs with its shared libraries, and an /init that runs the
# script chosen by `vmr.mode=` on the kernel command line: mkfs-write, write-more, check or
# raw-write).
# Boot it with scripts/guest/boot.sh.
#
# Usage: build.sh OUTDIR
# Idempotent: does nothing if both outputs exist and are newer than this script.
# Env: VMR_KERNEL_PKG overrides the kernel package (default: what linux-image-cloud-amd64
#      depends on, e.g. linux-image-6.1.0-56-cloud-amd64).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
outdir=$1
self=$(readlink -f "$0")
mkdir -p "$outdir"
outdir=$(readlink -f "$outdir")

up_to_date() {
  [ -f "$outdir/bzImage" ] && [ -f "$outdir/initramfs.cpio.gz" ] &&
    [ "$outdir/bzImage" -nt "$self" ] && [ "$outdir/initramfs.cpio.gz" -nt "$self" ]
}
if up_to_date; then
  exit 0
fi

# Serialise concurrent builds into the same OUTDIR (e.g. tests running in parallel).
exec 9>"$outdir/.build.lock"
flock 9
if up_to_date; then
  exit 0
fi

die() { echo "build.sh: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb cpio gzip ldd; do
  command -v "$tool" >/dev/null 2>&1 || die "missing tool: $tool (run scripts/install-deps.sh)"
done

busybox=
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ]; then busybox=$b; break; fi
done
[ -n "$busybox" ] || die "busybox not found (apt-get install busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then
  die "$busybox is dynamically linked; install busybox-static"
fi
mke2fs=$(PATH=$PATH:/sbin:/usr/sbin command -v mke2fs || true)
[ -n "$mke2fs" ] || die "mke2fs not found (apt-get install e2fsprogs)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- kernel -----------------------------------------------------------------------------
pkg=${VMR_KERNEL_PKG:-}
if [ -z "$pkg" ]; then
  pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
  [ -n "$pkg" ] || die "cannot resolve the package linux-image-cloud-amd64 depends on (apt-get update?)"
fi
echo "build.sh: downloading $pkg" >&2
apt_opts=()
# As root, apt-get download drops to user _apt, which cannot write into our 0700 temp dir.
[ "$(id -u)" -eq 0 ] && apt_opts+=(-o APT::Sandbox::User=root)
(cd "$tmp" && apt-get download -q "${apt_opts[@]}" "$pkg" >&2)
deb=("$tmp"/*.deb)
dpkg-deb -x "${deb[0]}" "$tmp/pkg"

vmlinuz=$(find "$tmp/pkg/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n1)
[ -n "$vmlinuz" ] || die "no boot/vmlinuz-* in $pkg"
kver=${vmlinuz##*/vmlinuz-}
moddir=
for d in "$tmp/pkg/lib/modules/$kver" "$tmp/pkg/usr/lib/modules/$kver"; do
  if [ -d "$d" ]; then moddir=$d; break; fi
done
[ -n "$moddir" ] || die "no modules directory for $kver in $pkg"

# --- initramfs tree ---------------------------------------------------------------------
root=$tmp/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,modules}
cp "$busybox" "$root/bin/busybox"
: > "$root/modules/order"

is_builtin() { grep -qE "(^|/)$1\.ko\$" "$moddir/modules.builtin" 2>/dev/null; }

# add_module NAME REQUIRED: copies NAME.ko (decompressed) into the initramfs and appends it to
# the load order, unless it is built into the kernel.
add_module() {
  local name=$1 required=$2 alt f
  alt=${name//_/-}
  if is_builtin "$name" || is_builtin "$alt"; then
    echo "build.sh: module $name is built in" >&2
    return 0
  fi
  f=$(find "$moddir/kernel" \( -name "$name.ko" -o -name "$name.ko.*" -o -name "$alt.ko" -o -name "$alt.ko.*" \) | head -n1)
  if [ -z "$f" ]; then
    [ "$required" = required ] && die "module $name is neither built in nor present in $pkg"
    echo "build.sh: module $name not present, skipped" >&2
    return 0
  fi
  # Always decompress on the host: busybox insmod only takes plain ELF modules here.
  case "$f" in
    *.ko) cp "$f" "$root/modules/$name.ko" ;;
    *.ko.xz) xz -dc "$f" > "$root/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$f" > "$root/modules/$name.ko" ;;
    *.ko.gz) gzip -dc "$f" > "$root/modules/$name.ko" ;;
    *) die "unknown module compression: $f" ;;
  esac
  echo "$name" >> "$root/modules/order"
}

# Load order matters: dependencies first.
add_module virtio_ring required
add_module virtio required
add_module virtio_pci_modern_dev optional
add_module virtio_pci_legacy_dev optional
add_module virtio_pci required
add_module virtio_blk required
if ! is_builtin ext4; then
  for m in crc16 crc32c_generic libcrc32c mbcache jbd2; do
    add_module "$m" optional
  done
  add_module ext4 required
else
  echo "build.sh: ext4 (and jbd2/mbcache/crc16/crc32c) built in" >&2
fi

# The host's mke2fs (busybox's cannot make ext4) with its shared libraries and loader.
copy_with_path() { mkdir -p "$root$(dirname "$2")"; cp -L "$1" "$root$2"; }
copy_with_path "$mke2fs" /sbin/mke2fs
ldd "$mke2fs" | awk '/=> \// {print $3} /^[ \t]*\// {print $1}' | while read -r lib; do
  copy_with_path "$lib" "$lib"
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"

cat > "$root/init" <<'INIT'
#!/bin/busybox sh
# vmreplica test guest init: load virtio-blk, run the script named by vmr.mode=, power off.
/bin/busybox --install -s /bin
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

off() { sync; poweroff -f; sleep 10; exit 1; }
fail() { echo "VMR-GUEST-FAIL $*"; off; }
done_() { echo "VMR-GUEST-DONE"; off; }

mode=
for arg in $(cat /proc/cmdline); do
  case "$arg" in vmr.mode=*) mode=${arg#vmr.mode=} ;; esac
done
echo "vmr-guest: mode=$mode kernel=$(uname -r)"

for m in $(cat /modules/order); do
  insmod "/modules/$m.ko" || fail "insmod $m"
done

i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ "$i" -le 300 ] || fail "no /dev/vda after 30s"
  usleep 100000
done

# /big: 4 MiB = 1024 records of 4096 bytes, record i = printf '%08d' i, 4087 'x', '\n'. Every
# 4 KiB block differs, so misplaced or lost blocks are detected; test-guest.sh generates the
# same bytes on the host. (A shell loop: awk printing 16-byte records took 7 s under TCG.)
big() {
  pad=$(head -c 4087 /dev/zero | tr '\0' x)
  i=0
  while [ "$i" -lt 1024 ]; do printf '%08d%s\n' "$i" "$pad"; i=$((i + 1)); done
}

case "$mode" in
  mkfs-write)
    # UUIDs come from the kernel: without them libuuid falls back to time-based UUIDs here,
    # which stalls mke2fs for ~4 s (no uuidd, no /var/lib/libuuid).
    uuid=$(cat /proc/sys/kernel/random/uuid) && seed=$(cat /proc/sys/kernel/random/uuid) || fail "uuid"
    /sbin/mke2fs -q -t ext4 -F -U "$uuid" -E "hash_seed=$seed" /dev/vda || fail "mke2fs"
    mount -t ext4 /dev/vda /mnt || fail "mount"
    printf 'hello from the guest\n' > /mnt/f || fail "write /f"
    big > /mnt/big || fail "write /big"
    sync || fail "sync"
    umount /mnt || fail "umount"
    ;;
  write-more)
    mount -t ext4 /dev/vda /mnt || fail "mount"
    [ "$(cat /mnt/f)" = "hello from the guest" ] || fail "/f missing or wrong before write-more"
    printf 'second boot\n' > /mnt/g || fail "write /g"
    sync || fail "sync"
    umount /mnt || fail "umount"
    ;;
  raw-write)
    # Exactly two writes, for tests that check which blocks the tracker marks dirty:
    # 256 KiB at 1 MiB and 4 KiB at 100 MiB + 4 KiB.
    dd if=/dev/urandom of=/dev/vda bs=4096 count=64 seek=256 conv=fsync 2>/dev/null || fail "dd 1"
    dd if=/dev/urandom of=/dev/vda bs=4096 count=1 seek=25601 conv=fsync 2>/dev/null || fail "dd 2"
    sync
    ;;
  check)
    mount -t ext4 -o ro /dev/vda /mnt || fail "mount"
    cat /mnt/f /mnt/g || fail "cat /f /g"
    echo "VMR-BIG-SHA256 $(sha256sum < /mnt/big | cut -d' ' -f1)"
    umount /mnt || fail "umount"
    ;;
  *)
    fail "unknown vmr.mode '$mode'"
    ;;
esac
done_
INIT
chmod 755 "$root/init"

# Sanity check on the host: the copied mke2fs must run inside the tree.
if [ "$(id -u)" -eq 0 ]; then
  chroot "$root" /sbin/mke2fs -V >/dev/null 2>&1 || die "mke2fs does not run inside the initramfs tree"
fi

# Write next to the outputs, then rename, so readers never see a half-written file.
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6 > "$outdir/.initramfs.cpio.gz.tmp"
cp "$vmlinuz" "$outdir/.bzImage.tmp"
echo "$kver" > "$outdir/kernel-version"
mv -f "$outdir/.bzImage.tmp" "$outdir/bzImage"
mv -f "$outdir/.initramfs.cpio.gz.tmp" "$outdir/initramfs.cpio.gz"
echo "build.sh: built $outdir/bzImage ($kver) and $outdir/initramfs.cpio.gz" >&2
