#!/usr/bin/env bash
# Start a two-node SLURM cluster on this machine (slurmctld + two slurmd + munge, no systemd), an sshd for pdsh,
# and Open MPI. For the cluster tests (tests/cluster/) and for trying slurm/*.sbatch on one box. Debian/Ubuntu, root.
#
#   bash slurm/setup_local_cluster.sh            # install (first time), start, wait for idle nodes (~10 s)
#   bash slurm/setup_local_cluster.sh --restart  # restart the daemons with a freshly written config
#   bash slurm/setup_local_cluster.sh --stop     # stop what this script started
#
# The two "nodes" are loopback addresses of this machine, and nothing leaves it:
#   growlength-node1 127.0.0.1  slurmd port 6818
#   growlength-node2 127.0.0.2  slurmd port 6819   (names: lines in /etc/hosts, marked, removed by --stop)
# Debian's slurmd runs several daemons on one host (`slurmd -N NAME`, a Port per NodeName, %n in the pid/spool/log
# paths). Each node reports all of this machine's CPUs, so a one-node job fits on either and a two-node job sees
# twice the real cores: a test cluster, not a benchmark one.
# sshd listens on 127.0.0.1 and 127.0.0.2, port $SSH_PORT (default 6822), root by key only, with its own config,
# host key and authorized_keys under $SLURM_DIR/ssh; nothing in /etc/ssh or ~/.ssh changes. ssh and pdsh reach
# the nodes with  export PDSH_SSH_ARGS_APPEND="-F $SLURM_DIR/ssh/ssh_config"  (host-key checking off for these
# hosts only: the file names no others). slurm/pretrain.sbatch uses the same variable for its own ssh.
#
# Idempotent: when the daemons it started are up with the same config, it only checks the nodes and returns.
# The config lives in $SLURM_DIR (default /tmp/growlength-slurm); /etc/slurm/slurm.conf is pointed at it when
# that file does not exist yet, so plain `sbatch`/`squeue` work. Otherwise: export SLURM_CONF=$SLURM_DIR/slurm.conf
set -euo pipefail
SLURM_DIR=${SLURM_DIR:-/tmp/growlength-slurm}
export SLURM_CONF=$SLURM_DIR/slurm.conf
# A requeued job may start again only cred_expire seconds after it ended (SLURM's default is 120 s);
# 10 s plus a 2-second scheduler pass bring a requeued job back ~11 s after it stopped.
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}
SSH_PORT=${SSH_PORT:-6822}
MODE=${1:-start}
APT_OPTS=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
PACKAGES=(slurmctld slurmd slurm-client munge libpmix-dev openmpi-bin libopenmpi-dev pdsh openssh-server openssh-client)
NODES=(growlength-node1 growlength-node2)  # not "localhost": slurm takes a lone node "localhost" for any name
ADDRS=(127.0.0.1 127.0.0.2)            # NodeAddr: loopback only
SLURMD_PORTS=(6818 6819)
SSH_DIR=$SLURM_DIR/ssh
HOSTS_MARK="# growlength local cluster (slurm/setup_local_cluster.sh)"

die() { echo "setup_local_cluster: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages and starts slurmctld/slurmd/munged)"

alive() { local p; p=$(cat "$1" 2>/dev/null || true); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
node_states() { sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ' | sed 's/ $//' || true; }
slurmd_pid() { echo "$SLURM_DIR/slurmd-$1.pid"; }

stop_pidfile() {  # the process a pid file of ours names: wait for it to exit after a shutdown, else TERM it
  local p; p=$(cat "$1" 2>/dev/null || true)
  [ -n "$p" ] || return 0
  for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$p" 2>/dev/null; then kill "$p" 2>/dev/null || true; sleep 0.5; fi
  rm -f "$1"
}

stop_daemons() {  # only the daemons whose pid files this script's config names (slurmd.pid: the one-node layout)
  alive "$SLURM_DIR/slurmctld.pid" && scontrol shutdown >/dev/null 2>&1 || true
  local f
  for f in "$SLURM_DIR/slurmctld.pid" "$SLURM_DIR/slurmd.pid" "$SLURM_DIR"/slurmd-*.pid; do
    [ -e "$f" ] && stop_pidfile "$f"
  done
  if [ -f "$SSH_DIR/sshd.pid" ]; then kill "$(cat "$SSH_DIR/sshd.pid")" 2>/dev/null || true; rm -f "$SSH_DIR/sshd.pid"; fi
}

hosts_without_ours() { grep -vF "$HOSTS_MARK" /etc/hosts || true; }

if [ "$MODE" = --stop ]; then
  stop_daemons
  if grep -qF "$HOSTS_MARK" /etc/hosts 2>/dev/null; then
    hosts_without_ours > /etc/hosts.growlength && cat /etc/hosts.growlength > /etc/hosts && rm -f /etc/hosts.growlength
  fi
  echo "SLURM daemons and sshd stopped (munged left running: kill \$(cat /run/munge/munged.pid) to stop it)"
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

# 2. config (nodes named growlength-node1 and -node2 so nothing depends on the machine's hostname)
mkdir -p "$SLURM_DIR"/{state,spool,log}
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) - 1024 ))   # a bit under `slurmd -C`
NODE_LINES=
for i in "${!NODES[@]}"; do
  NODE_LINES+="NodeName=${NODES[$i]} NodeAddr=${ADDRS[$i]} Port=${SLURMD_PORTS[$i]} \
CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM_MB State=UNKNOWN"$'\n'
done
NEW_CONF=$(cat <<EOF
# two-node test cluster on loopback addresses, written by growlength's slurm/setup_local_cluster.sh
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
# %n: the node name, one directory / pid / log per slurmd on this host
SlurmdSpoolDir=$SLURM_DIR/spool/%n
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd-%n.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd-%n.log
SlurmctldPort=6817
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
${NODE_LINES}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
ssh_ok() {  # key-based root login to every node over our sshd, non-interactively
  local a
  for a in "${ADDRS[@]}"; do
    ssh -F "$SSH_DIR/ssh_config" -o BatchMode=yes -o ConnectTimeout=5 "$a" true </dev/null >/dev/null 2>&1 || return 1
  done
}
all_up() {
  local n
  alive "$SLURM_DIR/slurmctld.pid" && alive "$SSH_DIR/sshd.pid" || return 1
  for n in "${NODES[@]}"; do alive "$(slurmd_pid "$n")" || return 1; done
}
if [ "$MODE" = start ] && all_up && [ "$NEW_CONF" = "$(cat "$SLURM_CONF" 2>/dev/null)" ] && ssh_ok; then
  st=$(node_states)
  case " $st " in *" down "*|*" drained "*|*" unknown "*|"  ") ;;
    *) echo "SLURM already up (nodes: $st). export SLURM_CONF=$SLURM_CONF"; exit 0;; esac
fi
stop_daemons
printf '%s\n' "$NEW_CONF" > "$SLURM_CONF"
mkdir -p /etc/slurm
if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then ln -sfn "$SLURM_CONF" /etc/slurm/slurm.conf; fi

# 3. names: every node name resolves to its loopback address (torch's rendezvous and ssh use the names)
for i in "${!NODES[@]}"; do
  got=$(getent hosts "${NODES[$i]}" | awk '{print $1; exit}' || true)
  if [ "$got" != "${ADDRS[$i]}" ]; then
    [ -z "$got" ] || die "${NODES[$i]} resolves to $got, not ${ADDRS[$i]}: remove that entry from /etc/hosts"
    printf '%s %s %s\n' "${ADDRS[$i]}" "${NODES[$i]}" "$HOSTS_MARK" >> /etc/hosts
  fi
done

# 4. munge (Debian's postinst normally created the key)
[ -s /etc/munge/munge.key ] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

# 5. sshd for pdsh: its own config, host key and client key, on the loopback addresses only
mkdir -p "$SSH_DIR" /run/sshd && chmod 700 "$SSH_DIR"
[ -s "$SSH_DIR/host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$SSH_DIR/host_ed25519_key"
[ -s "$SSH_DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C growlength-local-cluster -f "$SSH_DIR/id_ed25519"
cp "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys" && chmod 600 "$SSH_DIR/authorized_keys"
{
  echo "# sshd for growlength's local test cluster (slurm/setup_local_cluster.sh): loopback only, root by key only"
  echo "Port $SSH_PORT"
  printf 'ListenAddress %s\n' "${ADDRS[@]}"
  echo "HostKey $SSH_DIR/host_ed25519_key"
  echo "PidFile $SSH_DIR/sshd.pid"
  echo "AuthorizedKeysFile $SSH_DIR/authorized_keys"
  printf '%s\n' "PermitRootLogin prohibit-password" "PubkeyAuthentication yes" "PasswordAuthentication no" \
    "KbdInteractiveAuthentication no" "UsePAM no" "X11Forwarding no" "PrintMotd no" \
    "StrictModes no"  # its files live under /tmp (world-writable), which StrictModes refuses
} > "$SSH_DIR/sshd_config"
{
  echo "# ssh client config for growlength's local test cluster: ssh -F $SSH_DIR/ssh_config HOST, or"
  echo "# export PDSH_SSH_ARGS_APPEND=\"-F $SSH_DIR/ssh_config\" (pdsh, slurm/pretrain.sbatch). These hosts only."
  echo "Host ${NODES[*]} ${ADDRS[*]}"
  printf '  %s\n' "User root" "Port $SSH_PORT" "IdentityFile $SSH_DIR/id_ed25519" "IdentitiesOnly yes" \
    "StrictHostKeyChecking no" "UserKnownHostsFile $SSH_DIR/known_hosts" "LogLevel ERROR"
} > "$SSH_DIR/ssh_config"
/usr/sbin/sshd -f "$SSH_DIR/sshd_config"

# 6. slurm daemons (they daemonize themselves and write their pid files): one slurmd per node name
/usr/sbin/slurmctld
for n in "${NODES[@]}"; do /usr/sbin/slurmd -N "$n"; done

# 7. wait for idle nodes and a working ssh
st=
for _ in $(seq 100); do
  st=$(node_states)
  [ "$st" = idle ] && [ "$(sinfo -h -N -o %N | sort -u | wc -l)" = "${#NODES[@]}" ] && break
  sleep 0.2
done
if [ "$st" != idle ]; then
  echo "nodes not idle: '$st'" >&2; sinfo -N >&2; tail -n 30 "$SLURM_DIR"/log/*.log >&2; exit 1
fi
for _ in $(seq 50); do ssh_ok && break; sleep 0.2; done
ssh_ok || die "sshd on ${ADDRS[*]} port $SSH_PORT refuses our key: see ssh -v -F $SSH_DIR/ssh_config ${ADDRS[1]} true"
echo "SLURM up: ${#NODES[@]} nodes (${NODES[*]} at ${ADDRS[*]}), $CPUS CPUs each. export SLURM_CONF=$SLURM_CONF"
echo "ssh and pdsh to the nodes: export PDSH_SSH_ARGS_APPEND=\"-F $SSH_DIR/ssh_config\""
