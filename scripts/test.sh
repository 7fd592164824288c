#!/usr/bin/env bash
# Runs the whole test suite against a real PostgreSQL and a real broker, starting both if
# needed. Extra arguments go to `cargo nextest run` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/pg.sh up
# The `up` test pastes the curl session that `paystream up` prints into bash.
if ! command -v curl >/dev/null 2>&1; then
  log "installing curl (Debian package)"
  sudo_if_needed apt-get update -q
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl
fi
scripts/broker.sh up memory
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi
# Each test creates its own database ps_test_*; drop those left by earlier runs.
export PGPASSWORD="$PG_PASSWORD"
psql_args=(-qAtX -h "$PG_HOST" -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DATABASE")
psql "${psql_args[@]}" -c "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE);', datname)
  FROM pg_database WHERE datname LIKE 'ps\_test\_%'" | psql "${psql_args[@]}" >/dev/null

cargo nextest run --workspace --no-fail-fast "$@"
