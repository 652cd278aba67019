#!/usr/bin/env bash
# Fuzzes the decoder of booking-worker with cargo-fuzz (libFuzzer): the target
# `decode` of tests/fuzz feeds arbitrary bytes to EventKind::decode (both
# kinds) and to baggage::find / baggage::parse, starting from the seeds in
# tests/fuzz/corpus/decode (seed-*). What the fuzzer adds to that directory,
# and any crash it writes to tests/fuzz/artifacts, stays out of git.
#
# Usage: scripts/fuzz.sh [seconds, default 60] [more libFuzzer flags]
#
# cargo-fuzz needs a nightly compiler: `+nightly` when rustup has that
# toolchain, otherwise the stable one with RUSTC_BOOTSTRAP=1. cargo-fuzz itself
# is installed from crates.io when missing. Exit code: libFuzzer's (0 when
# nothing was found).

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
LOG_TAG="fuzz"
# shellcheck source=scripts/lib.sh
. "$SCRIPT_DIR/lib.sh"

DURATION="${1:-60}"
[[ "$DURATION" =~ ^[0-9]+$ && "$DURATION" -gt 0 ]] || die "usage: scripts/fuzz.sh [seconds > 0] [libFuzzer flags]"
shift || true

ensure_cargo
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz from crates.io"
    cargo install cargo-fuzz --locked
fi

toolchain=()
if have rustup && rustup toolchain list | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    log "no nightly toolchain; using the stable one with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
fi

cd "$ROOT_DIR"
log "fuzzing the decoder for ${DURATION}s"
cargo "${toolchain[@]}" fuzz run --fuzz-dir tests/fuzz decode -- \
    -max_total_time="$DURATION" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$@"
