#!/bin/sh
# Install (if missing) and start a single-node SLURM cluster on this machine, then wait
# until its node accepts jobs. Meant for CI and test fixtures on Debian 12 run as root,
# in containers without systemd. Idempotent: a second run with everything up only checks.
#
# On success it prints one line, `slurm: node <name> <state>`, and exits 0.
# On failure it prints what went wrong plus the tail of the daemon logs, and exits 1.
#
# Tunables (environment):
#   SLURM_UP_CPUS     CPUs the node declares (default: 4 x the real count, see below)
#   SLURM_UP_MEM_MB   RealMemory the node declares (default: real memory minus a margin)
#   SLURM_UP_TIMEOUT  seconds to wait for the node to be usable (default 60)
#
# Stop it: kill "$(cat /run/slurmd.pid)" "$(cat /run/slurmctld.pid)"
#          (and munged: kill "$(cat /run/munge/munged.pid)").
set -eu

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
MARKER="# written by cluster/ci/slurm-up.sh"
TIMEOUT=${SLURM_UP_TIMEOUT:-60}
PACKAGES="slurmctld slurmd slurm-client munge"

die() {
    echo "slurm-up: $*" >&2
    for log in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        if [ -s "$log" ]; then
            echo "--- tail of $log" >&2
            tail -n 20 "$log" >&2
        fi
    done
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# running NAME PIDFILE: the pid file names a live process called NAME (a stale pid file
# from a previous container is ignored; no dependence on pgrep).
running() {
    [ -s "$2" ] || return 1
    pid=$(cat "$2" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

# Prints the state of node $name (e.g. idle, mix, alloc, down*, drain) or nothing.
node_state() { sinfo -h -N -n "$name" -o '%t' 2>/dev/null | head -n 1; }

usable() {
    case "$1" in
        idle | mix | alloc | comp) return 0 ;;
        *) return 1 ;;
    esac
}

# ---------------------------------------------------------------- install, only if missing
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    is_root || { echo "slurm-up: SLURM is not installed (missing:$missing); run this script as root to install it" >&2; exit 1; }
    # Another apt run (e.g. a background install logging to /tmp/apt-slurm.log) may hold
    # the dpkg lock: wait for it instead of failing.
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 install -y \
            --no-install-recommends $PACKAGES >/tmp/slurm-up-apt.log 2>&1
    }
    if ! apt_install; then
        DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600 update \
            >>/tmp/slurm-up-apt.log 2>&1 || true
        apt_install || { tail -n 20 /tmp/slurm-up-apt.log >&2; die "apt-get install$missing failed (log: /tmp/slurm-up-apt.log)"; }
    fi
fi

# ---------------------------------------------------------------- slurm.conf
# `slurmd -C` prints the real node line, e.g.
#   NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
hw=$(slurmd -C 2>/dev/null | head -n 1) || true
field() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
name=$(field NodeName)
real_cpus=$(field CPUs)
real_mem=$(field RealMemory)
[ -n "$name" ] && [ -n "$real_cpus" ] && [ -n "$real_mem" ] || die "cannot parse 'slurmd -C' output: $hw"

# CPUs: declare 4x the real count (8 on a 2-core CI machine). Test jobs are tiny
# (dask workers with --cpus-per-task=1) and must never queue forever behind each other;
# with the real count, a third one-core worker on a 2-core machine would stay PENDING.
# SlurmdParameters=config_overrides lets slurmd accept a node line larger than the
# hardware, and TaskPlugin=task/none binds no task to a CPU, so the extra CPUs are just
# scheduling slots (the kernel shares the real cores). Unlike partition OverSubscribe,
# this needs no --oversubscribe from jobs, and `sinfo -o %C` stays truthful about slots.
cpus=${SLURM_UP_CPUS:-$((real_cpus * 4))}
# Memory: what the machine has minus 10% (at least 512 MB) for the daemons and the dask
# scheduler; memory is a consumable (CR_Core_Memory), so a --mem=2G job reserves 2 GB.
margin=$((real_mem / 10))
[ "$margin" -ge 512 ] || margin=512
mem=${SLURM_UP_MEM_MB:-$((real_mem - margin))}
[ "$mem" -gt 0 ] || mem=$real_mem

# Reach the node over loopback whatever the hostname resolves to (or not) in a container.
new_conf=$(cat <<EOF
$MARKER; rerunning it rewrites this file.
ClusterName=ci
SlurmctldHost=$name(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# No accounting, so sacct does not work; finished jobs are logged one line each here:
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
SlurmdParameters=config_overrides
# A fresh container reboots the node: take it back without an admin.
ReturnToService=2
# Quick turnaround for tests: cancelled jobs get SIGKILL 5 s after SIGTERM.
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$name NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$name Default=YES MaxTime=INFINITE State=UP
EOF
)

# Concurrent runs as root (two fixtures at once) take turns from here on.
if is_root && command -v flock >/dev/null 2>&1; then
    exec 9>/run/slurm-up.lock
    flock -w 300 9 || die "another slurm-up.sh holds /run/slurm-up.lock for 5 minutes"
fi

conf_changed=0
[ -r "$CONF" ] && [ "$(cat "$CONF")" = "$new_conf" ] || conf_changed=1

# ---------------------------------------------------------------- fast path: already up
if [ "$conf_changed" -eq 0 ] && running slurmctld "$CTLD_PID" && running slurmd "$SLURMD_PID"; then
    state=$(node_state)
    if usable "$state"; then
        echo "slurm: node $name $state"
        exit 0
    fi
fi
is_root || { echo "slurm-up: SLURM is installed but not running, not usable or not configured by this script; run it as root" >&2; exit 1; }

if [ "$conf_changed" -eq 1 ]; then
    mkdir -p "$CONF_DIR"
    printf '%s\n' "$new_conf" >"$CONF.tmp"
    chmod 644 "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
fi

mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOG_DIR" /run/munge /var/log/munge \
    /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
if ! running munged "$MUNGE_PID"; then
    rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged >/dev/null 2>&1 9>&- || die "munged failed to start"
fi
i=0
until munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -le 50 ] || die "munge does not answer (munge -n | unmunge fails)"
    sleep 0.2
done

# ---------------------------------------------------------------- slurmctld, slurmd
if [ "$conf_changed" -eq 1 ]; then
    # New settings (a node line change included) need fresh daemons, not a reconfigure.
    for d in slurmd:$SLURMD_PID slurmctld:$CTLD_PID; do
        pf=${d#*:}
        d=${d%%:*}
        if running "$d" "$pf"; then
            kill "$(cat "$pf")" 2>/dev/null || true
            j=0
            while running "$d" "$pf" && [ "$j" -lt 50 ]; do sleep 0.2; j=$((j + 1)); done
        fi
    done
fi
if ! running slurmctld "$CTLD_PID"; then
    /usr/sbin/slurmctld >>"$LOG_DIR/slurmctld.out" 2>&1 9>&- || die "slurmctld failed to start"
fi
slurmd_started=0
if ! running slurmd "$SLURMD_PID"; then
    slurmd_started=$(($(date +%s) - 1))
    /usr/sbin/slurmd >>"$LOG_DIR/slurmd.out" 2>&1 9>&- || die "slurmd failed to start"
fi

# ---------------------------------------------------------------- wait for the node
start=$(date +%s)
resumed=0
while :; do
    state=$(node_state)
    # A restarted slurmctld reports the node state it saved before slurmd has registered
    # again: when this run started slurmd, also wait for that registration.
    registered=1
    if [ "$slurmd_started" -gt 0 ]; then
        t=$(scontrol -o show node "$name" 2>/dev/null | tr ' ' '\n' | sed -n 's/^SlurmdStartTime=//p')
        t=$(date -d "$t" +%s 2>/dev/null) || t=0
        [ "$t" -ge "$slurmd_started" ] || registered=0
    fi
    if [ "$registered" -eq 1 ] && usable "$state"; then
        echo "slurm: node $name $state"
        exit 0
    fi
    # A node left down/drained by an earlier run (not merely unresponsive: no '*'), e.g.
    # "Kill task failed" or a reboot: give it back once.
    case "$state" in
        down | drain* | drng | fail*)
            if [ "$resumed" -eq 0 ]; then
                scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
    esac
    running slurmctld "$CTLD_PID" || die "slurmctld died"
    running slurmd "$SLURMD_PID" || die "slurmd died"
    if [ $(($(date +%s) - start)) -ge "$TIMEOUT" ]; then
        die "node $name not usable after ${TIMEOUT}s (state: '${state:-unknown}'; sinfo: $(sinfo -h -N -o '%N %t %E' 2>&1 | head -n 3))"
    fi
    sleep 1
done
