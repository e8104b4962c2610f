#!/usr/bin/env bash
# Fuzzes the NBD protocol codecs (nbd/src: handshake, request, reply), the tracker's binary state
# files (bitmap header, activity log) and the replication wire format (common/src/wire.rs)
# with cargo-fuzz/libFuzzer for a bounded time; this is the fuzzing entry point the README
# points to.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]        (default 60)
#
# Targets (fuzz/fuzz_targets): handshake, request, reply_roundtrip, wire, state, undo (the
# applier's undo logs), vm_definition (VM definition files), vm_protocol (QMP and guest-agent replies),
# zero_log (a test failover's zero record). Each runs
# for the given time starting from the committed seeds in fuzz/seeds/<target> (regenerate
# them with fuzz/gen_seeds.py) plus the corpus kept in fuzz/corpus/<target> (git-ignored),
# with -rss_limit_mb=2048. Every target runs even if an earlier one crashed; the script exits
# non-zero if any target crashed (or failed to build) and prints the artifacts to replay.
#
# Works on a stable toolchain: cargo-fuzz needs nightly-only flags (-Zsanitizer=address,
# sancov passes), which RUSTC_BOOTSTRAP=1 unlocks on stable. Installs cargo-fuzz if missing.
#
# Environment:
#   FUZZ_TARGETS    targets to run (default: all nine)
#   FUZZ_SANITIZER  address (default) or none
#   FUZZ_ARGS       extra libFuzzer flags, e.g. "-max_len=16384" or "-jobs=2"
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
case "$secs" in
'' | *[!0-9]*)
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
    ;;
esac
targets="${FUZZ_TARGETS:-handshake request reply_roundtrip wire state undo vm_definition vm_protocol zero_log}"
sanitizer="${FUZZ_SANITIZER:-address}"
read -r -a extra <<<"${FUZZ_ARGS:-}"

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "==> building fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build --fuzz-dir fuzz --sanitizer "$sanitizer"

logs=fuzz/target/fuzz-logs
mkdir -p "$logs"
failed=()
summary=()
for t in $targets; do
    corpus="fuzz/corpus/$t"
    artifacts="fuzz/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    dirs=("$corpus")
    if [ -d "fuzz/seeds/$t" ]; then
        dirs+=("fuzz/seeds/$t")
    fi
    marker="$logs/$t.start"
    touch "$marker"
    log="$logs/$t.log"
    echo "==> fuzzing $t for ${secs}s (log: $log)"
    set +e
    cargo fuzz run --fuzz-dir fuzz --sanitizer "$sanitizer" "$t" "${dirs[@]}" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
        "${extra[@]}" 2>&1 | tee "$log" | grep -E --line-buffered \
        '^#[0-9]+[[:space:]]+(INITED|pulse|DONE)|panicked at|^(SUMMARY|==[0-9]+== ERROR)|Failing input|Output of'
    rc=${PIPESTATUS[0]}
    set -e
    stats=$(grep -E '^#[0-9]+[[:space:]]+(DONE|INITED|pulse|NEW|REDUCE)' "$log" | tail -n1 |
        grep -oE '(cov|ft|corp|exec/s): [0-9/]+[A-Za-z]*' | tr '\n' ' ' || true)
    if [ "$rc" -ne 0 ]; then
        failed+=("$t")
        summary+=("$t: FAILED (exit $rc) $stats")
        echo "!!! $t failed (exit $rc); panic message:"
        grep -A2 'panicked at' "$log" | head -n 6 || true
        found=$(find "$artifacts" -type f -newer "$marker" | sort)
        if [ -n "$found" ]; then
            for a in $found; do
                echo "!!! artifact: $a"
                echo "    replay:   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $t $a"
                echo "    minimise: RUSTC_BOOTSTRAP=1 cargo fuzz tmin --fuzz-dir fuzz $t $a"
            done
        else
            echo "!!! no artifact written (build failure?); see $log"
        fi
    else
        summary+=("$t: ok $stats")
    fi
done

echo "==> summary"
printf '    %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "==> crashes in: ${failed[*]}" >&2
    exit 1
fi
