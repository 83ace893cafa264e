#!/usr/bin/env bash
# stop.sh - stop the local Slurm cluster that slurm/local/start.sh started.
#
# Usage (as root):
#   bash slurm/local/stop.sh
#
# It ends exactly the daemons start.sh started from the state folder: the
# slurmd of every simulated node, slurmctld and munged, found by their pid
# files under the state folder.  A pid is trusted only when the process
# carries the mark that start.sh puts in the environment of every daemon it
# starts (RAFT_DIST_SLURM_DAEMON_OF=<state folder>), so a stale pid file can
# never make it kill some other process.  Before that it cancels the jobs still
# known to slurmctld; after it, it ends what the daemons themselves started
# (slurmstepd, the job processes under them, and job processes that outlived
# their parent, which carry RAFT_DIST_SLURM_TASK_OF=<state folder> put there
# by the cluster's TaskProlog), so nothing is left behind.
# Each group gets SIGTERM, a bounded wait, then SIGKILL.  Nothing is ever
# killed by name.  Running it when nothing runs is fine: it exits 0.
# The state folder itself (logs, slurm.conf) is kept; start.sh wipes it.
#
# Knobs (environment variables):
#   RAFT_DIST_SLURM_DIR           state folder, default /tmp/raft-dist-slurm
#   RAFT_DIST_SLURM_STOP_TIMEOUT  seconds to wait for each group of processes
#                                 after SIGTERM before SIGKILL, default 15
# (The ports are those in <state folder>/slurm.conf; see start.sh.)

set -euo pipefail

PATH="$PATH:/usr/sbin:/sbin"
export PATH

state_dir="${RAFT_DIST_SLURM_DIR:-/tmp/raft-dist-slurm}"
stop_timeout="${RAFT_DIST_SLURM_STOP_TIMEOUT:-15}"

die() {
    echo "stop.sh: error: $*" >&2
    exit 1
}

say() {
    echo "stop.sh: $*"
}

[[ "$stop_timeout" =~ ^[0-9]+$ ]] || die "RAFT_DIST_SLURM_STOP_TIMEOUT must be a whole number of seconds"

case "$state_dir" in
    /*) ;;
    *) state_dir="$PWD/$state_dir" ;;
esac
state_dir="${state_dir%/}"
[[ -n "$state_dir" && "$state_dir" != "/" ]] || die "RAFT_DIST_SLURM_DIR must not be /"

conf="$state_dir/slurm.conf"
munge_pid_file="$state_dir/munge/run/munged.pid"
ctld_pid_file="$state_dir/run/slurmctld.pid"
daemon_mark="RAFT_DIST_SLURM_DAEMON_OF=$state_dir"
task_mark="RAFT_DIST_SLURM_TASK_OF=$state_dir"

# "pid starttime" of a process, so that a recycled pid is never mistaken for
# one seen earlier; prints nothing for a zombie or a process that is gone.
proc_id() {
    local pid="$1" line rest
    local -a fld
    { read -r line <"/proc/$pid/stat"; } 2>/dev/null || return 0
    rest="${line##*) }"
    read -r -a fld <<<"$rest"
    [[ "${fld[0]}" != Z && "${fld[0]}" != X ]] || return 0
    echo "$pid ${fld[19]}"
}

is_marked() {
    [[ -r "/proc/$1/environ" ]] &&
        tr '\0' '\n' <"/proc/$1/environ" 2>/dev/null | grep -qxF "$daemon_mark"
}

# Pid named by a pid file, when that process is one of ours and alive.
pid_from_file() {
    local f="$1" pid
    [[ -r "$f" ]] || return 0
    pid="$({ tr -dc '0-9' <"$f"; } 2>/dev/null)" || return 0
    [[ -n "$pid" ]] || return 0
    [[ -n "$(proc_id "$pid")" ]] || return 0
    is_marked "$pid" || return 0
    echo "$pid"
}

# Fills the global map "parent" (pid -> parent pid) from /proc.
declare -A parent=()
read_parents() {
    local f line rest
    local -a fld
    parent=()
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        rest="${line##*) }"
        read -r -a fld <<<"$rest"
        parent["${line%% *}"]="${fld[1]}"
    done
}

# Prints the given pids and all their descendants (per "parent").
descendants() {
    local -A keep=()
    local pid grew=1
    for pid in "$@"; do keep["$pid"]=1; done
    while ((grew)); do
        grew=0
        for pid in "${!parent[@]}"; do
            if [[ -z "${keep[$pid]:-}" && -n "${keep[${parent[$pid]}]:-}" ]]; then
                keep["$pid"]=1
                grew=1
            fi
        done
    done
    printf '%s\n' "${!keep[@]}"
}

# This script, its subshells and its ancestors are never to be ended, even
# when it runs inside a job of the cluster.
declare -A ancestors=()
find_ancestors() {
    local pid="$$"
    read_parents
    while [[ -n "$pid" && "$pid" != 0 && -z "${ancestors[$pid]:-}" ]]; do
        ancestors["$pid"]=1
        pid="${parent[$pid]:-}"
    done
}

is_self() {
    local pid="$1" line rest n=0
    local -a fld
    [[ -z "${ancestors[$pid]:-}" ]] || return 0
    while ((pid > 1 && n < 4096)); do
        [[ "$pid" != "$$" ]] || return 0
        { read -r line <"/proc/$pid/stat"; } 2>/dev/null || return 1
        rest="${line##*) }"
        read -r -a fld <<<"$rest"
        pid="${fld[1]}"
        n=$((n + 1))
    done
    return 1
}

# Every live process, other than this script's own, whose environment holds
# the line given as argument.
marked_pids() {
    local f pid
    while read -r f; do
        pid="${f#/proc/}"
        pid="${pid%/environ}"
        if [[ -n "$(proc_id "$pid")" ]] && ! is_self "$pid"; then
            echo "$pid"
        fi
    done < <(grep -lzxF "$1" /proc/[0-9]*/environ 2>/dev/null || true)
}

# Everything the cluster started, as "pid starttime" lines: the given pids,
# the processes carrying either mark, and all their descendants.
cluster_procs() {
    local pid
    local -a roots=("$@")
    mapfile -t -O "${#roots[@]}" roots < <(marked_pids "$daemon_mark")
    mapfile -t -O "${#roots[@]}" roots < <(marked_pids "$task_mark")
    read_parents
    for pid in $(descendants "${roots[@]}"); do
        is_self "$pid" || proc_id "$pid"
    done
}

# Arguments: "pid starttime" words; prints those still alive as the same
# process.
still_alive() {
    local pid st
    while (($# >= 2)); do
        pid="$1" st="$2"
        shift 2
        [[ "$(proc_id "$pid")" == "$pid $st" ]] && echo "$pid $st"
    done
    return 0
}

# Sends SIGTERM to the given "pid starttime" words, waits up to stop_timeout
# seconds, then sends SIGKILL to what is left and waits for it.
term_wait() {
    local what="$1"
    shift
    local -a ids left
    read -r -a ids <<<"$*"
    ((${#ids[@]})) || return 0
    local i
    for ((i = 0; i < ${#ids[@]}; i += 2)); do
        kill -TERM "${ids[i]}" 2>/dev/null || true
    done
    for ((i = 0; i < stop_timeout * 10; i++)); do
        read -r -a left <<<"$(still_alive "${ids[@]}" | tr '\n' ' ')"
        ((${#left[@]})) || return 0
        sleep 0.1
    done
    say "$what still running after ${stop_timeout}s; sending SIGKILL"
    for ((i = 0; i < ${#left[@]}; i += 2)); do
        kill -KILL "${left[i]}" 2>/dev/null || true
    done
    for ((i = 0; i < 50; i++)); do
        read -r -a left <<<"$(still_alive "${ids[@]}" | tr '\n' ' ')"
        ((${#left[@]})) || return 0
        sleep 0.1
    done
    say "warning: could not end $what: pids $(printf '%s ' "${left[@]}")"
    return 1
}

ids_of() {
    local pid
    for pid in "$@"; do
        proc_id "$pid"
    done | tr '\n' ' '
}

find_ancestors

slurmd_pids=()
for pid_file in "$state_dir"/run/slurmd-*.pid; do
    [[ -e "$pid_file" ]] || continue
    pid="$(pid_from_file "$pid_file")"
    [[ -n "$pid" ]] && slurmd_pids+=("$pid")
done
ctld_pid="$(pid_from_file "$ctld_pid_file")"
munge_pid="$(pid_from_file "$munge_pid_file")"
daemon_pids=("${slurmd_pids[@]}")
[[ -n "$ctld_pid" ]] && daemon_pids+=("$ctld_pid")
[[ -n "$munge_pid" ]] && daemon_pids+=("$munge_pid")
mapfile -t family < <(cluster_procs "${daemon_pids[@]}")

if ((${#family[@]} == 0)); then
    rm -f "$state_dir"/run/*.pid "$munge_pid_file"
    say "nothing runs from $state_dir"
    exit 0
fi

# Cancel the jobs still known to slurmctld, so that their processes end the
# way Slurm ends them, then give them a bounded time to go.
if [[ -n "$ctld_pid" && -f "$conf" ]]; then
    mapfile -t jobs < <(SLURM_CONF="$conf" timeout 10 squeue -h -o %A 2>/dev/null || true)
    if ((${#jobs[@]})); then
        say "cancelling ${#jobs[@]} job(s): ${jobs[*]}"
        SLURM_CONF="$conf" timeout 10 scancel "${jobs[@]}" 2>/dev/null || true
        for ((i = 0; i < stop_timeout * 4; i++)); do
            left_jobs="$(SLURM_CONF="$conf" timeout 5 squeue -h -o %A 2>/dev/null || true)"
            [[ -n "$left_jobs" ]] || break
            sleep 0.25
        done
    fi
fi

# Everything the daemons started (slurmstepd and job processes), taken before
# the daemons go, while the descendants can still be told by their parents.
mapfile -t family < <(cluster_procs "${daemon_pids[@]}")

rc=0
# shellcheck disable=SC2046
term_wait "slurmd (${#slurmd_pids[@]})" $(ids_of "${slurmd_pids[@]}") || rc=1
if [[ -n "$ctld_pid" ]]; then
    # shellcheck disable=SC2046
    term_wait slurmctld $(ids_of "$ctld_pid") || rc=1
fi
if [[ -n "$munge_pid" ]]; then
    # shellcheck disable=SC2046
    term_wait munged $(ids_of "$munge_pid") || rc=1
fi

# Leftovers: slurmstepd and job processes.
mapfile -t -O "${#family[@]}" family < <(cluster_procs)
# shellcheck disable=SC2046
set -- $(still_alive $(printf '%s\n' "${family[@]}" | sort -u | tr '\n' ' '))
if (($#)); then
    say "ending $(($# / 2)) leftover process(es) of the cluster"
    term_wait "leftover processes" "$@" || rc=1
fi

rm -f "$state_dir"/run/*.pid "$munge_pid_file"
if ((rc)); then
    say "some processes could not be ended"
    exit 1
fi
say "stopped the cluster of $state_dir"
