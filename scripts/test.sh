#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL and a real broker, starting both if
# needed. Extra arguments go to `cargo nextest run` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/pg.sh up
# The `up` test pastes the curl session that `paystream up` prints into bash (curl); the
# deployment test checks the alert rules with promtool (Debian's prometheus package).
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]} (Debian packages)"
  sudo_if_needed apt-get update -q
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# A broker this run starts is stopped when it ends, so that `scripts/run.sh` (which wants
# durable storage and refuses a memory broker) works right after the tests.
if ! port_open 127.0.0.1 "$BROKER_PORT"; then
  trap 'scripts/broker.sh down' EXIT
fi
scripts/broker.sh up memory
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
# Each test creates its own database ps_test_*. A passing run drops them (autovacuum would
# otherwise keep visiting a hundred idle databases); a failing run keeps them to look at, and
# the next run drops them first.
export PGPASSWORD="$PG_PASSWORD"
psql_args=(-qAtX -h "$PG_HOST" -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DATABASE")
drop_test_databases() {
  psql "${psql_args[@]}" -c "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE);', datname)
    FROM pg_database WHERE datname LIKE 'ps\_test\_%'" | psql "${psql_args[@]}" >/dev/null
}
drop_test_databases

status=0
cargo nextest run --workspace --no-fail-fast "$@" || status=$?
if [ "$status" -eq 0 ]; then
  drop_test_databases
else
  log "tests failed; their databases (ps_test_*) are kept until the next run"
fi
exit "$status"
