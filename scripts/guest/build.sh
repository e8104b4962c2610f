#!/usr/bin/env bash
# Builds a tiny Linux guest for the integration tests: OUTDIR/bzImage (the Debian cloud
# kernel, fetched with `apt-get download`) and OUTDIR/initramfs.cpio.gz: static busybox; the
# virtio-blk, virtio-console, ACPI button and evdev modules; the host's mke2fs and e2fsck
# with their shared libraries; Debian's qemu-guest-agent binary (fetched with
# `apt-get download`, its shared libraries taken from the host via ldd); and /init
# (scripts/guest/init), which runs the mode chosen by `vmr.mode=` on the kernel command line.
# See init for the modes and the console protocol; boot it with scripts/guest/boot.sh or the
# vm crate's launcher.
#
# Usage: build.sh OUTDIR
# Idempotent: does nothing if both outputs exist and are newer than this script and init.
# Env: VMR_KERNEL_PKG overrides the kernel package (default: what linux-image-cloud-amd64
#      depends on, e.g. linux-image-6.1.0-56-cloud-amd64).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
outdir=$1
self=$(readlink -f "$0")
init_src=$(dirname "$self")/init
mkdir -p "$outdir"
outdir=$(readlink -f "$outdir")

up_to_date() {
  [ -f "$outdir/bzImage" ] && [ -f "$outdir/initramfs.cpio.gz" ] &&
    [ "$outdir/bzImage" -nt "$self" ] && [ "$outdir/initramfs.cpio.gz" -nt "$self" ] &&
    [ "$outdir/initramfs.cpio.gz" -nt "$init_src" ]
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
e2fsck=$(PATH=$PATH:/sbin:/usr/sbin command -v e2fsck || true)
[ -n "$e2fsck" ] || die "e2fsck not found (apt-get install e2fsprogs)"
[ -f "$init_src" ] || die "$init_src missing"

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
deb=("$tmp"/linux-image-*.deb)
dpkg-deb -x "${deb[0]}" "$tmp/pkg"

# The guest agent: Debian's package for this release, unpacked (not installed on the host).
mkdir -p "$tmp/ga"
echo "build.sh: downloading qemu-guest-agent" >&2
(cd "$tmp/ga" && apt-get download -q "${apt_opts[@]}" qemu-guest-agent >&2) ||
  die "cannot download qemu-guest-agent (apt-get update?)"
ga_deb=("$tmp"/ga/qemu-guest-agent_*.deb)
dpkg-deb -x "${ga_deb[0]}" "$tmp/ga/root"
qemu_ga=$tmp/ga/root/usr/sbin/qemu-ga
[ -x "$qemu_ga" ] || die "no usr/sbin/qemu-ga in ${ga_deb[0]}"

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
add_module virtio_console required   # virtio-serial: the guest agent's port
add_module evdev required            # /dev/input/event*, which acpid reads
add_module button required           # the ACPI power button (QMP system_powerdown)
if ! is_builtin ext4; then
  for m in crc16 crc32c_generic libcrc32c mbcache jbd2; do
    add_module "$m" optional
  done
  add_module ext4 required
else
  echo "build.sh: ext4 (and jbd2/mbcache/crc16/crc32c) built in" >&2
fi

# The host's mke2fs (busybox's cannot make ext4) and e2fsck, and Debian's qemu-ga, with
# their shared libraries and loader (from the host: qemu-system-x86 pulls in the ones
# qemu-ga needs).
copy_with_path() { mkdir -p "$root$(dirname "$2")"; cp -L "$1" "$root$2"; }
add_binary() {
  local missing
  missing=$(ldd "$1" | awk '/not found/ {print $1}')
  [ -z "$missing" ] || die "$1 needs libraries this host lacks: $missing (run scripts/install-deps.sh)"
  copy_with_path "$1" "$2"
  ldd "$1" | awk '/=> \// {print $3} /^[ \t]*\// {print $1}' | while read -r lib; do
    copy_with_path "$lib" "$lib"
  done
}
add_binary "$mke2fs" /sbin/mke2fs
add_binary "$e2fsck" /sbin/e2fsck
add_binary "$qemu_ga" /sbin/qemu-ga
# Without the host's mke2fs.conf, mke2fs makes ext4 without a journal.
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"

cp "$init_src" "$root/init"
chmod 755 "$root/init"

# Sanity check on the host: the copied mke2fs must run inside the tree.
if [ "$(id -u)" -eq 0 ]; then
  chroot "$root" /sbin/mke2fs -V >/dev/null 2>&1 || die "mke2fs does not run inside the initramfs tree"
  chroot "$root" /sbin/e2fsck -V >/dev/null 2>&1 || die "e2fsck does not run inside the initramfs tree"
  chroot "$root" /sbin/qemu-ga -V >/dev/null 2>&1 || die "qemu-ga does not run inside the initramfs tree"
fi

# Write next to the outputs, then rename, so readers never see a half-written file.
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6 > "$outdir/.initramfs.cpio.gz.tmp"
cp "$vmlinuz" "$outdir/.bzImage.tmp"
echo "$kver" > "$outdir/kernel-version"
mv -f "$outdir/.bzImage.tmp" "$outdir/bzImage"
mv -f "$outdir/.initramfs.cpio.gz.tmp" "$outdir/initramfs.cpio.gz"
echo "build.sh: built $outdir/bzImage ($kver) and $outdir/initramfs.cpio.gz" >&2
