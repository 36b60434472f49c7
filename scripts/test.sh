#!/usr/bin/env bash
# Sets up a bare machine, builds everything and runs all of hull's tests.
# Tests that need a microVM run natively where the host can, else in the lab.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

scripts/setup.sh
# A fresh clone builds in a cargo target directory kept outside it (cargo's
# fingerprints decide what to rebuild: dependencies stay built, this clone's
# crates are rebuilt), so CI does not start from a cold build every time.
# HULL_TARGET_CACHE= (empty) builds in ./target instead.
cache="${HULL_TARGET_CACHE-/var/cache/hull/cargo-target}"
if [[ -n "$cache" && ! -e target ]]; then
    mkdir -p "$cache"
    ln -s "$cache" target
    echo "test: cargo target directory: $cache (shared between clones)" >&2
fi
# The fuzz targets' build likewise.
if [[ -n "$cache" && ! -e fuzz/target ]]; then
    mkdir -p "$cache-fuzz"
    ln -s "$cache-fuzz" fuzz/target
fi
scripts/build.sh
. target/hull-artifacts.env

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# Every fuzz target briefly (fuzz/README.md): a crash fails the run. Dev
# profile: for 5-second runs the build is the cost.
HULL_FUZZ_DEV=1 fuzz/run.sh 5
