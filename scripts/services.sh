#!/usr/bin/env bash
# Make sure the real servers the tests use are up on 127.0.0.1: Redis 6379, PostgreSQL 5432, RabbitMQ 5672.
#
#   scripts/services.sh ensure   check each one; start what is down (this machine's way, as root); exit 1 if any stays down
#   scripts/services.sh check    only check; exit 1 if any is down
#
# Tests never mock these servers and never skip when one is missing: a missing service is a failure, so this
# script fails loudly and says how to fix it. SESSIOND_INSTALL_SERVICES=1 lets it apt-get install missing servers.
# Fast (well under a second) when everything already answers; safe to run concurrently (starts are serialised).
set -euo pipefail

HOST=127.0.0.1
REDIS_PORT=6379
PG_PORT=5432
AMQP_PORT=5672
LOCK_FILE=${TMPDIR:-/tmp}/sessiond-services.lock

log() { printf 'services: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

# Run a command as root: directly when we are root, else through passwordless sudo.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif have sudo; then
        sudo -n "$@"
    else
        log "need root to run: $*"
        return 1
    fi
}

# --- probes: each answers 0 only when the server speaks its protocol on the port -------------------------------

redis_up() {
    if have redis-cli; then
        [[ $(timeout 3 redis-cli -h "$HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
    else
        # RESP inline PING over bash's /dev/tcp; the reply is "+PONG".
        timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$REDIS_PORT && printf 'PING\r\n' >&3 && IFS= read -r line <&3 \
            && [[ \$line == +PONG* ]]" 2>/dev/null
    fi
}

pg_up() {
    if have pg_isready; then
        timeout 5 pg_isready -q -h "$HOST" -p "$PG_PORT" -t 3 2>/dev/null
    else
        timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$PG_PORT" 2>/dev/null
    fi
}

# The tests log in as postgres with trust auth; a server that is up but refuses that is as good as down.
pg_login_ok() {
    have psql || return 0
    [[ $(timeout 10 psql -h "$HOST" -p "$PG_PORT" -U postgres -d postgres -w -Atqc 'select 1' 2>/dev/null) == 1 ]]
}

# Send the AMQP 0-9-1 protocol header; RabbitMQ answers with a method frame (type byte 0x01, Connection.Start).
# The listener opens only late in RabbitMQ's boot, so an answer here means it is ready for clients.
amqp_up() {
    local first
    first=$(timeout 3 bash -c "exec 3<>/dev/tcp/$HOST/$AMQP_PORT && printf 'AMQP\x00\x00\x09\x01' >&3 \
        && head -c 1 <&3 | od -An -tx1" 2>/dev/null) || return 1
    [[ ${first// /} == 01 ]]
}

wait_for() { # wait_for SECONDS PROBE
    local deadline=$((SECONDS + $1))
    while ! "$2"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# --- installing and starting -----------------------------------------------------------------------------------

install_hint() { # install_hint NAME PACKAGE PORT
    log "$1 is not running on $HOST:$3 and its server is not installed."
    log "  fix: apt-get install -y $2   (or rerun with SESSIOND_INSTALL_SERVICES=1 to let this script do it)"
}

apt_install() {
    if [[ ${SESSIOND_INSTALL_SERVICES:-0} != 1 ]]; then
        return 1
    fi
    log "installing $* with apt-get (SESSIOND_INSTALL_SERVICES=1)"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get install -y "$@" || { as_root apt-get update && as_root apt-get install -y "$@"; }
}

start_redis() {
    if ! have redis-server; then
        apt_install redis-server || { install_hint Redis redis-server "$REDIS_PORT"; return 1; }
    fi
    log "starting Redis on $HOST:$REDIS_PORT"
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_for 10 redis_up || { log "Redis did not answer within 10 s; see /var/log/redis/ci.log"; return 1; }
}

pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1; }

start_pg() {
    if ! have pg_ctlcluster || [[ -z $(pg_version) ]]; then
        apt_install postgresql || { install_hint PostgreSQL postgresql "$PG_PORT"; return 1; }
    fi
    local version
    version=$(pg_version)
    if [[ -z $version ]]; then
        log "PostgreSQL is installed but has no cluster under /etc/postgresql; create one: pg_createcluster <version> main"
        return 1
    fi
    log "starting PostgreSQL $version/main on $HOST:$PG_PORT"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for 30 pg_up || {
        log "PostgreSQL did not answer within 30 s; see /var/log/postgresql/postgresql-$version-main.log"
        return 1
    }
}

start_rabbitmq() {
    if ! have rabbitmq-server; then
        apt_install rabbitmq-server || { install_hint RabbitMQ rabbitmq-server "$AMQP_PORT"; return 1; }
    fi
    log "starting RabbitMQ on $HOST:$AMQP_PORT (takes a few seconds)"
    as_root rabbitmq-server -detached || true
    wait_for 30 amqp_up || { log "RabbitMQ did not answer on port $AMQP_PORT within 30 s; see /var/log/rabbitmq/"; return 1; }
}

# ensure_one NAME PROBE STARTER: start the service only if it is down, re-checking under the lock so that
# concurrent runs do not start it twice.
ensure_one() {
    local name=$1 probe=$2 starter=$3
    "$probe" && return 0
    (
        flock -w 90 9 || { log "timed out waiting for $LOCK_FILE"; exit 1; }
        "$probe" && exit 0
        "$starter"
    ) 9>"$LOCK_FILE" || { log "FAILED: $name is not available"; return 1; }
}

ensure() {
    local failed=0
    ensure_one Redis redis_up start_redis || failed=1
    ensure_one PostgreSQL pg_up start_pg || failed=1
    if [[ $failed -eq 0 ]] || pg_up; then
        pg_login_ok || {
            log "FAILED: PostgreSQL answers on $HOST:$PG_PORT but user postgres cannot log in without a password"
            log "  fix: allow trust auth for host 127.0.0.1/32 user postgres in pg_hba.conf, then reload"
            failed=1
        }
    fi
    ensure_one RabbitMQ amqp_up start_rabbitmq || failed=1
    return $failed
}

check() {
    local failed=0
    redis_up || { log "Redis is down on $HOST:$REDIS_PORT"; failed=1; }
    { pg_up && pg_login_ok; } || { log "PostgreSQL is down (or refuses user postgres) on $HOST:$PG_PORT"; failed=1; }
    amqp_up || { log "RabbitMQ is down on $HOST:$AMQP_PORT"; failed=1; }
    return $failed
}

case ${1:-} in
    ensure) ensure ;;
    check) check ;;
    *)
        echo "usage: $0 ensure|check" >&2
        exit 2
        ;;
esac
