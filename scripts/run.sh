#!/usr/bin/env bash
# Runs paystream on this machine: PostgreSQL, the development broker (durable sqlite
# storage), then `paystream up` (migrations, topics, processors, relay). Ctrl-c stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/pg.sh up
scripts/broker.sh up sqlite
exec cargo run --release --bin paystream -- up "$@"
