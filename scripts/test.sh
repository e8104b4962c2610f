#!/usr/bin/env bash
# The project's test command: formatting, lints, then every unit and integration test
# (real QEMU, libnbd and guest boots; see README), then the unsafe code's unit tests under
# Miri. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The production paths are proven on every run: a test that would fall back from io_uring to
# the thread pool, or from O_DIRECT to the page cache, fails instead.
export VMREPLICA_REQUIRE_URING=1 VMREPLICA_REQUIRE_DIRECT=1
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The docs, private items included (the modules' docs are how the code explains itself):
# a broken or ambiguous link fails the run.
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --document-private-items
cargo build --release --bin vmreplica
cargo nextest run --workspace --no-fail-fast "$@"
# The bitmap's word access and the engine's blocking I/O loops under Miri (the tests Miri can
# run: mapping files and io_uring are out of its reach and skipped there).
export MIRIFLAGS="-Zmiri-disable-isolation"
CARGO_TARGET_DIR=target/miri cargo +nightly miri test -p vmreplica-tracker --lib bitmap::
CARGO_TARGET_DIR=target/miri cargo +nightly miri test -p vmreplica-common --lib engine::
