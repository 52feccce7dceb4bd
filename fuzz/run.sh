#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60) and prints, per
# target, libFuzzer's executions and coverage (its final `cov:`/`ft:` line
# and `stat::number_of_executed_units`). Needs cargo-fuzz
# (`cargo install cargo-fuzz --locked`); works on stable with `-s none`.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Environment: FUZZ_TARGET_DIR (default $CARGO_TARGET_DIR/fuzz, else
# fuzz/target), FUZZ_BUILD (extra `cargo fuzz` build flags, e.g. `--dev`),
# FUZZ_LOGS (where the full logs go, default fuzz/artifacts/logs,
# ignored by git like the corpus). New inputs are
# kept in fuzz/corpus/<target>; fuzz/seeds/<target> is read, never written.
# A property violated stops its target with a crash file in
# fuzz/artifacts/<target>/ and this script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(spiffe_id_roundtrip issuance token_check rotation sds_streams)
fi
target_dir="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}}"
target_dir="${target_dir:-target}"
logs="${FUZZ_LOGS:-artifacts/logs}"
mkdir -p "$logs"
# The fuzz workspace resolves the main crate's dependencies at the versions
# its lock file has (libfuzzer-sys is added to that).
[ -f Cargo.lock ] || cp ../Cargo.lock Cargo.lock

# RSA keys for issuance and token_check, made once with openssl: the
# targets' own generator is slow enough under instrumentation for libFuzzer
# to call the first input a hang (fuzz/props/keys.rs).
keys="$PWD/artifacts/keys"
mkdir -p "$keys"
for bits in 2048 3072 4096; do
  [ -s "$keys/rsa$bits.pem" ] ||
    openssl genpkey -algorithm RSA -pkeyopt "rsa_keygen_bits:$bits" -out "$keys/rsa$bits.pem" 2>/dev/null ||
    rm -f "$keys/rsa$bits.pem"
done
export FUZZ_RSA_KEYS="$keys"

# shellcheck disable=SC2086
cargo fuzz build -s none --target-dir "$target_dir" ${FUZZ_BUILD:-}

failed=0
printf '%-22s %12s %8s %8s %s\n' target executions cov ft result
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t")
  log="$logs/$t.log"
  result=ok
  # shellcheck disable=SC2086
  if ! cargo fuzz run -s none --target-dir "$target_dir" ${FUZZ_BUILD:-} "$t" "corpus/$t" "${seeds[@]}" -- \
      -max_total_time="$secs" -timeout=20 -print_final_stats=1 >"$log" 2>&1; then
    result="FAILED (see $log and artifacts/$t/)"
    failed=1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  last=$(grep -E '^#[0-9]+.*cov: [0-9]+' "$log" | tail -1 || true)
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.*ft: \([0-9]*\).*/\1/p' <<<"$last")
  printf '%-22s %12s %8s %8s %s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$result"
  [ "$result" = ok ] || tail -30 "$log" >&2
done
exit "$failed"
