#!/usr/bin/env bash
# The project's test command: formatting, lints, then every unit and integration test
# (real QEMU, libnbd and guest boots; see README). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --release --bin vmreplica
cargo nextest run --workspace --no-fail-fast "$@"
