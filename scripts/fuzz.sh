#!/usr/bin/env bash
# Longer campaigns of the decoders' property tests (the envelope and each event against its
# JSON Schema, HTTP order bodies against the OpenAPI schema, hostile bytes): CI runs 2,000
# cases per test with a fixed seed; this runs ROUNDS rounds of CASES cases, each with a new
# random seed, and prints the seed of any failure so it can be replayed:
#   PAYSTREAM_FUZZ_SEED=<seed> PAYSTREAM_FUZZ_CASES=<cases> cargo nextest run -p paystream-processors
# Usage: scripts/fuzz.sh [ROUNDS] [CASES]   (default 20 rounds of 100,000 cases)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

rounds="${1:-20}"
cases="${2:-100000}"
filter='test(/conformance|every_order_body|hostile_bodies/)'
cargo nextest run -p paystream-processors --no-run --cargo-quiet
for round in $(seq 1 "$rounds"); do
  seed=$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')
  log "round $round/$rounds: seed $seed, $cases cases per test"
  if ! PAYSTREAM_FUZZ_SEED="$seed" PAYSTREAM_FUZZ_CASES="$cases" \
    cargo nextest run -p paystream-processors -E "$filter" --no-fail-fast >/dev/null 2>&1; then
    log "FAILED with PAYSTREAM_FUZZ_SEED=$seed PAYSTREAM_FUZZ_CASES=$cases; replay it to see the case"
    exit 1
  fi
done
log "$rounds rounds passed"
