#!/usr/bin/env bash
# A throw-away single-node SLURM cluster on this machine, for testing the SLURM profile.
#
#   workflow/scripts/slurm-cluster.sh start    install (root, apt) if missing, configure, start
#   workflow/scripts/slurm-cluster.sh status   is our cluster up? (sinfo of it)
#   workflow/scripts/slurm-cluster.sh stop     stop exactly the daemons `start` started
#   workflow/scripts/slurm-cluster.sh env      print `export SLURM_CONF=...` (optional: the
#                                              default /etc/slurm/slurm.conf is linked to it)
#
# Uses Debian's slurm-wlm and munge (SLURM 22.05 on bookworm). Everything the cluster writes
# (slurm.conf, spool, state, logs, pid files, the list of pids it started) lives in one state
# folder it owns: $POSTALIGN_SLURM_STATE, default /tmp/postalign-slurm. /etc/slurm/slurm.conf
# is a link to the slurm.conf there while the cluster runs (srun inside a job reads only the
# default location: the executor's job step drops SLURM_CONF), removed by `stop`; an
# /etc/slurm/slurm.conf that is not this script's link is never touched (start fails).
# Accounting is off (no slurmdbd): use the executor with `slurm-status-command: squeue`.
set -euo pipefail

STATE=${POSTALIGN_SLURM_STATE:-/tmp/postalign-slurm}
CONF=$STATE/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
PIDS=$STATE/started.pids          # "<name> <pid>" per daemon this script started
PARTITION=${POSTALIGN_SLURM_PARTITION:-main}
MIN_JOB_AGE=${POSTALIGN_SLURM_MIN_JOB_AGE:-300}   # >= 3 status-check intervals of the executor
WAIT_S=${POSTALIGN_SLURM_WAIT_S:-60}

STARTING=0

die() { echo "slurm-cluster: error: $*" >&2; exit 1; }
say() { echo "slurm-cluster: $*"; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it starts munged, slurmctld and slurmd" \
        "and writes their spool folders); run it with sudo or as root"
}

# Our own pids, still alive and still the daemon we started (pid reuse).
alive() {  # name pid
    local comm
    comm=$(ps -o comm= -p "$2" 2>/dev/null) || return 1
    [[ $comm == "$1" ]]
}

ours_running() {
    [[ -s $PIDS ]] || return 1
    local name pid any=1
    while read -r name pid; do
        [[ $name == link ]] && continue
        if alive "$name" "$pid"; then any=0; fi
    done <"$PIDS"
    return $any
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]} == 0)) && return 0
    need_root
    command -v apt-get >/dev/null ||
        die "${missing[*]} not installed and no apt-get here: install SLURM and munge by hand"
    say "installing ${missing[*]} with apt-get"
    # Install without letting the packages start their services: the daemons this script
    # starts are the only ones it stops. Debian's policy-rc.d mechanism (101 = deny).
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
    fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            slurm-wlm munge >/dev/null; } || rc=$?
    ((made_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install of ${missing[*]} failed (exit $rc)"
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
        command -v munged >/dev/null || die "slurm-wlm/munge installed but daemons not found"
}

write_conf() {
    local host node cpus mem real
    host=$(hostname -s)
    node=$(slurmd -C | head -1)   # NodeName=... CPUs=... Boards=... RealMemory=...
    [[ $node == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node"
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
    real=$((mem * 90 / 100))   # a little below what slurmd measures, or the node drains
    node=$(sed -e "s/^NodeName=[^ ]*/NodeName=$host/" -e "s/RealMemory=[0-9]*/RealMemory=$real/" \
        <<<"$node")
    mkdir -p "$STATE"/{spool/ctld,spool/d,log}
    cat >"$CONF" <<EOF
# Written by workflow/scripts/slurm-cluster.sh: a single-node test cluster, accounting off.
ClusterName=postalign
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue this long: the executor (status via squeue) needs
# >= 3 of its status-check intervals, or it falls back to sacct.
MinJobAge=$MIN_JOB_AGE
$node State=UNKNOWN
PartitionName=$PARTITION Default=YES Nodes=ALL MaxTime=INFINITE State=UP
EOF
    say "wrote $CONF ($host: $cpus CPUs, RealMemory $real MB)"
    if [[ -L $ETC_CONF && $(readlink "$ETC_CONF") == "$CONF" ]]; then
        :
    elif [[ -e $ETC_CONF || -L $ETC_CONF ]]; then
        die "$ETC_CONF exists and is not this script's: a SLURM is configured here already;" \
            "not touching it"
    else
        mkdir -p "$(dirname "$ETC_CONF")"
        ln -s "$CONF" "$ETC_CONF"
        echo "link $ETC_CONF" >>"$PIDS"
    fi
}

start_munge() {
    local socket=/run/munge/munge.socket.2
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "munged already running (not ours: left alone)"
        return 0
    fi
    id munge >/dev/null 2>&1 || die "no 'munge' user (is the munge package installed?)"
    if [[ ! -s /etc/munge/munge.key ]]; then
        command -v mungekey >/dev/null || die "no /etc/munge/munge.key and no mungekey"
        mungekey --create --keyfile=/etc/munge/munge.key
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    rm -f "$socket"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid ||
        die "munged did not start (see /var/log/munge/munged.log)"
    local pid
    pid=$(cat /run/munge/munged.pid)
    echo "munged $pid" >>"$PIDS"
    munge -n </dev/null | unmunge >/dev/null || die "munge does not work after starting munged"
}

start_daemon() {  # name pidfile command...
    local name=$1 pidfile=$2 i
    shift 2
    rm -f "$pidfile"
    "$@" || die "$name did not start (see $STATE/log/$name.log)"
    for ((i = 0; i < 50; i++)); do
        [[ -s $pidfile ]] && break
        sleep 0.2
    done
    [[ -s $pidfile ]] || die "$name wrote no pid file (see $STATE/log/$name.log)"
    echo "$name $(cat "$pidfile")" >>"$PIDS"
}

cmd_start() {
    if ours_running; then
        say "already running (state in $STATE)"
        cmd_status
        return 0
    fi
    install_packages
    need_root
    local other
    other=$(pgrep -x slurmctld; pgrep -x slurmd) || true
    [[ -z $other ]] || die "a slurmctld/slurmd not started by this script is running" \
        "(pids: $(echo $other)); stop it first, this script only stops its own daemons"
    mkdir -p "$STATE"
    rm -rf "$STATE/spool" "$STATE/log"
    : >"$PIDS"
    # Any failure from here on stops what this start had started.
    trap 'if ((STARTING)); then echo "slurm-cluster: start failed; stopping what it started" >&2; cmd_stop; fi' EXIT
    STARTING=1
    write_conf
    start_munge
    export SLURM_CONF=$CONF
    start_daemon slurmctld "$STATE/slurmctld.pid" slurmctld -f "$CONF" -c
    start_daemon slurmd "$STATE/slurmd.pid" slurmd -f "$CONF"
    local i state=""
    for ((i = 0; i < WAIT_S * 2; i++)); do
        state=$(sinfo -h -N -o %t 2>/dev/null | head -1 || true)
        [[ $state == idle ]] && break
        sleep 0.5
    done
    if [[ $state != idle ]]; then
        tail -5 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
        die "node not idle after ${WAIT_S}s (state '${state:-none}')"
    fi
    STARTING=0
    say "up: partition $PARTITION, node $(hostname -s) idle; pids in $PIDS"
}

cmd_stop() {
    if [[ ! -s $PIDS ]]; then
        say "nothing to stop (no $PIDS)"
        return 0
    fi
    local name pid i order=() jobs
    # Jobs still queued or running (a failed test): cancel them, or their slurmstepd and
    # processes would outlive slurmd. Every job of this cluster is this cluster's user's.
    if ours_running && jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) && [[ -n $jobs ]]; then
        say "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        SLURM_CONF=$CONF scancel $jobs || true
        for ((i = 0; i < 30; i++)); do
            [[ -z $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    # reverse order of starting: slurmd, slurmctld, munged
    mapfile -t order < <(tac "$PIDS")
    for line in "${order[@]}"; do
        read -r name pid <<<"$line"
        if [[ $name == link ]]; then
            if [[ -L $pid && $(readlink "$pid") == "$CONF" ]]; then rm -f "$pid"; fi
            continue
        fi
        if alive "$name" "$pid"; then
            kill "$pid" 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                alive "$name" "$pid" || break
                sleep 0.2
            done
            if alive "$name" "$pid"; then
                kill -9 "$pid" 2>/dev/null || true
                say "$name ($pid) killed with SIGKILL"
            else
                say "stopped $name ($pid)"
            fi
        fi
    done
    rm -f "$PIDS"
}

cmd_status() {
    if ours_running; then
        say "running (state in $STATE):"
        cat "$PIDS"
        SLURM_CONF=$CONF sinfo -N -l || true
    else
        say "not running"
        return 3
    fi
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *)
        echo "usage: $0 start|stop|status|env" >&2
        exit 2
        ;;
esac
