#!/usr/bin/env bash
# Start a single-node SLURM (munged + slurmctld + slurmd) on 127.0.0.1 for the sweep tests, as root, in a
# container without systemd or cgroups. Everything lives under $DP_SLURM_DIR (default /tmp/dp-slurm);
# prints `export SLURM_CONF=...` for the caller. Debian: apt-get install slurm-wlm munge.
set -euo pipefail
dir="${DP_SLURM_DIR:-/tmp/dp-slurm}"
# a controller that is not running leaves no jobs worth keeping: start from an empty state and spool
if ! pgrep -x slurmctld >/dev/null; then rm -rf "$dir/state" "$dir/spool"; fi
mkdir -p "$dir/state" "$dir/spool" /run/munge
# what slurmd itself detects (`nproc` would follow OMP_NUM_THREADS, which the test environment sets to 1,
# and a controller reconfigured with fewer CPUs than slurmd registers drains the node)
cpus="$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)"
cpus="${cpus:-$(getconf _NPROCESSORS_ONLN)}"
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
cat > "$dir/slurm.conf" <<CONF
ClusterName=dpci
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF="$dir/slurm.conf"
pgrep -x munged >/dev/null || munged --force >&2
pgrep -x slurmctld >/dev/null || slurmctld -i >&2
pgrep -x slurmd >/dev/null || slurmd -N localhost >&2
# already running (a second call): pick up this configuration
scontrol reconfigure >/dev/null 2>&1 || true
# a node an earlier run left drained (e.g. by a configuration that did not match) takes jobs again
if sinfo -h -N -o %T 2>/dev/null | grep -qiE 'drain|inval'; then
  scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
fi
echo "export SLURM_CONF=$SLURM_CONF"
