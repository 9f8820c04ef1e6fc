#!/usr/bin/env bash
# Bring up SLURM on this machine for the tests marked `slurm` (CI and developers' machines): Debian's
# slurmctld + slurmd + slurm-client + munge, CPU-only. Idempotent; needs root (as in CI).
#   bash .ci/slurm-cluster.sh              # one node (this host), as before
#   bash .ci/slurm-cluster.sh --nodes 2    # N emulated nodes node1..nodeN, each a real slurmd
#   bash .ci/slurm-cluster.sh stop
#
# How N nodes live on one machine: each node is a network namespace (`ip netns`) with its own address
# (10.77.0.1i on a bridge, br-slurm, whose host side 10.77.0.1 is the controller's address) and its own UTS
# namespace (`unshare --uts`), so its hostname is nodeI. One slurmd runs inside each (slurmd -N nodeI, its
# spool/pid/log per node), and every job step it starts runs in that node's namespaces: ranks on node1 and
# node2 talk over the bridge as separate hosts would, by name (/etc/hosts) and address. The filesystem is
# shared (like a cluster's shared storage), and so is munge's socket. Nothing needs network access.
set -euo pipefail
CONF=/etc/slurm/slurm.conf
NODES=1
[ "${1:-}" = --nodes ] && NODES=${2:?--nodes N}

if [ "${1:-start}" = stop ]; then
    pkill -x slurmd || true; pkill -x slurmctld || true; pkill -x munged || true
    for ns in $(ip netns list 2>/dev/null | awk '/^node[0-9]/ {print $1}'); do ip netns del "$ns" || true; done
    ip link del br-slurm 2>/dev/null || true
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
HOST=$(hostname -s)
pkill -x slurmd || true; pkill -x slurmctld || true
for _ in $(seq 20); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || break; sleep 0.5; done
for ns in $(ip netns list 2>/dev/null | awk '/^node[0-9]/ {print $1}'); do ip netns del "$ns" || true; done
ip link del br-slurm 2>/dev/null || true
sed -i '/# slurm-cluster.sh$/d' /etc/hosts
if [ "$NODES" -gt 1 ]; then
    ip link add br-slurm type bridge
    ip addr add 10.77.0.1/24 dev br-slurm
    ip link set br-slurm up
    CTL="${HOST}(10.77.0.1)"
    NODELINES=""
    for i in $(seq "$NODES"); do
        ip link del "veth-node$i" 2>/dev/null || true  # left over when the old namespace was still busy
        ip netns add "node$i"
        ip link add "veth-node$i" type veth peer name eth0 netns "node$i"
        ip link set "veth-node$i" master br-slurm up
        ip -n "node$i" addr add "10.77.0.1$i/24" dev eth0
        ip -n "node$i" link set eth0 up
        ip -n "node$i" link set lo up
        ip -n "node$i" route add default via 10.77.0.1
        echo "10.77.0.1$i node$i # slurm-cluster.sh" >> /etc/hosts
        NODELINES+="NodeName=node$i NodeAddr=10.77.0.1$i CPUs=${CPUS} RealMemory=$((MEM / NODES)) State=UNKNOWN"$'\n'
    done
    echo "10.77.0.1 ${HOST}-ctl # slurm-cluster.sh" >> /etc/hosts
    PARTITION_NODES="node[1-${NODES}]"
else
    CTL="${HOST}"
    NODELINES="NodeName=${HOST} CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN"
    PARTITION_NODES="${HOST}"
fi
cat > "$CONF" <<CONF
ClusterName=ci
SlurmctldHost=${CTL}
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
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
${NODELINES}
PartitionName=ci Nodes=${PARTITION_NODES} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
sleep 1
slurmctld -c        # -c: start clean (no jobs left from an earlier cluster)
if [ "$NODES" -gt 1 ]; then
    for i in $(seq "$NODES"); do
        mkdir -p "/var/spool/slurmd/node$i"
        # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mount slurmd needs
        nsenter --net="/run/netns/node$i" unshare --uts sh -c "hostname node$i && exec slurmd -N node$i"
    done
else
    mkdir -p "/var/spool/slurmd/${HOST}"
    slurmd
fi
for _ in $(seq 60); do
    UP=$(sinfo -h -N -o %T 2>/dev/null | grep -cE "idle|mixed|allocated" || true)
    if [ "$UP" -ge "$NODES" ]; then
        echo "slurm-cluster: ${NODES} node(s) up: $(sinfo -h -N -o %N | tr '\n' ' ')(${CPUS} CPUs each)"; exit 0
    fi
    scontrol update nodename="${PARTITION_NODES}" state=resume >/dev/null 2>&1 || true
    sleep 1
done
echo "slurm-cluster: the node did not come up; see /var/log/slurm/" >&2
exit 1
