#!/usr/bin/env bash
# Runs every fuzz target for a fixed time: `bash fuzz/run.sh [SECONDS_PER_TARGET]`.
# cargo-fuzz needs nightly flags; RUSTC_BOOTSTRAP=1 lets the machine's stable toolchain
# (the only one here) accept them. A crash fails the run and leaves its input in
# fuzz/artifacts/<target>/; fix it, then add the input under fuzz/regressions/<target>/,
# which every later run replays first.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-${REVSYNC_FUZZ_SECONDS:-30}}"
CARGO_FUZZ_VERSION=0.13.2
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
  echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

targets=$(cargo fuzz list --fuzz-dir fuzz)
cargo fuzz build --fuzz-dir fuzz -O
for t in $targets; do
  corpus="fuzz/corpus/$t"
  mkdir -p "$corpus" "fuzz/regressions/$t"
  echo "== fuzz $t for ${SECONDS_PER_TARGET}s"
  log="$(mktemp)"
  rc=0
  cargo fuzz run --fuzz-dir fuzz -O "$t" "$corpus" "fuzz/regressions/$t" -- \
    -max_total_time="$SECONDS_PER_TARGET" >"$log" 2>&1 || rc=$?
  grep -E "^(Done|SUMMARY|==[0-9]+==|thread .* panicked)" "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz target $t found a crash (exit $rc): see fuzz/artifacts/$t" >&2
    exit 1
  fi
  rm -f "$log"
done
echo "fuzz: every target ran ${SECONDS_PER_TARGET}s without a crash"
