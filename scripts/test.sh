#!/usr/bin/env bash
# Sets up a bare machine, builds everything and runs all of hull's tests.
# Tests that need a microVM run natively where the host can, else in the lab.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

scripts/setup.sh
scripts/build.sh
. target/hull-artifacts.env

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
