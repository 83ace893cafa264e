# shellcheck shell=bash
# slurm/common.sh - the part every raft-dist sbatch template shares. Sourced, never run.
#
# A template sets its defaults, sources this file and calls `raft_dist_main`. What lives here:
# environment activation, the run folder, the main address and port, one `raft-dist launch`
# per node through srun (machine rank expanded inside each task), the time-limit trap, and
# the requeue after a graceful stop.
#
# Knobs (environment; pass with `sbatch --export=ALL,NAME=value,...` or export before sbatch):
#   RECIPE       training recipe (YAML), relative to the job's working folder [configs/tiny.yaml]
#   PROFILE      launch profile: a name from accelerate_configs/ or a path [per template]
#   OVERRIDES    space-separated recipe overrides: "training.max_steps=500 output.dir=runs/x"
#   VENV         virtual environment to activate on every node              [.venv if present]
#   PROCS_PER_NODE  training processes per node                             [per template]
#   MASTER_ADDR  address of the first node (default: its NodeAddr from scontrol)
#   MASTER_PORT  rendezvous port (default: 20000 + job id % 20000, so jobs do not collide)
#   RAFT_DIST_HOME  folder holding slurm/common.sh (default: the job's working folder, i.e.
#                submit from the raft-dist checkout or pass --chdir; a wheel install has it
#                under <prefix>/share/raft-dist)
# Nodes, GPUs, time, partition and account are sbatch's own options (--nodes, --gpus-per-node,
# --time, --partition, --account) on the command line or in #SBATCH lines.
#
# Exit codes: 0 when training completed, or when it stopped for a time limit or preemption
# and the job was requeued (raft-dist launch exits 75 for "stopped, checkpoint saved"); the
# training's own code otherwise (2: a bad recipe, profile or data, with the reason in the log).

RAFT_DIST_STOPPED=75  # raft-dist launch: stopped at a step boundary, checkpoint saved, requeue me

raft_dist_log() { printf '[raft-dist %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

raft_dist_fail() {
    raft_dist_log "error: $*"
    exit 2
}

raft_dist_setup() {
    if [[ -n "${VENV:-}" ]]; then
        [[ -f "$VENV/bin/activate" ]] || raft_dist_fail "VENV=$VENV has no bin/activate"
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    elif [[ -f .venv/bin/activate ]]; then
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi
    command -v raft-dist >/dev/null || raft_dist_fail "raft-dist is not on PATH (set VENV=...)"
    RECIPE=${RECIPE:-configs/tiny.yaml}
    [[ -f "$RECIPE" ]] || raft_dist_fail "RECIPE=$RECIPE: no such file (relative to $PWD)"
    read -r -a OVERRIDE_ARGS <<< "${OVERRIDES:-}"
    # The requeued job continues from the newest checkpoint (a fresh start when there is none).
    OVERRIDE_ARGS+=("training.resume=latest")
    # Resolves the recipe with its overrides: a typo fails here, in a second, with its key named.
    RUN_DIR=$(raft-dist recipe --config "$RECIPE" --get output.dir "${OVERRIDE_ARGS[@]}") \
        || raft_dist_fail "the recipe or OVERRIDES are invalid (see the line above)"
    RUN_DIR=$(realpath -m "$RUN_DIR")
    mkdir -p "$RUN_DIR"
    NODES=${SLURM_JOB_NUM_NODES:-1}
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        local first
        first=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)
        # Node names need not resolve (they do not on the local test cluster): use NodeAddr.
        MASTER_ADDR=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)
        MASTER_ADDR=${MASTER_ADDR:-$first}
    fi
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    # The agent's grace for workers after a forwarded SIGINT; the site's KillWait bounds it.
    local kill_wait
    kill_wait=$(scontrol show config 2>/dev/null | awk '/^KillWait/ {print $3}')
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${kill_wait:-30}}
    export RAFT_DIST_STOP_REQUEST="$RUN_DIR/stop-request"
    raft_dist_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $NODES node(s):" \
        "${SLURM_JOB_NODELIST:-?}, main $MASTER_ADDR:$MASTER_PORT, profile $PROFILE," \
        "recipe $RECIPE, run folder $RUN_DIR"
}

# The time-limit warning (#SBATCH --signal=B:USR1@N) reaches only this shell. It leaves a
# request file in the run folder; global rank 0 sees it at the next step and every rank
# saves a checkpoint and exits 0.
raft_dist_request_stop() {
    raft_dist_log "USR1: asking the run to stop at the next step ($RAFT_DIST_STOP_REQUEST)"
    : > "$RAFT_DIST_STOP_REQUEST"
}

raft_dist_main() {
    raft_dist_setup
    trap raft_dist_request_stop USR1
    local total=$((NODES * PROCS_PER_NODE))
    # One task per node. Single quotes: $SLURM_NODEID must expand inside each task, where it
    # is that node's id; expanded here, every node would be machine rank 0.
    # shellcheck disable=SC2016
    srun --kill-on-bad-exit=1 --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 \
        bash -c 'exec raft-dist launch --profile "$0" --config "$1" \
            --num_machines "$2" --num_processes "$3" --machine_rank "$SLURM_NODEID" \
            --main_process_ip "$4" --main_process_port "$5" "${@:6}"' \
        "$PROFILE" "$RECIPE" "$NODES" "$total" "$MASTER_ADDR" "$MASTER_PORT" \
        "${OVERRIDE_ARGS[@]}" &
    local step=$! rc=0 again
    # `wait` returns early (rc > 128) when a trapped signal arrives: wait again until srun
    # itself has exited, and take its own exit status.
    while true; do
        if wait "$step"; then rc=0; else rc=$?; fi
        if ((rc > 128)) && kill -0 "$step" 2>/dev/null; then
            continue
        fi
        if ((rc > 128)); then  # interrupted, then srun ended: its status is still uncollected
            if wait "$step" 2>/dev/null; then rc=0; else
                again=$?
                ((again == 127)) || rc=$again
            fi
        fi
        break
    done
    if [[ $rc -eq $RAFT_DIST_STOPPED ]]; then
        raft_dist_log "stopped with a checkpoint; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" \
            || raft_dist_log "requeue refused (Slurm may have requeued the job itself)"
        exit 0
    fi
    raft_dist_log "training exited with code $rc"
    exit "$rc"
}
