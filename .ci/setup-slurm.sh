#!/usr/bin/env bash
# Installs and starts a single-node Slurm on this Debian host for the `slurm`
# tests: munge, slurmctld and slurmd (bookworm: 22.05), with 4 fake GPUs as GRES
# on character devices, so jobs see CUDA_VISIBLE_DEVICES as on a real cluster.
# Idempotent: reuses running daemons when the config is unchanged; handles the
# state a previous cluster name left behind. Runs as root.
set -euo pipefail

log() { printf '[setup-slurm] %s\n' "$*" >&2; }

HOST="$(hostname -s)"
CLUSTER="${LLEM_SLURM_CLUSTER:-llemci}"
GPUS=4
CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm

need=()
for pkg in munge slurmctld slurmd slurm-client; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The packages' own services are not started here (no systemd): we start them.
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# -- munge: a 1 KiB key, mode 400, owned by munge; munged runs as munge ------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
if [ ! -s /etc/munge/munge.key ] || [ "$(stat -c %s /etc/munge/munge.key)" -ne 1024 ]; then
  log "creating the munge key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key /var/lib/munge /var/log/munge /run/munge
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
chmod 755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  rm -f /run/munge/munge.socket.2 /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || { log "munged does not answer"; exit 1; }
fi

# -- fake GPUs: character devices (the null device's numbers) --------------------
for i in $(seq 0 $((GPUS - 1))); do
  [ -c "/dev/llemgpu$i" ] || mknod "/dev/llemgpu$i" c 1 3
  chmod 666 "/dev/llemgpu$i"
done

# -- config -------------------------------------------------------------------------
mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
conf="$(mktemp)"
cat >"$conf" <<EOF
# Written by .ci/setup-slurm.sh: one node, $GPUS fake GPUs, no accounting.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
# Ended jobs stay visible to squeue/scontrol this long (there is no sacct here).
MinJobAge=600
# Short scheduling and kill intervals: the tests run many short jobs.
SchedulerParameters=sched_interval=2
KillWait=5
InactiveLimit=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
NodeName=$HOST CPUs=8 Gres=gpu:$GPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=60 State=UP OverSubscribe=NO
EOF
gres="$(mktemp)"
printf 'NodeName=%s Name=gpu File=/dev/llemgpu[0-%d]\n' "$HOST" $((GPUS - 1)) >"$gres"

changed=0
cmp -s "$conf" "$CONF_DIR/slurm.conf" || changed=1
cmp -s "$gres" "$CONF_DIR/gres.conf" || changed=1
if [ "$changed" = 1 ]; then
  log "writing $CONF_DIR/slurm.conf and gres.conf"
  install -m 644 "$conf" "$CONF_DIR/slurm.conf"
  install -m 644 "$gres" "$CONF_DIR/gres.conf"
fi
rm -f "$conf" "$gres"

# A state dir of another cluster name makes slurmctld refuse to start.
if [ -f "$STATE_DIR/clustername" ] && [ "$(cat "$STATE_DIR/clustername")" != "$CLUSTER" ]; then
  log "removing the state of cluster $(cat "$STATE_DIR/clustername")"
  changed=1
  rm -f "$STATE_DIR/clustername"
fi

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {  # by its pid file only: other processes are not ours to end
  local pidfile="$1" pid
  running "$pidfile" || { rm -f "$pidfile"; return 0; }
  pid="$(cat "$pidfile")"
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

if [ "$changed" = 1 ]; then
  stop_daemon /run/slurmd.pid
  stop_daemon /run/slurmctld.pid
fi
if ! running /run/slurmctld.pid; then
  log "starting slurmctld"
  /usr/sbin/slurmctld
fi
for _ in $(seq 1 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! running /run/slurmd.pid; then
  log "starting slurmd"
  /usr/sbin/slurmd
fi

# Bounded wait for the node: idle (or mixed/allocated when jobs already run).
state=""
for _ in $(seq 1 150); do
  state="$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1 || true)"
  case "$state" in
    idle|mixed|allocated) break ;;
    down*|drain*|fail*)  # a node down from an earlier run: bring it back
      scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.2
done
case "$state" in
  idle|mixed|allocated) ;;
  *)
    log "node $HOST is '${state:-unknown}', not idle; logs in $LOG_DIR"
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    exit 1 ;;
esac
log "Slurm up: $(sinfo -h -o '%P %D %G %T' | head -1)"
