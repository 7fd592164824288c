#!/usr/bin/env bash
# The Kafka-compatible broker for development and tests: tansu, pinned, built once from
# crates.io into the cache (not the clone).
#   scripts/broker.sh install            build tansu if it is not cached yet (~7 min once)
#   scripts/broker.sh up [memory|sqlite] start it on 127.0.0.1:$BROKER_PORT and wait for it
#   scripts/broker.sh down               stop it
# `memory` storage (the default) is for tests; `sqlite` keeps data across restarts
# ($PAYSTREAM_CACHE/broker.db). Idempotent: `up` on a running broker does nothing, except
# that `up sqlite` refuses a running memory broker: the system's stored offsets would outlive
# its topics, and its consumers would wait for offsets that never come.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

PIDFILE="$PAYSTREAM_RUN/tansu-$BROKER_PORT.pid"
LOGFILE="$PAYSTREAM_RUN/tansu-$BROKER_PORT.log"
STORAGEFILE="$PAYSTREAM_RUN/tansu-$BROKER_PORT.storage"

install() {
  if [ -x "$PAYSTREAM_TANSU_BIN" ]; then
    return 0
  fi
  log "building tansu $TANSU_VERSION into $TANSU_ROOT (one time, several minutes)"
  # The broker gets its own target dir so it never invalidates the project's build cache.
  CARGO_TARGET_DIR="$PAYSTREAM_CACHE/tansu-build" \
    cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore,libsql \
      --root "$TANSU_ROOT"
  rm -rf "$PAYSTREAM_CACHE/tansu-build"
}

up() {
  local storage=${1:-memory}
  install
  if port_open 127.0.0.1 "$BROKER_PORT"; then
    local running
    running=$(cat "$STORAGEFILE" 2>/dev/null || echo "unknown")
    # Tests make their own topics, so any broker serves them; data meant to last does not
    # belong in one that forgets it.
    if [ "$storage" = sqlite ] && [ "$running" != sqlite ]; then
      log "a broker with $running storage already listens on 127.0.0.1:$BROKER_PORT;" \
        "stop it (scripts/broker.sh down) so that one with durable storage can start"
      exit 1
    fi
    log "a broker ($running storage) already listens on 127.0.0.1:$BROKER_PORT"
    return 0
  fi
  local engine
  case "$storage" in
    memory) engine="memory://tansu/" ;;
    # tansu resolves the path against its working directory (see the `cd` below).
    sqlite) engine="sqlite://broker.db" ;;
    *) echo "storage must be memory or sqlite" >&2; exit 2 ;;
  esac
  log "starting tansu ($storage storage) on 127.0.0.1:$BROKER_PORT"
  cd "$PAYSTREAM_CACHE"
  nohup "$PAYSTREAM_TANSU_BIN" broker \
    --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" \
    --storage-engine "$engine" >"$LOGFILE" 2>&1 &
  echo $! >"$PIDFILE"
  echo "$storage" >"$STORAGEFILE"
  if ! wait_for 60 "tansu on 127.0.0.1:$BROKER_PORT" port_open 127.0.0.1 "$BROKER_PORT"; then
    tail -n 20 "$LOGFILE" >&2 || true
    exit 1
  fi
  log "broker ready: 127.0.0.1:$BROKER_PORT (log: $LOGFILE)"
}

down() {
  if [ -f "$PIDFILE" ]; then
    local pid
    pid=$(cat "$PIDFILE")
    if kill "$pid" 2>/dev/null; then
      wait_for 20 "tansu to stop" bash -c "! kill -0 $pid"
    fi
    rm -f "$PIDFILE"
  fi
  rm -f "$STORAGEFILE"
}

case "${1:-up}" in
  install) install ;;
  up) up "${2:-memory}" ;;
  down) down ;;
  *) echo "usage: $0 install|up [memory|sqlite]|down" >&2; exit 2 ;;
esac
