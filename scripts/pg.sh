#!/usr/bin/env bash
# PostgreSQL for development and tests, from Debian's defaults:
#   scripts/pg.sh up     install if missing, start the cluster, create role and database
#   scripts/pg.sh down   stop the cluster
# Idempotent. Authentication stays Debian's default (peer on the socket, password over
# TCP); the project connects over TCP with a password.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi
}

install() {
  if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    log "installing PostgreSQL (Debian package)"
    sudo_if_needed apt-get update -q
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
  fi
}

cluster() {
  pg_lsclusters -h | awk 'NR == 1 { print $1, $2, $4 }'
}

up() {
  install
  local version name status
  read -r version name status < <(cluster) || true
  if [ -z "${version:-}" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
    name=main
    log "creating cluster $version/$name"
    sudo_if_needed pg_createcluster "$version" "$name"
    status=down
  fi
  if [ "$status" != online ]; then
    log "starting PostgreSQL $version/$name"
    sudo_if_needed pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start
  fi
  wait_for 60 "PostgreSQL on $PG_HOST:$PG_PORT" pg_isready -q -h "$PG_HOST" -p "$PG_PORT"

  if ! as_postgres psql -qAtX -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_ROLE'" | grep -q 1; then
    log "creating role $PG_ROLE"
    as_postgres psql -qX -v ON_ERROR_STOP=1 \
      -c "CREATE ROLE $PG_ROLE LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
  fi
  if ! as_postgres psql -qAtX -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'" | grep -q 1; then
    log "creating database $PG_DATABASE"
    as_postgres createdb -O "$PG_ROLE" "$PG_DATABASE"
  fi
  wait_for 30 "password login as $PG_ROLE" \
    env PGPASSWORD="$PG_PASSWORD" psql -qAtX -h "$PG_HOST" -p "$PG_PORT" -U "$PG_ROLE" -d "$PG_DATABASE" -c "SELECT 1"
  log "PostgreSQL ready: $PAYSTREAM_ADMIN_DATABASE_URL"
}

down() {
  local version name status
  read -r version name status < <(cluster) || return 0
  if [ "$status" = online ]; then
    sudo_if_needed pg_ctlcluster --skip-systemctl-redirect "$version" "$name" stop
  fi
}

# A crash and restart (immediate shutdown: no checkpoint, recovery at start), for the chaos
# soak. Every session is cut; what committed survives.
crash_restart() {
  local version name status
  read -r version name status < <(cluster)
  sudo_if_needed pg_ctlcluster --skip-systemctl-redirect "$version" "$name" stop -m immediate
  sudo_if_needed pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  crash-restart) crash_restart ;;
  *) echo "usage: $0 up|down|crash-restart" >&2; exit 2 ;;
esac
