#!/usr/bin/env bash
# A single-node Ceph cluster serving S3 on :9000: one monitor, one OSD (memstore: objects are kept in
# the OSD's memory), and radosgw with the beast frontend. Runs as the `ceph` user; nothing here needs root.
#
# First start (no monitor store under /var/lib/ceph): make an fsid, cephx keys for the monitor,
# client.admin, osd.0 and the gateway (all random, made here, never in the image), a monmap with one
# monitor on 127.0.0.1, the monitor's store and the OSD's store. Every start: write ceph.conf, start
# the monitor, the OSD and the gateway, make sure the S3 user ($S3_ACCESS_KEY / $S3_SECRET_KEY) and
# the buckets ($S3_BUCKETS, space-separated) exist, then print "s3-ceph: ready" and supervise: if any
# daemon exits, the others are stopped and the container exits non-zero (compose restarts it).
#
# Memstore keeps the OSD's data in memory and writes it to /var/lib/ceph/osd/ceph-0 only when the OSD
# stops cleanly (SIGTERM to this script: gateway, OSD, then monitor, in that order). After a clean stop
# the data is loaded again on the next start. After an unclean one (SIGKILL, the grace period running
# out, a crash) the OSD's files no longer match the monitor's view, so the cluster is made afresh: the
# user and buckets are recreated, their objects are gone.
set -euo pipefail

: "${S3_ACCESS_KEY:?set S3_ACCESS_KEY}"
: "${S3_SECRET_KEY:?set S3_SECRET_KEY}"
export S3_BUCKETS="${S3_BUCKETS:-}"
S3_USER="${S3_USER:-s3user}"
# The OSD's capacity (memstore's reported size; data occupies memory only as it is written).
CAPACITY_MB="${S3_CEPH_CAPACITY_MB:-4096}"
# The daemons' errors always reach the container's log; S3_CEPH_VERBOSE=true adds their info lines
# (every S3 request, every map change).
VERBOSE="${S3_CEPH_VERBOSE:-false}"

DATA=/var/lib/ceph
CONF=$DATA/ceph.conf            # /etc/ceph/ceph.conf links here: the whole state is one directory
ADMIN_KEYRING=$DATA/ceph.client.admin.keyring
MON_DIR=$DATA/mon/ceph-a
OSD_DIR=$DATA/osd/ceph-0
RGW_DIR=$DATA/radosgw/ceph-rgw.s3
CLEAN=$DATA/clean-stop          # written when the OSD stopped cleanly (its data saved)
RUN=$DATA/run                   # admin sockets; `ready` once the user and buckets exist (the healthcheck)
export CEPH_CONF=$CONF

log() { printf 's3-ceph: %s\n' "$*"; }
started=$(date +%s%N)
elapsed() { printf '%d.%01ds' $(( ($(date +%s%N) - started) / 1000000000 )) $(( ($(date +%s%N) - started) / 100000000 % 10 )); }

write_conf() {
  cat > "$CONF" <<EOF
[global]
fsid = $(cat "$DATA/fsid")
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $RUN
admin socket = $RUN/\$cluster-\$name.asok
log to file = false
log to stderr = $VERBOSE
err to stderr = true
mon cluster log to file = false
mon cluster log to stderr = false
# one OSD: one copy of everything, placement across OSDs rather than hosts, few PGs per pool
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
# one monitor: commit map changes at once rather than batching them each second (pool creation)
paxos propose interval = 0.05
debug rocksdb = 0/0
debug bluestore = 0/0
debug bluefs = 0/0

[mon]
mon data = $MON_DIR

[osd]
osd data = $OSD_DIR
keyring = $OSD_DIR/keyring
osd objectstore = memstore
memstore device bytes = $(( CAPACITY_MB * 1024 * 1024 ))
# a full shutdown unmounts the store, which is when memstore writes its data to disk
osd fast shutdown = false

[client.admin]
keyring = $ADMIN_KEYRING

[client.rgw.s3]
keyring = $RGW_DIR/keyring
rgw frontends = beast port=9000
rgw thread pool size = 64
rgw enable usage log = false
EOF
}

bootstrap() {
  log "first start: creating a single-node cluster"
  find "$DATA" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
  mkdir -p "$RUN" "$MON_DIR" "$OSD_DIR" "$RGW_DIR" "$DATA/tmp"
  uuidgen > "$DATA/fsid"
  uuidgen > "$DATA/osd-uuid"
  write_conf
  local tmp=$DATA/tmp
  ceph-authtool --create-keyring "$tmp/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$ADMIN_KEYRING" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool --create-keyring "$OSD_DIR/keyring" --gen-key -n osd.0 \
    --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
  ceph-authtool --create-keyring "$RGW_DIR/keyring" --gen-key -n client.rgw.s3 \
    --cap mon 'allow rw' --cap osd 'allow rwx' --cap mgr 'allow rw' >/dev/null
  # every key is known to the monitor from its birth: no auth commands later
  for keyring in "$ADMIN_KEYRING" "$OSD_DIR/keyring" "$RGW_DIR/keyring"; do
    ceph-authtool "$tmp/mon.keyring" --import-keyring "$keyring" >/dev/null
  done
  monmaptool --create --fsid "$(cat "$DATA/fsid")" --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' "$tmp/monmap" >/dev/null
  ceph-mon --mkfs -i a --monmap "$tmp/monmap" --keyring "$tmp/mon.keyring"
  # --no-mon-config: the monitor is not running yet (osd.0 is added to the OSD map once it is)
  ceph-osd --mkfs --no-mon-config -i 0 --osd-uuid "$(cat "$DATA/osd-uuid")" 2>&1 | sed -u 's/^/[osd mkfs] /'
  rm -rf "$tmp"
  chmod 600 "$ADMIN_KEYRING" "$OSD_DIR/keyring" "$RGW_DIR/keyring"
}

declare -A pids=()
start() {  # start NAME COMMAND...: a daemon in the foreground, its output prefixed with its name
  local name=$1; shift
  "$@" > >(sed -u "s/^/[$name] /") 2>&1 &
  pids[$name]=$!
}

osd_saved=false
stop_all() {  # the gateway, then the OSD (which saves its data as it exits), then the monitor
  local name code
  for name in rgw osd mon; do
    [ -n "${pids[$name]:-}" ] || continue
    kill -TERM "${pids[$name]}" 2>/dev/null || true
    wait "${pids[$name]}" && code=0 || code=$?
    unset "pids[$name]"
    if [ "$name" = osd ]; then
      if [ "$code" -eq 0 ]; then osd_saved=true; else log "the OSD exited with $code while stopping"; fi
    fi
  done
}

on_term() {
  trap - TERM INT
  log "stopping"
  stop_all
  if $osd_saved; then
    touch "$CLEAN"
    log "stopped cleanly: the OSD's data is saved in $OSD_DIR"
    exit 0
  fi
  exit 1
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...
  local what=$1 deadline=$(( $(date +%s) + $2 )); shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then log "timed out waiting for $what"; stop_all; exit 1; fi
    for name in "${!pids[@]}"; do
      kill -0 "${pids[$name]}" 2>/dev/null || { log "$name exited while waiting for $what"; stop_all; exit 1; }
    done
    sleep 0.2
  done
}

osd_up() { ceph --connect-timeout 5 osd dump 2>/dev/null | grep -q '^osd\.0 up'; }

ensure_user() {
  if radosgw-admin user info --uid="$S3_USER" >/dev/null 2>&1; then
    # an existing user (a restart): make sure the key from the environment is one of its keys
    radosgw-admin key create --uid="$S3_USER" --key-type=s3 --access-key="$S3_ACCESS_KEY" --secret-key="$S3_SECRET_KEY" >/dev/null
  else
    radosgw-admin user create --uid="$S3_USER" --display-name="$S3_USER" \
      --access-key="$S3_ACCESS_KEY" --secret-key="$S3_SECRET_KEY" --max-buckets=1000 >/dev/null
  fi
}

# --- main ----------------------------------------------------------------------------------------------
# PID 1 ignores signals it has no handler for: stop on TERM/INT from the start (also during bootstrap)
trap on_term TERM INT
if [ -d "$MON_DIR/store.db" ] && [ -f "$CLEAN" ]; then
  log "restarting the cluster from $DATA"
  rm -f "$CLEAN"
  write_conf
else
  [ ! -d "$MON_DIR/store.db" ] || log "the last stop was not clean: the in-memory OSD's data is lost"
  bootstrap
fi

rm -rf "$RUN" && mkdir -p "$RUN"   # admin sockets and the ready mark belong to one run
start mon ceph-mon -f -i a
# osd.0 in the OSD map (a no-op when it is there already)
wait_for "the monitor" 60 ceph --connect-timeout 5 osd new "$(cat "$DATA/osd-uuid")" 0
start osd ceph-osd -f -i 0
wait_for "the OSD" 60 osd_up
log "monitor and OSD up after $(elapsed)"
# the gateway's user and zone are made before the gateway starts, so the two never race to create them
ensure_user
start rgw radosgw -f -n client.rgw.s3
wait_for "the S3 endpoint" 60 python3 /usr/local/lib/s3-ceph/s3ctl.py ping
python3 /usr/local/lib/s3-ceph/s3ctl.py create-buckets
touch "$RUN/ready"
log "ready after $(elapsed): S3 on :9000, user $S3_USER, buckets: ${S3_BUCKETS:-none}"

# supervise: the first daemon to exit stops the others
while true; do
  wait -n "${pids[@]}" || true
  for name in "${!pids[@]}"; do
    if ! kill -0 "${pids[$name]}" 2>/dev/null; then
      wait "${pids[$name]}" && code=0 || code=$?
      unset "pids[$name]"
      log "$name exited with $code; stopping"
      stop_all
      exit 1
    fi
  done
done
