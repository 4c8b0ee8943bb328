#!/bin/bash
# Install (if missing) and start a one-node OpenStack Swift with its S3 API (s3api +
# tempauth middlewares) on 127.0.0.1, then wait until it answers. A real S3-compatible
# object store for the test suite, meant for CI and test fixtures on Debian 12 run as
# root, in containers without systemd. Idempotent: a second run with everything up only
# checks (well under a second).
#
# Endpoint: http://127.0.0.1:18080 (path-style S3; region us-east-1; no TLS).
# Users (tempauth; for S3 the access key is `account:user`, the secret is the key):
#   test:tester / testing   admin of account `test` (.admin): full access to its buckets
#   test:reader / reading   read-only on account `test` (an account ACL {"read-only"}):
#                           lists and reads the admin's buckets, gets AccessDenied (403)
#                           on any write
# Buckets live in the account of the user: a user of another account would not see them
# at all (NoSuchBucket), hence the read-only user shares the admin's account.
#
# On success it writes the endpoint and the credentials, env-style, to
#   /run/gigaseg-s3/credentials   (mode 644, test credentials only)
# with the keys S3_ENDPOINT_URL S3_REGION S3_ACCESS_KEY_ID S3_SECRET_ACCESS_KEY
# S3_READONLY_ACCESS_KEY_ID S3_READONLY_SECRET_ACCESS_KEY SWIFT_AUTH_URL (no AWS_*
# names, so sourcing it does not change what AWS tools use), prints one line,
# `s3: <endpoint> credentials <file>`, and exits 0.
# On failure it prints what went wrong plus the tail of the service logs, and exits 1.
#
# Layout: configs and rings in /etc/gigaseg-s3 (the Debian defaults in /etc/swift are not
# used, except /etc/swift/swift.conf, which Swift always reads: it is created only when
# missing), one storage device as a plain directory /srv/gigaseg-s3/d1 (single replica),
# pid files in /run/gigaseg-s3, logs in /var/log/gigaseg-s3. Ports, all on 127.0.0.1:
# proxy 18080, object 16200, container 16201, account 16202, memcached 11311 (not the
# Debian defaults 8080/6200-6202/11211, so a packaged Swift or memcached started by a
# systemd host does not collide with this one).
#
# Tunables (environment):
#   S3_UP_TIMEOUT  seconds to wait for the services to answer (default 60)
#
# Stop it: for f in /run/gigaseg-s3/*.pid; do kill "$(cat "$f")"; done
# Wipe the data: stop it, then rm -rf /srv/gigaseg-s3/d1 (the next run recreates it).
set -euo pipefail

CONF_DIR=/etc/gigaseg-s3
DEVICES=/srv/gigaseg-s3
DEVICE=d1
RUN_DIR=/run/gigaseg-s3
LOG_DIR=/var/log/gigaseg-s3
CREDENTIALS=$RUN_DIR/credentials
MARKER="# written by cluster/ci/s3-up.sh; rerunning it rewrites this file."
TIMEOUT=${S3_UP_TIMEOUT:-60}
PACKAGES="swift-proxy swift-account swift-container swift-object memcached"
PY=/usr/bin/python3 # Swift's own interpreter (not whatever python3 is first on PATH)

IP=127.0.0.1
PROXY_PORT=18080
OBJECT_PORT=16200
CONTAINER_PORT=16201
ACCOUNT_PORT=16202
MEMCACHED_PORT=11311
ENDPOINT=http://$IP:$PROXY_PORT
ADMIN_KEY=test:tester
ADMIN_SECRET=testing
READER_KEY=test:reader
READER_SECRET=reading
# Rings: one partition power for all three, one device, one replica.
PART_POWER=6
SERVERS="object container account"

die() {
    echo "s3-up: $*" >&2
    for log in "$LOG_DIR"/*.log; do
        if [ -s "$log" ]; then
            echo "--- tail of $log" >&2
            tail -n 10 "$log" >&2
        fi
    done
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# running NAME PIDFILE: the pid file names a live process whose comm is NAME (the kernel
# truncates it to 15 characters). A stale pid file from a previous container is ignored,
# and so is a zombie: a killed daemon may linger as one until PID 1 reaps it.
running() {
    local pid stat comm state
    [ -s "$2" ] || return 1
    pid=$(cat "$2" 2>/dev/null) || return 1
    case "$pid" in '' | *[!0-9]*) return 1 ;; esac
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    comm=${stat#*\(}
    comm=${comm%\)*}
    state=${stat##*\) }
    state=${state%% *}
    [ "$comm" = "${1:0:15}" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# check [--wait SECONDS]: is Swift usable? One Python process (Swift's interpreter):
# memcached and the servers alive (their pid files), each server's /healthcheck, a token
# for both users, the read-only account ACL in place and the reader able to list the
# account. Without --wait: one look, changes nothing. With --wait: retries until SECONDS
# have passed, sets the account ACL when missing (the POST also creates the account),
# and fails at once when a process has died. Prints what is wrong on failure.
check() {
    "$PY" - "$@" <<EOF
import json, os, sys, time, urllib.error, urllib.request

wait = float(sys.argv[2]) if sys.argv[1:2] == ["--wait"] else None
base = "$ENDPOINT"
acl = json.dumps({"read-only": ["$READER_KEY"]}, separators=(",", ":"))
procs = [("memcached", "memcached", None), ("object", "swift-object-se", $OBJECT_PORT),
         ("container", "swift-container", $CONTAINER_PORT), ("account", "swift-account-s", $ACCOUNT_PORT),
         ("proxy", "swift-proxy-ser", $PROXY_PORT)]

class NotYet(Exception):
    pass

class Dead(Exception):
    pass

def call(method, url, headers=None):
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()
    except OSError as e:
        raise NotYet(f"{url}: {e}") from None

def expect(what, status, body=b""):
    if status // 100 != 2:
        raise NotYet(f"{what}: HTTP {status} {body[:200]!r}")

def token(user, key):
    status, headers, body = call("GET", base + "/auth/v1.0", {"X-Auth-User": user, "X-Auth-Key": key})
    expect(f"auth as {user}", status, body)
    return headers["X-Auth-Token"], headers["X-Storage-Url"]

def once():
    for name, comm, port in procs:
        try:
            with open(f"$RUN_DIR/{name}.pid") as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            alive = stat[stat.index("(") + 1 : stat.rindex(")")] == comm
            alive = alive and stat[stat.rindex(")") + 2] not in "ZX"
        except (OSError, ValueError):
            alive = False
        if not alive:
            raise Dead(f"{name} is not running (log: $LOG_DIR/{name}.log)")
        if port is not None:
            status, _, body = call("GET", f"http://$IP:{port}/healthcheck")
            expect(f"{name} /healthcheck", status, body)
    admin, url = token("$ADMIN_KEY", "$ADMIN_SECRET")
    status, headers, body = call("HEAD", url, {"X-Auth-Token": admin})
    expect("HEAD account as $ADMIN_KEY", status, body)
    if headers.get("X-Account-Access-Control") != acl:
        if wait is None:
            raise NotYet("the read-only account ACL is not set")
        status, _, body = call("POST", url, {"X-Auth-Token": admin, "X-Account-Access-Control": acl})
        expect("setting the read-only account ACL", status, body)
    reader, _ = token("$READER_KEY", "$READER_SECRET")
    status, _, body = call("GET", url + "?format=json", {"X-Auth-Token": reader})
    expect("listing the account as $READER_KEY", status, body)

deadline = time.monotonic() + (wait or 0)
while True:
    try:
        once()
        break
    except Dead as e:
        sys.exit(str(e))
    except NotYet as e:
        if time.monotonic() >= deadline:
            sys.exit(f"not usable{f' after {wait:g}s' if wait else ''}: {e}")
        time.sleep(0.05)
EOF
}

write_credentials() {
    local new
    new=$(
        cat <<EOF
$MARKER
S3_ENDPOINT_URL=$ENDPOINT
S3_REGION=us-east-1
S3_ACCESS_KEY_ID=$ADMIN_KEY
S3_SECRET_ACCESS_KEY=$ADMIN_SECRET
S3_READONLY_ACCESS_KEY_ID=$READER_KEY
S3_READONLY_SECRET_ACCESS_KEY=$READER_SECRET
SWIFT_AUTH_URL=$ENDPOINT/auth/v1.0
EOF
    )
    if ! { [ -r "$CREDENTIALS" ] && [ "$(cat "$CREDENTIALS")" = "$new" ]; }; then
        is_root || die "cannot write $CREDENTIALS: not root"
        mkdir -p "$RUN_DIR"
        printf '%s\n' "$new" >"$CREDENTIALS.tmp"
        chmod 644 "$CREDENTIALS.tmp"
        mv "$CREDENTIALS.tmp" "$CREDENTIALS"
    fi
    echo "s3: $ENDPOINT credentials $CREDENTIALS"
}

# ---------------------------------------------------------------- configs (in memory)
backend_conf() { # NAME PORT
    cat <<EOF
$MARKER
[DEFAULT]
bind_ip = $IP
bind_port = $2
# one process, no forked workers: starts fastest; eventlet serves requests concurrently
# (the script starts it as user swift)
workers = 0
user = swift
swift_dir = $CONF_DIR
devices = $DEVICES
mount_check = false
log_name = gigaseg-s3-$1
log_level = INFO

[pipeline:main]
pipeline = healthcheck $1-server

[app:$1-server]
use = egg:swift#$1

[filter:healthcheck]
use = egg:swift#healthcheck
EOF
}

proxy_conf() {
    cat <<EOF
$MARKER
[DEFAULT]
bind_ip = $IP
bind_port = $PROXY_PORT
workers = 0
user = swift
swift_dir = $CONF_DIR
log_name = gigaseg-s3-proxy
log_level = INFO

[pipeline:main]
# s3api before tempauth; tempauth keeps its tokens in memcached (the cache filter).
# slo: S3 multipart uploads are stored as static large objects.
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
node_timeout = 30
conn_timeout = 2

[filter:s3api]
use = egg:swift#s3api
location = us-east-1

[filter:tempauth]
use = egg:swift#tempauth
# user_<account>_<user> = <key> [groups]
user_${ADMIN_KEY%%:*}_${ADMIN_KEY#*:} = $ADMIN_SECRET .admin
user_${READER_KEY%%:*}_${READER_KEY#*:} = $READER_SECRET

[filter:cache]
use = egg:swift#memcache
memcache_servers = $IP:$MEMCACHED_PORT

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo
EOF
}

ring_spec="$MARKER part_power=$PART_POWER replicas=1 device=$DEVICE object=$IP:$OBJECT_PORT container=$IP:$CONTAINER_PORT account=$IP:$ACCOUNT_PORT"

port_of() {
    case "$1" in
        object) echo "$OBJECT_PORT" ;;
        container) echo "$CONTAINER_PORT" ;;
        account) echo "$ACCOUNT_PORT" ;;
        proxy) echo "$PROXY_PORT" ;;
    esac
}
conf_of() {
    case "$1" in
        proxy) proxy_conf ;;
        *) backend_conf "$1" "$(port_of "$1")" ;;
    esac
}
comm_of() { echo "swift-$1-server"; }

# changed NAME: the file $CONF_DIR/NAME.conf differs from what this run would write.
changed() { ! { [ -r "$CONF_DIR/$1.conf" ] && [ "$(cat "$CONF_DIR/$1.conf")" = "$(conf_of "$1")" ]; }; }

rings_current() {
    [ -r "$CONF_DIR/rings.spec" ] && [ "$(cat "$CONF_DIR/rings.spec")" = "$ring_spec" ] || return 1
    local s
    for s in $SERVERS; do [ -s "$CONF_DIR/$s.ring.gz" ] || return 1; done
}

all_running() {
    local s
    running memcached "$RUN_DIR/memcached.pid" || return 1
    for s in $SERVERS proxy; do running "$(comm_of "$s")" "$RUN_DIR/$s.pid" || return 1; done
}

# missing_packages: prints those of $PACKAGES that are not installed (no pipe into
# grep -q: under pipefail an early exit of grep could fail the pipeline).
missing_packages() {
    local p
    for p in $PACKAGES; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || printf ' %s' "$p"
    done
}
installed() { [ -z "$(missing_packages)" ]; }

# ---------------------------------------------------------------- fast path: already up
# No lock, no root needed: only reads.
fast_ok() {
    installed && rings_current && all_running || return 1
    local s
    for s in $SERVERS proxy; do changed "$s" && return 1; done
    check >/dev/null 2>&1
}
if fast_ok; then
    write_credentials
    exit 0
fi

is_root || die "Swift is not installed, not running or not configured by this script; run it as root"

# Concurrent runs (two fixtures at once) take turns from here on.
mkdir -p "$RUN_DIR" "$LOG_DIR"
exec 9>"$RUN_DIR/s3-up.lock"
flock -w 300 9 || die "another s3-up.sh holds $RUN_DIR/s3-up.lock for 5 minutes"
# The run that held the lock may have brought everything up meanwhile.
if fast_ok; then
    write_credentials
    exit 0
fi

# ---------------------------------------------------------------- install, only if missing
missing=$(missing_packages)
if [ -n "$missing" ]; then
    # Another apt run may hold the dpkg lock: wait for it instead of failing. (On a
    # systemd host the packages also start the Debian-configured Swift and memcached, on
    # 8080, 6200-6202 and 11211: not the ports used here.)
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 install -y \
            --no-install-recommends $PACKAGES >>/tmp/s3-up-apt.log 2>&1 9>&-
    }
    : >/tmp/s3-up-apt.log
    if ! apt_install; then
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 update \
            >>/tmp/s3-up-apt.log 2>&1 9>&- || true
        apt_install || {
            tail -n 20 /tmp/s3-up-apt.log >&2
            die "apt-get install$missing failed (log: /tmp/s3-up-apt.log)"
        }
    fi
fi

# ---------------------------------------------------------------- swift.conf, configs, rings
# Swift reads the hash prefix/suffix and the storage policies from /etc/swift/swift.conf,
# whatever swift_dir says. The Debian package ships one (policy 0, "changeme" hashes);
# write one only when it is missing.
if [ ! -s /etc/swift/swift.conf ]; then
    mkdir -p /etc/swift
    cat >/etc/swift/swift.conf <<EOF
$MARKER
[swift-hash]
swift_hash_path_suffix = gigaseg-ci
swift_hash_path_prefix = gigaseg-ci

[storage-policy:0]
name = Policy-0
default = yes
EOF
fi

mkdir -p "$CONF_DIR" "$DEVICES/$DEVICE"
chown swift:swift "$DEVICES" "$DEVICES/$DEVICE"

restart=""
for s in $SERVERS proxy; do
    if changed "$s"; then
        conf_of "$s" >"$CONF_DIR/$s.conf.tmp"
        chmod 644 "$CONF_DIR/$s.conf.tmp"
        mv "$CONF_DIR/$s.conf.tmp" "$CONF_DIR/$s.conf"
        restart="$restart $s"
    fi
done

if ! rings_current; then
    # All three rings in one Python process (swift-ring-builder create/add/rebalance is a
    # Python start each); the .builder files stay for swift-ring-builder to inspect.
    "$PY" - >>"$LOG_DIR/rings.log" 2>&1 <<EOF || die "building the rings failed (log: $LOG_DIR/rings.log)"
from swift.common.ring import RingBuilder

for name, port in (("object", $OBJECT_PORT), ("container", $CONTAINER_PORT), ("account", $ACCOUNT_PORT)):
    builder = RingBuilder($PART_POWER, 1, 1)
    builder.add_dev({"region": 1, "zone": 1, "ip": "$IP", "port": port, "device": "$DEVICE", "weight": 100})
    builder.rebalance()
    builder.get_ring().save(f"$CONF_DIR/{name}.ring.gz")
    builder.save(f"$CONF_DIR/{name}.builder")
EOF
    printf '%s\n' "$ring_spec" >"$CONF_DIR/rings.spec"
    # Running servers hold the old rings: restart them all.
    restart="$SERVERS proxy"
fi

# ---------------------------------------------------------------- start the services
stop() { # NAME COMM
    local pf=$RUN_DIR/$1.pid j=0
    if running "$2" "$pf"; then
        kill "$(cat "$pf")" 2>/dev/null || true
        while running "$2" "$pf" && [ "$j" -lt 50 ]; do sleep 0.1; j=$((j + 1)); done
        running "$2" "$pf" && kill -9 "$(cat "$pf")" 2>/dev/null || true
    fi
    rm -f "$pf"
}

# start NAME COMMAND...: in a session of its own (Ctrl-C in the test run does not reach
# it), stdio detached from this script (a caller reading our output gets EOF), pid file
# written by the process itself before exec.
start() {
    local name=$1 log=$LOG_DIR/$1.log
    shift
    # keep one older log once it passes 50 MB (the proxy logs every request)
    if [ -f "$log" ] && [ "$(stat -c %s "$log")" -gt 50000000 ]; then mv -f "$log" "$log.1"; fi
    setsid sh -c 'echo $$ >"$0"; exec "$@"' "$RUN_DIR/$name.pid" "$@" \
        </dev/null >>"$log" 2>&1 9>&- &
}

# start_missing: starts memcached and each server that is not running (after stopping
# those in $restart).
start_missing() {
    local s
    if ! running memcached "$RUN_DIR/memcached.pid"; then
        # A proxy that lost its memcached stops asking it for a minute (error limiting)
        # and answers 503 meanwhile: restart the proxy with it.
        restart="$restart proxy"
        start memcached /usr/bin/memcached -u memcache -l "$IP" -p "$MEMCACHED_PORT" -U 0 -m 64
    fi
    for s in $restart; do stop "$s" "$(comm_of "$s")"; done
    restart=""
    for s in $SERVERS proxy; do
        if ! running "$(comm_of "$s")" "$RUN_DIR/$s.pid"; then
            # -v: also log to stderr, i.e. the log file (no syslog in a container). As
            # user swift: with workers = 0 Swift itself does not drop root.
            start "$s" setpriv --reuid=swift --regid=swift --init-groups \
                "/usr/bin/swift-$s-server" "$CONF_DIR/$s.conf" -v
        fi
    done
}

# ---------------------------------------------------------------- start, wait until ready
# Twice at most: a process that was still exiting when this run looked (killed just
# before) is started on the second round.
for round in 1 2; do
    start_missing
    if why=$(check --wait "$TIMEOUT" 2>&1); then
        write_credentials
        exit 0
    fi
    case "$why" in *"is not running"*) ;; *) break ;; esac
done
die "Swift $why"
