# Shared settings of the project scripts. Sourced, not run.
# Everything installed or built lives in one cache outside the clone, reused across runs.
PAYSTREAM_CACHE="${PAYSTREAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/paystream}"
export PAYSTREAM_CACHE
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PAYSTREAM_CACHE/target}"
PAYSTREAM_RUN="$PAYSTREAM_CACHE/run"
mkdir -p "$PAYSTREAM_RUN"

TANSU_VERSION=0.6.0
TANSU_ROOT="$PAYSTREAM_CACHE/tansu-$TANSU_VERSION"
export PAYSTREAM_TANSU_BIN="$TANSU_ROOT/bin/tansu"

PG_ROLE=paystream
PG_PASSWORD=paystream
PG_DATABASE=paystream
PG_HOST=127.0.0.1
PG_PORT="${PG_PORT:-5432}"
export PAYSTREAM_ADMIN_DATABASE_URL="postgres://$PG_ROLE:$PG_PASSWORD@$PG_HOST:$PG_PORT/$PG_DATABASE"

BROKER_PORT="${BROKER_PORT:-9092}"
export PAYSTREAM_TEST_BROKERS="127.0.0.1:$BROKER_PORT"

log() { printf '[paystream] %s\n' "$*" >&2; }

# wait_for SECONDS DESCRIPTION COMMAND...: retries COMMAND until it succeeds or time runs out.
wait_for() {
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "timed out after ${seconds}s waiting for $what"
      return 1
    fi
    sleep 0.2
  done
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Runs a command as root: directly when we are root, through sudo otherwise.
sudo_if_needed() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
