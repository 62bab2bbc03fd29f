#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the cluster tests:
#   tests/cluster/slurm.sh start   install Debian's slurm-wlm if needed, write slurm.conf, start the daemons
#   tests/cluster/slurm.sh stop    stop the daemons, remove the cluster's state and slurm.conf
# The config goes to the default /etc/slurm/slurm.conf: Snakemake's job steps drop SLURM_CONF from
# the environment of their srun. An existing slurm.conf not written here is never overwritten.
# Needs root (apt, /etc/slurm, the daemons): `make test-cluster` runs it with sudo when not root.
# No systemd here: the daemons are started directly. No munge and no accounting database:
# AuthType=auth/none, and Snakemake must query job states with squeue (sacct has nothing to say).
set -euo pipefail

STATE=${SLURM_TEST_DIR:-/tmp/metascreen-slurm}
PARTITION=${SLURM_TEST_PARTITION:-test}
CONF=/etc/slurm/slurm.conf
MARK="# metascreen test cluster (tests/cluster/slurm.sh)"

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
}

write_conf() {
    local node cpus memory_mb
    node=$(hostname -s)
    cpus=$(nproc)
    # Leave 1 GB to the system; SLURM refuses jobs that ask for more than RealMemory.
    memory_mb=$(($(free -m | awk '/^Mem:/ {print $2}') - 1024))
    if [ -e "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        echo "slurm.sh: $CONF exists and is not the test cluster's; not overwriting it" >&2
        exit 1
    fi
    mkdir -p "$STATE/ctld" "$STATE/d" "$STATE/log" "$(dirname "$CONF")"
    cat >"$CONF" <<CONF
$MARK
ClusterName=metascreen-test
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# squeue reports finished jobs for MinJobAge seconds: Snakemake's status checks rely on it.
MinJobAge=600
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$node CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    install_slurm
    stop_daemons
    write_conf
    slurmctld -f "$CONF" -c
    slurmd -f "$CONF"
    for _ in $(seq 60); do
        if sinfo --noheader --states=idle --format=%n 2>/dev/null | grep -q .; then
            echo "slurm.sh: partition $PARTITION of node $(hostname -s) is up"
            return
        fi
        sleep 1
    done
    echo "slurm.sh: the node did not become idle; see $STATE/log" >&2
    tail -n 20 "$STATE"/log/*.log >&2 || true
    exit 1
}

stop_daemons() {
    local daemon pid
    for daemon in slurmd slurmctld; do
        [ -f "$STATE/$daemon.pid" ] || continue
        pid=$(cat "$STATE/$daemon.pid")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        rm -f "$STATE/$daemon.pid"
    done
}

stop() {
    stop_daemons
    rm -rf "$STATE"
    if [ -e "$CONF" ] && grep -qF "$MARK" "$CONF"; then
        rm -f "$CONF"
    fi
}

case ${1:-} in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
