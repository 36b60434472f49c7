#!/usr/bin/env bash
# Builds hull's fuzz targets and runs each for SECONDS (default 20) over its
# corpus: fuzz/corpus/<target> (grown by earlier runs, not committed) plus
# the committed seeds in fuzz/seeds/<target>. Exits non-zero when a target
# crashes (panic, failed check, hang over 60 s, out of memory); the input
# is then in fuzz/artifacts/<target>/ and the end of the target's log is
# printed. Full logs: fuzz/target/fuzz-logs/<target>.log.
#
#   fuzz/run.sh [SECONDS]
#
# Runs on stable Rust: libFuzzer's coverage instrumentation needs no
# unstable flag, and the targets are built without a sanitizer (-s none;
# hull has little unsafe code of its own). HULL_FUZZ_SANITIZER=address
# builds with ASan instead (needs a nightly toolchain: cargo +nightly).
# HULL_FUZZ_TARGETS="vsock fs_relay" runs only those. HULL_FUZZ_DEV=1
# builds with the dev profile: a cold build takes half as long (CI's brief
# runs), the targets run slower. cargo-fuzz is
# installed (cargo install) if missing.
set -euo pipefail
secs="${1:-20}"
cd "$(dirname "${BASH_SOURCE[0]}")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
san="${HULL_FUZZ_SANITIZER:-none}"
toolchain=()
if [ "$san" != none ]; then
    toolchain=(+nightly)
fi
targets="${HULL_FUZZ_TARGETS:-$(cargo fuzz list)}"
profile=()
if [ -n "${HULL_FUZZ_DEV:-}" ]; then
    profile=(--dev)
fi

# -a: debug assertions and overflow checks on, as in tests.
nice -n 10 cargo "${toolchain[@]}" fuzz build "${profile[@]}" -s "$san" -a

logs=target/fuzz-logs
mkdir -p "$logs"
failed=()
for t in $targets; do
    mkdir -p "corpus/$t"
    seeds=()
    if [ -d "seeds/$t" ]; then
        seeds=("seeds/$t")
    fi
    log="$logs/$t.log"
    start=$(date +%s)
    if nice -n 15 cargo "${toolchain[@]}" fuzz run "${profile[@]}" -s "$san" -a "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -timeout=60 -print_final_stats=1 >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        echo "fuzz: $t: ${runs:-?} runs in $(($(date +%s) - start)) s, no crash" >&2
    else
        failed+=("$t")
        echo "fuzz: $t FAILED after $(($(date +%s) - start)) s; end of $log:" >&2
        tail -n 60 "$log" >&2
    fi
done
# A target removes its scratch directory when it ends; a crashed one leaves
# it behind (named after its pid).
for d in /tmp/hull-fuzz-vsock-* /dev/shm/hull-fuzz-agent-* /tmp/hull-fuzz-agent-*; do
    if [ -d "$d" ] && ! kill -0 "${d##*-}" 2>/dev/null; then
        rm -rf "$d"
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/; reproduce with cargo fuzz run -s $san -a TARGET FILE)" >&2
    exit 1
fi
