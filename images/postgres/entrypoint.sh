#!/usr/bin/env bash
# First start (an empty $PGDATA): initdb with $POSTGRES_USER/$POSTGRES_PASSWORD, password logins from the
# network only, run /docker-entrypoint-initdb.d/*.sh against a server on a private socket. Then serve.
set -euo pipefail
: "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
export POSTGRES_USER="${POSTGRES_USER:-postgres}" POSTGRES_DB="${POSTGRES_DB:-postgres}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") --auth-local=trust \
         --auth-host=scram-sha-256 --encoding=UTF8 -D "$PGDATA" >/dev/null
  printf "listen_addresses = '*'\n" >> "$PGDATA/postgresql.conf"
  printf "host all all all scram-sha-256\n" >> "$PGDATA/pg_hba.conf"
  pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  for script in /docker-entrypoint-initdb.d/*.sh; do
    echo "running $script"
    bash "$script"
  done
  pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
  echo "database initialised"
fi
exec postgres -D "$PGDATA" "$@"
