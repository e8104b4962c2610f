#!/usr/bin/env bash
# Installs everything vmreplica's tests, demo and benchmarks need on a fresh Debian bookworm machine.
# Idempotent: re-running it only installs what is missing.
#
# QEMU comes from bookworm-backports: bookworm's own qemu-system-x86 would downgrade the
# qemu-utils 10 that these machines ship. The backports suite is added with the same mirror as
# the existing Debian entry, so no host name is hard-coded here.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need_apt+=(qemu-system-x86)
have qemu-io || need_apt+=(qemu-utils)
have nbdinfo || need_apt+=(libnbd-bin)
have fio || need_apt+=(fio)
have nbdkit || need_apt+=(nbdkit)
have rsync || need_apt+=(rsync)
have debugfs || need_apt+=(e2fsprogs)
have cpio || need_apt+=(cpio)
have ip || need_apt+=(iproute2)
have python3 || need_apt+=(python3)
have systemd-analyze || need_apt+=(systemd)
have virt-xml-validate || need_apt+=(libvirt-clients)
have xmllint || need_apt+=(libxml2-utils)
have gnuplot || need_apt+=(gnuplot-nox)   # benches/rpo.sh plots
have promtool || need_apt+=(prometheus)   # metrics: promtool check metrics, a real scrape
[ -x /bin/busybox ] || [ -x /usr/bin/busybox ] || need_apt+=(busybox-static)

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ -f /etc/apt/sources.list.d/debian.sources ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
    cat > /etc/apt/sources.list.d/backports.sources <<SRC
Types: deb
URIs: ${mirror}
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # qemu-system-x86 must come from backports to match qemu-utils 10; the rest from bookworm.
  backports=()
  rest=()
  for p in "${need_apt[@]}"; do
    case "$p" in qemu-system-x86|qemu-utils) backports+=("$p");; *) rest+=("$p");; esac
  done
  if [ ${#backports[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends -t bookworm-backports "${backports[@]}" qemu-system-data
  fi
  if [ ${#rest[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${rest[@]}"
  fi
fi

if ! have cargo-nextest && ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

# Miri (scripts/test.sh runs the unsafe code's unit tests under it) needs a nightly toolchain.
if ! cargo +nightly miri --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal --component miri,rust-src
fi
echo "install-deps: all dependencies present"
