#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine, from Debian's packages, for the
# integration tests: partition `cpu`, and partition `gpu` advertising GRES gpu:2
# (two empty device files stand in for the GPUs). Needs root. Idempotent: a running
# cluster is left alone.
set -euo pipefail

if sinfo -h >/dev/null 2>&1 && [ "$(sinfo -h -o %T -n "$(hostname -s)" | head -1)" = "idle" ]; then
    echo "slurm: already running"; exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

host=$(hostname -s)
cpus=$(nproc)
conf_dir=/etc/slurm
mkdir -p "$conf_dir" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
touch /tmp/fakegpu0 /tmp/fakegpu1

cat > "$conf_dir/slurm.conf" <<CONF
ClusterName=palflow
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
NodeName=$host CPUs=$cpus RealMemory=20000 Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
cat > "$conf_dir/gres.conf" <<CONF
NodeName=$host Name=gpu File=/tmp/fakegpu[0-1]
CONF

# 1. a munge key, 2. munged as the munge user
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- munged
# 3. slurmctld, then slurmd
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
# 4. bring the node into service
for _ in $(seq 1 30); do
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    state=$(sinfo -h -o %T -n "$host" 2>/dev/null | head -1)
    case "$state" in idle|mixed|allocated) echo "slurm: node $host is $state"; exit 0;; esac
    sleep 1
done
echo "slurm: node $host did not come up; see /var/log/slurm/" >&2
sinfo -N -l >&2 || true
exit 1
