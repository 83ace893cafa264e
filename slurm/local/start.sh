#!/usr/bin/env bash
# start.sh - install (if missing) and start a real Slurm cluster on this one
# host, without systemd: one munged, one slurmctld and N slurmd daemons that
# simulate the nodes node1..nodeN (all with NodeAddr=127.0.0.1, each slurmd
# on its own port).  Used by the test suite, by CI, and by anyone who wants to
# try `sbatch` with raft-dist without a real cluster.
#
# Usage (as root):
#   bash slurm/local/start.sh [N]          # N simulated nodes, default 2
#   source "${RAFT_DIST_SLURM_DIR:-/tmp/raft-dist-slurm}/env.sh"
#   sinfo; sbatch -N2 --wrap 'srun hostname'; squeue; scontrol show job ID
#   bash slurm/local/stop.sh               # ends every daemon started here
#
# What it does:
#   - installs Debian's slurmctld, slurmd, slurm-client and munge with
#     apt-get when a needed command is missing (`apt-get update` is run only
#     when the install fails without it);
#   - if a cluster from the same state folder, with the same configuration,
#     is already up and all its nodes answer, says so and exits 0;
#   - otherwise stops the leftovers of an earlier start (by pid file, through
#     stop.sh), wipes the state it created, and starts fresh: munged with a
#     freshly generated key and its own socket, slurmctld, then one
#     `slurmd -N nodeK` per node;
#   - waits (bounded) until `sinfo` shows every node idle, printing the tail
#     of the daemons' logs and failing if they do not come up;
#   - writes <state>/env.sh, to be sourced by whoever uses the cluster.
#
# Knobs (environment variables):
#   N (first argument)             number of simulated nodes (1-64), default 2;
#                                  RAFT_DIST_SLURM_NODES is read when no
#                                  argument is given
#   RAFT_DIST_SLURM_DIR            state folder holding slurm.conf, env.sh, the
#                                  munge key and socket, spool and state
#                                  folders, logs and pid files; default
#                                  /tmp/raft-dist-slurm
#   RAFT_DIST_SLURM_CTLD_PORT      SlurmctldPort, default 16817
#   RAFT_DIST_SLURM_NODE_PORT      port of node1's slurmd, nodeK gets this+K-1;
#                                  default 16818
#   RAFT_DIST_SLURM_CPUS           CPUs each simulated node offers, default 2
#                                  (nodes overcommit the host's cores)
#   RAFT_DIST_SLURM_KILL_WAIT      KillWait: seconds between SIGTERM and SIGKILL
#                                  when a job is cancelled, requeued or runs out
#                                  of time, default 10 (Slurm's own is 30)
#   RAFT_DIST_SLURM_START_TIMEOUT  seconds to wait for the nodes, default 30
#
# Notes:
#   - Job steps (srun) work across the simulated nodes: each slurmd is its own
#     node to Slurm, although all of them run their tasks on this host.
#   - AuthInfo cred_expire=5 lets a requeued job start again about 6-7 s after
#     `scontrol requeue` (Slurm's default would be 120 s).
#   - A job that is cancelled or requeued within a split second of starting
#     can miss the SIGTERM (Slurm sends it before the batch script runs) and
#     then ends only at SIGKILL, KillWait seconds later: wait until the job
#     has visibly started (e.g. a line in its output) before signalling it.
#   - The slurmd and slurmctld logs show harmless "mpi/pmix ... can not load
#     PMIx library" errors: Debian ships the pmix plugin without the library.
#
# Layout of the state folder:
#   slurm.conf env.sh task-prolog.sh
#   munge/munge.key munge/run/munge.socket.2 munge/run/munged.pid
#   munge/log/munged.log munge/lib/munged.seed
#   ctld/state/ (StateSaveLocation)  spool/nodeK/ (SlurmdSpoolDir)
#   run/slurmctld.pid run/slurmd-nodeK.pid
#   log/slurmctld.log log/slurmd-nodeK.log

set -euo pipefail

PATH="$PATH:/usr/sbin:/sbin"
export PATH

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

n_nodes="${1:-${RAFT_DIST_SLURM_NODES:-2}}"
state_dir="${RAFT_DIST_SLURM_DIR:-/tmp/raft-dist-slurm}"
ctld_port="${RAFT_DIST_SLURM_CTLD_PORT:-16817}"
node_port="${RAFT_DIST_SLURM_NODE_PORT:-16818}"
node_cpus="${RAFT_DIST_SLURM_CPUS:-2}"
kill_wait="${RAFT_DIST_SLURM_KILL_WAIT:-10}"
start_timeout="${RAFT_DIST_SLURM_START_TIMEOUT:-30}"

die() {
    echo "start.sh: error: $*" >&2
    exit 1
}

say() {
    echo "start.sh: $*"
}

# Checks that $2 is a whole number from $3 to $4 and prints it in base 10.
check_uint() {
    local what="$1" value="$2" lo="$3" hi="$4"
    if ! [[ "$value" =~ ^[0-9]{1,6}$ ]] || ((10#$value < lo || 10#$value > hi)); then
        die "$what must be a whole number from $lo to $hi, got '$value'"
    fi
    echo "$((10#$value))"
}

n_nodes="$(check_uint N "$n_nodes" 1 64)"
ctld_port="$(check_uint RAFT_DIST_SLURM_CTLD_PORT "$ctld_port" 1024 65000)"
node_port="$(check_uint RAFT_DIST_SLURM_NODE_PORT "$node_port" 1024 $((65001 - n_nodes)))"
node_cpus="$(check_uint RAFT_DIST_SLURM_CPUS "$node_cpus" 1 1024)"
kill_wait="$(check_uint RAFT_DIST_SLURM_KILL_WAIT "$kill_wait" 1 3600)"
start_timeout="$(check_uint RAFT_DIST_SLURM_START_TIMEOUT "$start_timeout" 1 3600)"
if ((ctld_port >= node_port && ctld_port < node_port + n_nodes)); then
    die "SlurmctldPort $ctld_port falls inside the slurmd ports $node_port-$((node_port + n_nodes - 1))"
fi

[[ "$(id -u)" == 0 ]] ||
    die "must run as root (slurmd launches jobs and SlurmUser=root); try: sudo bash $0 $n_nodes"

case "$state_dir" in
    /*) ;;
    *) state_dir="$PWD/$state_dir" ;;
esac
state_dir="${state_dir%/}"
[[ -n "$state_dir" && "$state_dir" != "/" ]] || die "RAFT_DIST_SLURM_DIR must not be /"
[[ "$state_dir" =~ ^[A-Za-z0-9/._-]+$ ]] ||
    die "RAFT_DIST_SLURM_DIR may only hold letters, digits and / . _ - (got '$state_dir')"
export RAFT_DIST_SLURM_DIR="$state_dir"

conf="$state_dir/slurm.conf"
env_file="$state_dir/env.sh"
munge_dir="$state_dir/munge"
munge_key="$munge_dir/munge.key"
munge_socket="$munge_dir/run/munge.socket.2"
munge_pid="$munge_dir/run/munged.pid"
munge_log="$munge_dir/log/munged.log"
ctld_pid="$state_dir/run/slurmctld.pid"
ctld_log="$state_dir/log/slurmctld.log"
# Every daemon is started with this variable set: stop.sh uses it to tell the
# processes started from this state folder from anything else on the host.
daemon_mark="RAFT_DIST_SLURM_DAEMON_OF=$state_dir"
# TaskProlog: puts RAFT_DIST_SLURM_TASK_OF=<state folder> into the environment
# of every job task (batch scripts included), so that stop.sh can also end job
# processes that escaped Slurm's process tracking (proctrack/linuxproc loses a
# background process whose parent shell exited).
task_prolog="$state_dir/task-prolog.sh"

export SLURM_CONF="$conf"

# --- packages ---------------------------------------------------------------

needed_cmds=(munged mungekey munge unmunge slurmctld slurmd slurmstepd sinfo
    squeue sbatch srun scontrol scancel)

missing_cmds() {
    local c out=()
    for c in "${needed_cmds[@]}"; do
        command -v "$c" >/dev/null 2>&1 || out+=("$c")
    done
    echo "${out[*]}"
}

ensure_packages() {
    local missing
    missing="$(missing_cmds)"
    [[ -z "$missing" ]] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "missing commands ($missing) and no apt-get to install slurmctld slurmd slurm-client munge"
    say "installing slurmctld slurmd slurm-client munge (missing: $missing)"
    local pkgs=(slurmctld slurmd slurm-client munge)
    local apt_opts=(-y -q --no-install-recommends)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${pkgs[@]}"; then
        say "install failed; running apt-get update and trying again"
        apt-get update -q || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install "${apt_opts[@]}" "${pkgs[@]}" ||
            die "apt-get install ${pkgs[*]} failed"
    fi
    missing="$(missing_cmds)"
    [[ -z "$missing" ]] || die "still missing after install: $missing"
}

# --- configuration ----------------------------------------------------------

host="$(hostname -s)"
[[ -n "$host" ]] || die "hostname -s printed nothing"

render_conf() {
    local k
    cat <<EOF
# Local Slurm cluster of raft-dist, written by slurm/local/start.sh.
# $n_nodes simulated nodes on host $host; do not edit (start.sh rewrites it).
ClusterName=raftdist
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_socket,cred_expire=5
StateSaveLocation=$state_dir/ctld/state
SlurmdSpoolDir=$state_dir/spool/%n
SlurmctldPidFile=$ctld_pid
SlurmdPidFile=$state_dir/run/slurmd-%n.pid
SlurmctldLogFile=$ctld_log
SlurmdLogFile=$state_dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
PreemptType=preempt/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
TaskProlog=$task_prolog
MailProg=/bin/true
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
InactiveLimit=0
KillWait=$kill_wait
SlurmdTimeout=60
SlurmctldTimeout=60
EOF
    for ((k = 1; k <= n_nodes; k++)); do
        echo "NodeName=node$k NodeAddr=127.0.0.1 NodeHostname=$host Port=$((node_port + k - 1)) CPUs=$node_cpus State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$n_nodes] Default=YES MaxTime=INFINITE State=UP"
}

render_env() {
    cat <<EOF
# Source this file to use the local Slurm cluster started by
# slurm/local/start.sh from $state_dir:
#   source $env_file
# The client commands (sbatch, srun, squeue, scontrol, scancel, sinfo) read
# SLURM_CONF; slurm.conf names munge's socket (AuthInfo=socket=...).
# For the munge command line tools: munge --socket=$munge_socket
export SLURM_CONF=$conf
export RAFT_DIST_SLURM_DIR=$state_dir
EOF
}

print_usage() {
    cat <<EOF
start.sh: local Slurm cluster up: $n_nodes node(s) node1..node$n_nodes, partition debug, state in $state_dir
To use it:
  source $env_file      # exports SLURM_CONF=$conf
  sinfo; sbatch -N$n_nodes --wrap 'srun hostname'; squeue; scontrol show job ID
To stop it:
  RAFT_DIST_SLURM_DIR=$state_dir bash $here/stop.sh
EOF
}

# --- helpers ----------------------------------------------------------------

pid_alive() {
    local f="$1" pid
    [[ -r "$f" ]] || return 1
    pid="$({ tr -dc '0-9' <"$f"; } 2>/dev/null)" || return 1
    [[ -n "$pid" ]] || return 1
    [[ -r "/proc/$pid/environ" ]] || return 1
    tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "$daemon_mark"
}

# Prints "name state" lines for the nodes, as slurmctld sees them.
node_states() {
    timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | sort -u
}

# True when all N nodes are known and in a usable state (idle, or busy with
# jobs).  With "idle" as argument, only idle counts.
nodes_ready() {
    local want="${1:-any}" states st k ok=0
    states="$(node_states)" || return 1
    [[ -n "$states" ]] || return 1
    for ((k = 1; k <= n_nodes; k++)); do
        st="$(awk -v n="node$k" '$1 == n {print $2}' <<<"$states")"
        case "$want:$st" in
            idle:idle) ok=$((ok + 1)) ;;
            any:idle | any:mixed | any:allocated | any:completing) ok=$((ok + 1)) ;;
            *) ;;
        esac
    done
    # All N nodes, and no other node.
    ((ok == n_nodes)) && [[ "$(wc -l <<<"$states")" == "$n_nodes" ]]
}

cluster_is_up() {
    local k
    [[ -f "$conf" && -f "$env_file" && -x "$task_prolog" ]] || return 1
    cmp -s "$conf" <(render_conf) || return 1
    pid_alive "$munge_pid" || return 1
    pid_alive "$ctld_pid" || return 1
    for ((k = 1; k <= n_nodes; k++)); do
        pid_alive "$state_dir/run/slurmd-node$k.pid" || return 1
    done
    nodes_ready any
}

show_logs() {
    local f
    for f in "$@"; do
        [[ -f "$f" ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 25 "$f" >&2 || true
    done
}

all_logs() {
    local k out=("$munge_log" "$ctld_log")
    for ((k = 1; k <= n_nodes; k++)); do
        out+=("$state_dir/log/slurmd-node$k.log")
    done
    printf '%s\n' "${out[@]}"
}

fail_start() {
    local logs
    echo "start.sh: error: $*" >&2
    mapfile -t logs < <(all_logs)
    show_logs "${logs[@]}"
    echo "start.sh: stopping what was started; logs stay in $state_dir/log and $munge_dir/log" >&2
    bash "$here/stop.sh" >&2 || true
    exit 1
}

port_in_use() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# Waits until the file named by $1 exists and names a live daemon of ours.
wait_pid_file() {
    local f="$1" secs="$2" i
    for ((i = 0; i < secs * 10; i++)); do
        pid_alive "$f" && return 0
        sleep 0.1
    done
    return 1
}

# --- main -------------------------------------------------------------------

ensure_packages

if cluster_is_up; then
    say "a cluster from $state_dir is already up; nothing to do"
    node_states | sed 's/^/start.sh:   /'
    print_usage
    exit 0
fi

t0=$SECONDS

# Leftovers of an earlier start from this state folder.
bash "$here/stop.sh" >/dev/null

for ((p = node_port; p < node_port + n_nodes; p++)); do
    ! port_in_use "$p" || die "port $p (slurmd) is already in use on this host; set RAFT_DIST_SLURM_NODE_PORT"
done
! port_in_use "$ctld_port" || die "port $ctld_port (slurmctld) is already in use on this host; set RAFT_DIST_SLURM_CTLD_PORT"

# Fresh state: remove only what this script creates.
mkdir -p "$state_dir"
rm -rf "${state_dir:?}/munge" "${state_dir:?}/ctld" "${state_dir:?}/spool" \
    "${state_dir:?}/run" "${state_dir:?}/log" "$conf" "$env_file" "$task_prolog"
chmod 755 "$state_dir"
mkdir -p "$munge_dir/run" "$munge_dir/log" "$munge_dir/lib" \
    "$state_dir/ctld/state" "$state_dir/run" "$state_dir/log"
for ((k = 1; k <= n_nodes; k++)); do
    mkdir -p "$state_dir/spool/node$k"
done
chmod 700 "$munge_dir/log" "$munge_dir/lib"
chmod 755 "$munge_dir" "$munge_dir/run"

render_conf >"$conf"
render_env >"$env_file"
printf '#!/bin/sh\necho "export RAFT_DIST_SLURM_TASK_OF=%s"\n' "$state_dir" >"$task_prolog"
chmod 644 "$conf" "$env_file"
chmod 755 "$task_prolog"

# munged, with its own key and socket.
mungekey --create --keyfile="$munge_key" --force >/dev/null 2>&1 ||
    dd if=/dev/urandom of="$munge_key" bs=1024 count=1 status=none
chmod 400 "$munge_key"
env "$daemon_mark" munged \
    --key-file="$munge_key" \
    --socket="$munge_socket" \
    --pid-file="$munge_pid" \
    --log-file="$munge_log" \
    --seed-file="$munge_dir/lib/munged.seed" ||
    fail_start "munged did not start"
wait_pid_file "$munge_pid" 10 || fail_start "munged wrote no pid file"
ok=0
for ((i = 0; i < 50; i++)); do
    if [[ -S "$munge_socket" ]] &&
        munge --socket="$munge_socket" -n 2>/dev/null | unmunge --socket="$munge_socket" >/dev/null 2>&1; then
        ok=1
        break
    fi
    sleep 0.1
done
((ok)) || fail_start "munged does not answer on $munge_socket"

# slurmctld.
env "$daemon_mark" slurmctld -f "$conf" || fail_start "slurmctld did not start"
wait_pid_file "$ctld_pid" 15 || fail_start "slurmctld wrote no pid file"
ok=0
for ((i = 0; i < start_timeout * 2; i++)); do
    if timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
        ok=1
        break
    fi
    pid_alive "$ctld_pid" || fail_start "slurmctld exited"
    sleep 0.5
done
((ok)) || fail_start "slurmctld does not answer on port $ctld_port"

# One slurmd per simulated node.
for ((k = 1; k <= n_nodes; k++)); do
    env "$daemon_mark" slurmd -f "$conf" -N "node$k" || fail_start "slurmd for node$k did not start"
done
for ((k = 1; k <= n_nodes; k++)); do
    wait_pid_file "$state_dir/run/slurmd-node$k.pid" 15 || fail_start "slurmd for node$k wrote no pid file"
done

ok=0
deadline=$((SECONDS + start_timeout))
while ((SECONDS < deadline)); do
    if nodes_ready idle; then
        ok=1
        break
    fi
    sleep 0.5
done
((ok)) || fail_start "the nodes are not all idle after ${start_timeout}s; sinfo says: $(node_states | tr '\n' ';')"

say "started in $((SECONDS - t0))s"
node_states | sed 's/^/start.sh:   /'
print_usage
