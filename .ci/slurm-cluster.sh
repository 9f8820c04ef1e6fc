#!/usr/bin/env bash
# Bring up a one-node SLURM on this machine for the tests marked `slurm` (CI and developers' machines):
# Debian's slurmctld + slurmd + slurm-client + munge, CPU-only. Idempotent; needs root (as in CI).
#   bash .ci/slurm-cluster.sh          # install if needed, write config, (re)start daemons, wait until idle
#   bash .ci/slurm-cluster.sh stop
set -euo pipefail
NODE=$(hostname -s)
CONF=/etc/slurm/slurm.conf

if [ "${1:-start}" = stop ]; then
    pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
    exit 0
fi
if [ "$(id -u)" != 0 ]; then echo "slurm-cluster: needs root" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi

mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge /etc/slurm /var/spool/slurmctld /var/spool/slurmd \
         /var/log/slurm /run/slurm
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged" 2>/dev/null || munged --force

CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$CONF" <<CONF
ClusterName=ci
SlurmctldHost=${NODE}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=60
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${NODE} CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=ci Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
pkill -x slurmd || true; pkill -x slurmctld || true
sleep 1
slurmctld -c        # -c: start clean (no jobs left from an earlier cluster)
slurmd
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed|allocated"; then
        echo "slurm-cluster: node ${NODE} up (${CPUS} CPUs)"; exit 0
    fi
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "slurm-cluster: the node did not come up; see /var/log/slurm/" >&2
exit 1
