#!/usr/bin/env bash
# A one-node Ceph cluster with radosgw on 127.0.0.1, for the object-store
# tests and benches: one monitor, one OSD whose objects live in memory
# (memstore), no manager, and an S3 user and bucket.
#
#   scripts/ceph-rgw.sh install   apt-get the daemons (radosgw, ceph-mon, ceph-osd)
#   scripts/ceph-rgw.sh up        start them (installing first if needed); idempotent
#   scripts/ceph-rgw.sh down      stop them
#   scripts/ceph-rgw.sh env       print the variables the tests read
#
# Settings (environment): RGW_PORT (7480), CEPH_DIR (/tmp/blocksnap-ceph),
# RGW_ACCESS_KEY / RGW_SECRET_KEY (blocksnap / blocksnap-secret: never
# the AWS_* ones, which may be real), RGW_BUCKET (blocksnap-test),
# OSD_BYTES (memstore size, 4 GiB).
set -euo pipefail
port=${RGW_PORT:-7480}
dir=${CEPH_DIR:-/tmp/blocksnap-ceph}
key=${RGW_ACCESS_KEY:-blocksnap}
secret=${RGW_SECRET_KEY:-blocksnap-secret}
bucket=${RGW_BUCKET:-blocksnap-test}
endpoint=http://127.0.0.1:$port

install() {
  command -v radosgw >/dev/null && command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null \
    && return 0
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    radosgw ceph-mon ceph-osd >/dev/null
}

# An S3 request signed with the user's key (curl's SigV4; RGW wants the
# payload's hash header, here of an empty body).
s3() { # METHOD PATH
  curl -sS -o /dev/null -w '%{http_code}' --aws-sigv4 "aws:amz:us-east-1:s3" \
    --user "$key:$secret" \
    -H "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" \
    -X "$1" "$endpoint/$2"
}

up() {
  if curl -s -o /dev/null "$endpoint/"; then
    make_bucket
    return 0
  fi
  install
  # Daemons of an earlier run (radosgw gone, the others not) go first:
  # they hold the ports and the directory.
  down
  rm -rf "$dir"
  mkdir -p "$dir"/{mon,osd0,run,log}
  local fsid conf
  fsid=$(cat /proc/sys/kernel/random/uuid)
  conf=$dir/ceph.conf
  cat > "$conf" <<EOF
[global]
fsid = $fsid
mon host = v2:127.0.0.1:3300
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
# One OSD: one copy of everything, and no warnings about it.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
osd crush chooseleaf type = 0
# A CI disk may be nearly full; the monitor refuses to start below 5% free.
mon data avail crit = 1
mon data avail warn = 2
osd objectstore = memstore
memstore device bytes = ${OSD_BYTES:-4294967296}
osd op num shards = 1
osd op num threads per shard = 2
[mon.a]
mon data = $dir/mon
[osd.0]
osd data = $dir/osd0
[client.rgw.blocksnap]
rgw frontends = beast endpoint=127.0.0.1:$port tcp_nodelay=1
rgw data = $dir/rgw
EOF
  local c="-c $conf" k=$dir/keyring
  monmaptool --create --addv a "[v2:127.0.0.1:3300]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-authtool --create-keyring "$k" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$k" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  ceph-authtool "$k" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap osd 'allow *' >/dev/null
  ceph-authtool "$k" --gen-key -n client.rgw.blocksnap \
    --cap mon 'allow rw' --cap osd 'allow rwx' >/dev/null
  ceph-mon $c --mkfs -i a --monmap "$dir/monmap" --keyring "$k" 2>>"$dir/log/setup.log"
  ceph-mon $c -i a
  local uuid
  uuid=$(cat /proc/sys/kernel/random/uuid)
  ceph $c osd new "$uuid" >/dev/null
  ceph-osd $c -i 0 --mkfs --osd-uuid "$uuid" 2>>"$dir/log/setup.log"
  ceph-osd $c -i 0 2>>"$dir/log/setup.log"
  for _ in $(seq 60); do ceph $c osd stat 2>/dev/null | grep -q "1 up" && break; sleep 1; done
  radosgw $c -n client.rgw.blocksnap 2>>"$dir/log/setup.log"
  for _ in $(seq 120); do curl -s -o /dev/null "$endpoint/" && break; sleep 1; done
  curl -s -o /dev/null "$endpoint/" || { echo "radosgw did not answer on $endpoint" >&2; exit 1; }
  radosgw-admin $c user create --uid=blocksnap --display-name=blocksnap \
    --access-key="$key" --secret-key="$secret" >/dev/null
  make_bucket
}

make_bucket() {
  local code
  code=$(s3 PUT "$bucket")
  case $code in
    200|409) ;;
    403) echo "radosgw on $endpoint refused key $key (HTTP 403): it runs with other" \
           "users; stop it (scripts/ceph-rgw.sh down, or its owner) or set RGW_ACCESS_KEY" >&2
         exit 1 ;;
    *) echo "cannot create bucket $bucket on $endpoint: HTTP $code" >&2; exit 1 ;;
  esac
  # 409: it exists; it must be ours to use.
  code=$(s3 HEAD "$bucket")
  if [ "$code" != 200 ]; then
    echo "bucket $bucket on $endpoint is not usable with key $key (HTTP $code)" >&2
    exit 1
  fi
}

down() {
  local pids=()
  for f in "$dir"/run/*.pid; do
    [ -f "$f" ] && pids+=("$(cat "$f")")
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "${pids[@]}" 2>/dev/null || return 0
    sleep 0.2
  done
  kill -9 "${pids[@]}" 2>/dev/null || true
}

env_vars() {
  echo "export AWS_ENDPOINT_URL=$endpoint"
  echo "export AWS_REGION=us-east-1"
  echo "export AWS_ACCESS_KEY_ID=$key"
  echo "export AWS_SECRET_ACCESS_KEY=$secret"
  echo "export BLOCKSNAP_TEST_BUCKET=s3://$bucket"
}

case ${1:-up} in
  install) install ;;
  up) up; echo "radosgw up on $endpoint, bucket $bucket" ;;
  down) down ;;
  env) env_vars ;;
  *) echo "usage: $0 install|up|down|env" >&2; exit 2 ;;
esac
