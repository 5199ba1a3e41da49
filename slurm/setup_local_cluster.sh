#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (slurmctld + slurmd + munge, no systemd), plus Open MPI.
# For the cluster tests (tests/cluster/) and for trying slurm/*.sbatch on one box. Debian/Ubuntu, run as root.
#
#   bash slurm/setup_local_cluster.sh            # install (first time), start, wait for an idle node (~10 s)
#   bash slurm/setup_local_cluster.sh --restart  # restart the daemons with a freshly written config
#   bash slurm/setup_local_cluster.sh --stop     # stop what this script started
#
# Idempotent: when the daemons it started are up with the same config, it only checks the node and returns.
# The config lives in $SLURM_DIR (default /tmp/growlength-slurm); /etc/slurm/slurm.conf is pointed at it when
# that file does not exist yet, so plain `sbatch`/`squeue` work. Otherwise: export SLURM_CONF=$SLURM_DIR/slurm.conf
set -euo pipefail
SLURM_DIR=${SLURM_DIR:-/tmp/growlength-slurm}
export SLURM_CONF=$SLURM_DIR/slurm.conf
# A requeued job may start again only cred_expire seconds after it ended (SLURM's default is 120 s);
# 10 s plus a 2-second scheduler pass bring a requeued job back ~11 s after it stopped.
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}
MODE=${1:-start}
APT_OPTS=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
PACKAGES=(slurmctld slurmd slurm-client munge libpmix-dev openmpi-bin libopenmpi-dev)

die() { echo "setup_local_cluster: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages and starts slurmctld/slurmd/munged)"

alive() { local p; p=$(cat "$1" 2>/dev/null || true); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true; }

stop_daemons() {  # only the daemons whose pid files this script's config names
  alive "$SLURM_DIR/slurmctld.pid" && scontrol shutdown >/dev/null 2>&1 || true
  local f p
  for f in slurmctld slurmd; do
    p=$(cat "$SLURM_DIR/$f.pid" 2>/dev/null || true)
    [ -n "$p" ] || continue
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null || true; sleep 0.5; fi
    rm -f "$SLURM_DIR/$f.pid"
  done
}

if [ "$MODE" = --stop ]; then
  stop_daemons
  echo "SLURM daemons stopped (munged left running: kill \$(cat /run/munge/munged.pid) to stop it)"
  exit 0
fi
case "$MODE" in start|--restart) ;; *) die "unknown argument '$MODE' (use --restart or --stop)";; esac

# 1. packages. libpmix-dev holds the unversioned libpmix.so that slurm's mpi/pmix plugin dlopens (srun --mpi=pmix);
#    it must be there before slurmd starts.
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -print -quit 2>/dev/null)" ] || apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install "${APT_OPTS[@]}" "${missing[@]}" >/dev/null \
    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install "${APT_OPTS[@]}" "${missing[@]}"; }
fi

# 2. config (a node named "localhost" so nothing depends on the machine's hostname)
mkdir -p "$SLURM_DIR"/{state,spool,log}
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) - 1024 ))   # a bit under `slurmd -C`
NEW_CONF=$(cat <<EOF
# one-node test cluster, written by growlength's slurm/setup_local_cluster.sh
ClusterName=growlength
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds (default 120) before it may start again
AuthInfo=cred_expire=$CRED_EXPIRE
MailProg=/bin/true
MpiDefault=${SLURM_MPI_DEFAULT:-none}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# schedule often: a requeued job starts within seconds of becoming eligible
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
KillWait=30
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
if [ "$MODE" = start ] && alive "$SLURM_DIR/slurmctld.pid" && alive "$SLURM_DIR/slurmd.pid" \
   && [ "$NEW_CONF" = "$(cat "$SLURM_CONF" 2>/dev/null)" ]; then
  st=$(node_state)
  case "$st" in idle|mixed|allocated)
    echo "SLURM already up (node $st). export SLURM_CONF=$SLURM_CONF"; exit 0;; esac
fi
stop_daemons
printf '%s\n' "$NEW_CONF" > "$SLURM_CONF"
mkdir -p /etc/slurm
if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf; fi

# 3. munge (Debian's postinst normally created the key)
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# 4. daemons (they daemonize themselves and write their pid files)
/usr/sbin/slurmctld
/usr/sbin/slurmd -N localhost

# 5. wait for an idle node
st=
for _ in $(seq 100); do st=$(node_state); [ "$st" = idle ] && break; sleep 0.2; done
if [ "$st" != idle ]; then
  echo "node not idle: '$st'" >&2; tail -n 30 "$SLURM_DIR"/log/*.log >&2; exit 1
fi
echo "SLURM up: 1 node, $CPUS CPUs. export SLURM_CONF=$SLURM_CONF"
