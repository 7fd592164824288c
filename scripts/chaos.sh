#!/usr/bin/env bash
# The chaos soak (paystream/tests/chaos.rs): every role as its own process, concurrent HTTP
# clients, a seeded nemesis (SIGKILL with immediate and delayed restart, SIGSTOP past the
# session timeout, broker SIGKILL and restart on durable storage, pg_terminate_backend, and
# here only, a PostgreSQL crash and restart: the server is shared when all tests run), then
# heal and check every invariant. Prints a table per fault class and one JSON line per seed.
#   scripts/chaos.sh --seed N --minutes M     one seed
#   scripts/chaos.sh --seeds 1-10 --minutes 5 several, one after the other
# CI runs seed 1 for 45 s as part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=1
minutes=1
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seeds="$2"; shift 2 ;;
    --seeds) seeds="$2"; shift 2 ;;
    --minutes) minutes="$2"; shift 2 ;;
    *) echo "usage: scripts/chaos.sh [--seed N | --seeds A-B] [--minutes M]" >&2; exit 2 ;;
  esac
done
case "$seeds" in
  *-*) list=$(seq "${seeds%-*}" "${seeds#*-}") ;;
  *) list="$seeds" ;;
esac
seconds=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 }')
failed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for seed in $list; do
  echo "== chaos seed $seed, $seconds s" >&2
  status=0
  CHAOS_SEED="$seed" CHAOS_SECONDS="$seconds" CHAOS_PG_RESTART=1 \
    bash scripts/test.sh --profile chaos -E 'test(nemesis)' --no-capture >"$out" 2>&1 || status=$?
  grep -E '^(\||chaos seed|fault ended|\{"anomalies")|timed out|anomalies:|panicked' "$out" || true
  if [ "$status" != 0 ]; then
    kept="${TMPDIR:-/tmp}/paystream-chaos-seed-$seed.log"
    cp "$out" "$kept"
    echo "== seed $seed FAILED (whole output: $kept; rerun: scripts/chaos.sh --seed $seed --minutes $minutes)" >&2
    failed=1
  fi
done
exit "$failed"
