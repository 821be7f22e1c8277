#!/usr/bin/env bash
# Train one continual-learning method on a Slurm cluster (or locally), surviving preemption.
#
#   mkdir -p logs && sbatch run_job.sh casm                   # one method, defaults below
#   sbatch -J clkit-lora --time=4:00:00 run_job.sh lora --set train.lr=1e-4   # extra args go to main.py
#   sbatch --gres=gpu:4 --cpus-per-task=32 run_job.sh lora   # one run on 4 GPUs: 4 ranks (one Slurm task each)
#   sbatch --nodes=2 --gres=gpu:4 run_job.sh lora           # one run on 2 nodes x 4 GPUs: 8 ranks
#   sbatch --ntasks=2 --gres=none run_job.sh lora           # one run on 2 CPU ranks (gloo)
#   MODE=synthetic bash run_job.sh lora                       # the same thing without Slurm
#
# Every #SBATCH value below is a default: sbatch options on the command line override it.
#SBATCH --job-name=clkit
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#SBATCH --signal=USR2@300
#
# Signal pattern: the srun pattern. Slurm sends SIGUSR2 300 s before the time limit to the job step,
# i.e. straight to python, which runs under srun; main.py's handler sets a flag, saves a step
# checkpoint at the next step boundary and exits 75. This script then requeues the job, and the
# restarted job resumes from that checkpoint (same run directory: its id is a hash of the config).
# Why this pattern rather than `--signal=B:USR2` + a bash trap: it is the same one submitit uses
# (scripts/launch.py), `scancel --signal=USR2 <jobid>` reaches python without --batch, and python
# gets the signal even when the batch shell is busy. USR2 rather than USR1 because NCCL may take USR1.
# If you do send the signal to the batch shell (`--signal=B:USR2@300`, `scancel --batch`), the trap
# below forwards it to srun, which forwards it to python, so both work.
#
# Preemption and `scontrol requeue` go through SIGTERM instead: Slurm requeues (or cancels) the job
# itself; main.py saves at the next step boundary within KillWait and exits 75; this script must not
# requeue a second time, so it only requeues on 75 when it did not see a SIGTERM.
#
# Knobs (environment variables; sbatch exports your environment to the job by default):
#   REPO_DIR  the clone holding main.py     default: the directory of this script (found via scontrol
#                                            inside Slurm, which runs a copy), else $SLURM_SUBMIT_DIR
#   CONFIG    a config file for main.py     default: none (main.py's defaults)
#   RUN_ROOT  where run directories go      default: $REPO_DIR/runs
#   MODE      real | synthetic              default: real
#   SEED      training seed                 default: $SLURM_ARRAY_TASK_ID under --array, else 0
#   MODULES   modules to `module load`      default: none (space separated, e.g. "cuda/12.1 gcc/12")
#   ENV_CMD   prefix that runs python in the project environment
#                                           default: "uv run --frozen" (run `uv sync --locked` once first)
#   RUN_JOB_DRY_RUN=1  print the world and the launch command, then exit 0 without running anything
#
# Ranks (docs/slurm.md, docs/distributed.md): one run may span several processes. No `#SBATCH --ntasks`
# above on purpose: with `--ntasks=1` in the header, `sbatch --nodes=2` would shrink the job to one
# node. The number of ranks is max(SLURM_NTASKS, nodes x GPUs per node); each rank is one Slurm task
# started by srun directly (not torchrun under srun: torchrun would die on SIGUSR2 and hide Slurm's
# signals from the ranks, and the stop agreement needs every rank to get them itself).
set -uo pipefail

log() { echo "run_job.sh: $*" >&2; }
die() { log "error: $*"; exit 2; }  # 2 = bad input, like main.py: never requeued

METHOD="${1:-}"
[[ -n "$METHOD" && "$METHOD" != -* ]] || die "usage: [sbatch] run_job.sh METHOD [main.py args ...] (e.g. run_job.sh lora)"
shift

# Slurm runs a copy of the batch script from its spool dir, so $0 does not point at the clone;
# scontrol still knows the path that was submitted.
script_dir() {
    if [[ -n "${SLURM_JOB_ID:-}" ]] && command -v scontrol >/dev/null 2>&1; then
        local cmd
        cmd="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)"
        [[ -n "$cmd" && -f "$cmd" ]] && { (cd "$(dirname "$cmd")" && pwd); return; }
    fi
    # Not realpath: a symlinked run_job.sh belongs to the checkout it is linked into.
    (cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
}

if [[ -z "${REPO_DIR:-}" ]]; then
    for candidate in "$(script_dir)" "${SLURM_SUBMIT_DIR:-}"; do
        if [[ -n "$candidate" && -f "$candidate/main.py" ]]; then REPO_DIR="$candidate"; break; fi
    done
fi
[[ -n "${REPO_DIR:-}" ]] || die "cannot find the repository (no main.py next to run_job.sh or in the submit dir); set REPO_DIR=/path/to/clone"
[[ -f "$REPO_DIR/main.py" ]] || die "REPO_DIR=$REPO_DIR has no main.py; set REPO_DIR to the clone of this repository"
REPO_DIR="$(cd "$REPO_DIR" && pwd)"

# Relative paths mean relative to where the job was submitted (the job's cwd), not to REPO_DIR.
RUN_ROOT="$(realpath -m "${RUN_ROOT:-$REPO_DIR/runs}")"
CONFIG="${CONFIG:-}"
if [[ -n "$CONFIG" ]]; then
    [[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG does not exist"
    CONFIG="$(realpath "$CONFIG")"
fi
MODE="${MODE:-real}"
SEED="${SEED:-${SLURM_ARRAY_TASK_ID:-0}}"
ENV_CMD="${ENV_CMD:-uv run --frozen}"

if [[ -n "${MODULES:-}" ]]; then
    type module >/dev/null 2>&1 || die "MODULES=$MODULES is set but this shell has no 'module' command"
    for m in $MODULES; do module load "$m" || die "module load $m failed"; done
fi

read -r -a env_cmd <<<"$ENV_CMD"
if ((${#env_cmd[@]})) && ! command -v "${env_cmd[0]}" >/dev/null 2>&1; then
    if [[ "${env_cmd[0]}" == uv ]]; then
        die "'uv' is not on PATH (in a job, PATH is the one at submission). Install it (pip install uv) or set ENV_CMD to a command that runs python in the environment, e.g. ENV_CMD='conda run -n clkit'"
    fi
    die "ENV_CMD=$ENV_CMD: '${env_cmd[0]}' not found on PATH"
fi

cmd=("${env_cmd[@]}" python main.py --method "$METHOD" --mode "$MODE" --seed "$SEED" --run-root "$RUN_ROOT")
[[ -n "$CONFIG" ]] && cmd+=(--config "$CONFIG")
cmd+=("$@")

cd "$REPO_DIR" || die "cannot cd to $REPO_DIR"
mkdir -p "$REPO_DIR/logs"  # for the next sbatch from the clone: Slurm does not create --output dirs

in_slurm=0
[[ -n "${SLURM_JOB_ID:-}" ]] && in_slurm=1

num_ranks=1
if ((in_slurm)); then
    num_nodes="${SLURM_JOB_NUM_NODES:-1}"
    num_tasks="${SLURM_NTASKS:-1}"
    gpus_per_node="${SLURM_GPUS_ON_NODE:-0}"
    [[ "$gpus_per_node" =~ ^[0-9]+$ ]] || gpus_per_node=0
    if ((num_nodes * gpus_per_node > num_tasks && num_nodes * gpus_per_node > 1)); then
        # One rank per GPU. Every rank of a node sees all of its GPUs (no --gpus-per-task, which would
        # renumber them) and picks cuda:SLURM_LOCALID. The node's CPUs are split between its ranks.
        num_ranks=$((num_nodes * gpus_per_node))
        cpus_per_rank=$(( ${SLURM_CPUS_ON_NODE:-$gpus_per_node} / gpus_per_node ))
        ((cpus_per_rank >= 1)) || cpus_per_rank=1
        rank_layout=(--ntasks="$num_ranks" --nodes="$num_nodes" --ntasks-per-node="$gpus_per_node"
                     --cpus-per-task="$cpus_per_rank")
    elif ((num_tasks > 1)); then
        # CPU ranks (sbatch --ntasks=N): Slurm already placed the tasks.
        num_ranks=$num_tasks
        rank_layout=(--ntasks="$num_ranks" --nodes="$num_nodes" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}")
    fi
fi

rank_exits=""
if ((in_slurm && num_ranks == 1)); then
    # 22.05 no longer passes --cpus-per-task from sbatch to srun; without it the step gets one CPU.
    launcher=(srun --ntasks=1 --nodes=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1)
elif ((in_slurm)); then
    # The ranks meet on the first node, at the address Slurm reaches it at (its NodeAddr: node names need
    # not be host names), found once here by the same code launch.py's job script runs
    # (training/rendezvous.py); on a port derived from the job id (array tasks have their own ids), so two
    # runs sharing a node do not collide.
    # It is standard library only and runs with the node's own python3, not through ENV_CMD: scontrol is
    # on the node, not necessarily inside what ENV_CMD enters (a container); ENV_CMD's python without one.
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        rendezvous=(python3)
        command -v python3 >/dev/null 2>&1 || rendezvous=("${env_cmd[@]}" python)
        MASTER_ADDR="$("${rendezvous[@]}" "$REPO_DIR/training/rendezvous.py")" && [[ -n "$MASTER_ADDR" ]] \
            || die "cannot work out the rendezvous host from SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}; set MASTER_ADDR"
    fi
    export MASTER_ADDR
    export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
    # Not --kill-on-bad-exit: after a stop every rank exits 75, and the first one to exit would make
    # srun kill the others (measured on 22.05: srun then returns 143). srun returns the highest exit
    # code of the ranks, which would turn one rank's crash (1) plus the others' "lost contact" (75)
    # into a requeue; so every rank writes its own exit code and the decision below reads them all.
    # --wait: once one rank has exited, the others get 120 s (a lost peer on NCCL can hang a collective
    # for its whole timeout) before srun kills them.
    rank_exits="$REPO_DIR/logs/.rank-exits-${SLURM_JOB_ID}"  # in the clone: shared by every node of the job
    launcher=(srun "${rank_layout[@]}" --wait=120 --kill-on-bad-exit=0
              bash -c 'trap : TERM USR1 USR2 INT; "$@"; rc=$?; echo "$rc" >"$0/$SLURM_PROCID"; exit "$rc"'
              "$rank_exits")
fi
if ((in_slurm)); then
    log "job ${SLURM_JOB_ID}${SLURM_ARRAY_JOB_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})} restart ${SLURM_RESTART_COUNT:-0} on $(hostname -s)"
    if ((num_ranks > 1)); then
        log "world: $num_ranks ranks on $num_nodes node(s) (${SLURM_JOB_NODELIST:-?}), rendezvous $MASTER_ADDR:$MASTER_PORT"
    fi
else
    launcher=()
fi
log "in $REPO_DIR: ${cmd[*]}"
if [[ "${RUN_JOB_DRY_RUN:-0}" == 1 ]]; then
    echo "ranks=$num_ranks master=${MASTER_ADDR:-}:${MASTER_PORT:-}"
    echo "${launcher[*]} ${cmd[*]}"
    exit 0
fi

got_term=0
child=""
# shellcheck disable=SC2317  # called from the traps below
forward() {  # forward SIG: pass a signal on to python (through srun inside Slurm)
    [[ -n "$child" ]] && kill "-$1" "$child" 2>/dev/null
}
# Inside Slurm SIGTERM reaches python directly (Slurm signals every process of the job); we only
# remember it. Outside Slurm nobody else tells python, so we forward it.
if ((in_slurm)); then trap 'got_term=1' TERM; else trap 'got_term=1; forward TERM' TERM; fi
# Background jobs of a non-interactive shell ignore SIGINT, so Ctrl-C becomes a graceful SIGTERM.
trap 'forward TERM' INT
trap 'forward USR1' USR1
trap 'forward USR2' USR2

if [[ -n "$rank_exits" ]]; then
    rm -rf "$rank_exits" && mkdir -p "$rank_exits" || die "cannot create $rank_exits"
fi
# In the background + wait, so the traps run at once instead of after python exits.
"${launcher[@]}" "${cmd[@]}" &
child=$!
rc=0
while true; do
    wait "$child"
    rc=$?
    # wait returns >128 when a trapped signal interrupted it; the child is then still running.
    kill -0 "$child" 2>/dev/null || break
done

# Several ranks: the codes each rank recorded. A rank that failed outright (anything but 0, 75 or a stop
# signal) decides, whatever the others did after losing it; otherwise a stop anywhere means 75.
if [[ -n "$rank_exits" ]]; then
    failed="" stopped=0
    for ((r = 0; r < num_ranks; r++)); do
        code="$(cat "$rank_exits/$r" 2>/dev/null)"
        case "$code" in
            0) ;;
            75|138|140|143) stopped=1 ;;
            "") ;;  # its shell was killed too: srun's code below covers it
            *) [[ -z "$failed" ]] && failed="$code" && log "rank $r exited with code $code" ;;
        esac
    done
    if [[ -n "$failed" ]]; then rc=$failed; elif ((stopped && (rc == 0 || rc == 75 || rc > 128))); then rc=75; fi
    rm -rf "$rank_exits"
fi

# 138/140/143 = python killed by SIGUSR1/SIGUSR2/SIGTERM itself: the signal came while main.py had no
# handler (during its imports, or after it finished). Nothing newer than the last step checkpoint
# existed, so it is handled like 75: requeue, and the rerun resumes (or finds the run complete).
if ((rc == 138 || rc == 140 || rc == 143)); then
    log "python was killed by signal $((rc - 128)) before it could checkpoint; resuming from the last checkpoint"
    rc=75
fi

case "$rc" in
    0)
        log "done: every period committed under $RUN_ROOT"
        exit 0 ;;
    75)
        if ((!in_slurm)); then
            log "stopped after saving a step checkpoint; run the same command again to resume"
            exit 75
        fi
        if ((got_term)); then
            # Slurm is requeuing (scontrol requeue, preemption, a failed node) or cancelling this job itself.
            # After a node failure the ranks did not save (they lost a peer); the newest checkpoint is older.
            log "stopped on SIGTERM (requeue, preemption or a failed node); the newest step checkpoint is kept, Slurm decides whether the job comes back"
            exit 75
        fi
        # Array tasks are addressed as <array job id>_<task id>; a plain job by its id.
        if [[ -n "${SLURM_ARRAY_JOB_ID:-}" ]]; then
            job_ref="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
        else
            job_ref="$SLURM_JOB_ID"
        fi
        if scontrol requeue "$job_ref"; then
            log "checkpoint saved; requeued $job_ref (restart $(( ${SLURM_RESTART_COUNT:-0} + 1 ))), it resumes from the checkpoint"
        else
            log "checkpoint saved but 'scontrol requeue $job_ref' failed; resubmit the same command to resume"
        fi
        exit 75 ;;
    *)
        log "main.py failed with exit code $rc; not requeued (see the traceback above)"
        exit "$rc" ;;
esac
