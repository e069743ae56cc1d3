#!/usr/bin/env bash
# A real single-node SLURM for the `slurm` tests: munge, slurmctld and slurmd (2 CPUs, node "localhost"),
# started as root without systemd. Idempotent: installs the Debian packages only if `sinfo` is missing,
# (re)writes /etc/slurm/slurm.conf only when it differs (restarting the daemons), starts those not running, and
# waits until the node is idle. Prints its wall time. Usage: sudo tests/slurm/start_slurm.sh
# (RealMemory is what SLURM hands out, not enforced: no cgroups in a container.)
set -euo pipefail
t0=$(date +%s)
if [ "$(id -u)" -ne 0 ]; then echo "start_slurm.sh: needs root" >&2; exit 1; fi
if ! command -v slurmctld > /dev/null || ! command -v munged > /dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge > /dev/null || { apt-get update -q && apt-get install -y -q slurm-wlm munge > /dev/null; }
fi
CONF=/etc/slurm/slurm.conf
MARK="# cryosiam_dask single-node test cluster"
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
read -r -d '' WANT <<CONF || true
$MARK (tests/slurm/start_slurm.sh)
ClusterName=cryosiam
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# no cgroups in a container: processes tracked by parent pid, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# job history without slurmdbd: one line per finished job in JobCompLoc (sacct needs slurmdbd)
JobCompType=jobcomp/filetxt
JobCompLoc=/var/log/slurm/jobcomp.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# finished jobs stay visible to scontrol/squeue for an hour
MinJobAge=3600
KillWait=10
# jobs share the node: each CPU comes with its share of memory unless --mem is given
DefMemPerCPU=2000
SlurmdTimeout=60
NodeName=localhost CPUs=2 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2> /dev/null; }
if [ "$(cat "$CONF" 2> /dev/null)" != "$WANT" ]; then
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then cp "$CONF" "$CONF.before-cryosiam_dask"; fi
    printf '%s\n' "$WANT" > "$CONF"
    for pid in /run/slurmd.pid /run/slurmctld.pid; do  # restart with the new config
        if running "$pid"; then kill "$(cat "$pid")"; while running "$pid"; do sleep 0.2; done; fi
    done
fi
chown munge:munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2> /dev/null
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
fi
if ! munge -n > /dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged
fi
running /run/slurmctld.pid || /usr/sbin/slurmctld
running /run/slurmd.pid || /usr/sbin/slurmd -N localhost
for _ in $(seq 60); do
    state=$(sinfo -h -n localhost -o %t 2> /dev/null || true)
    case "$state" in idle|mix|alloc) break;; esac
    sleep 1
done
case "$state" in
    idle|mix|alloc) ;;
    *) scontrol update nodename=localhost state=resume 2> /dev/null || true; sleep 2
       state=$(sinfo -h -n localhost -o %t 2> /dev/null || true);;
esac
echo "start_slurm.sh: node localhost is '${state:-down}' ($(sinfo --version)); $(( $(date +%s) - t0 )) s"
case "$state" in idle|mix|alloc) exit 0;; *) exit 1;; esac
