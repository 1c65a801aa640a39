#!/bin/bash
# DinoBloom training with plain sbatch + srun + torchrun, for clusters without submitit.
#
#   cd /path/to/dinobloom      # the repository; jobs start in the directory sbatch was called from
#   sbatch scripts/sbatch_train.sh CONFIG OUTPUT_DIR [key=value ...]
#   sbatch --nodes=4 --partition=gpu scripts/sbatch_train.sh dinov2/configs/train/custom.yaml /scratch/run1
#
# Command-line sbatch flags override the #SBATCH lines below. 120 s before the time limit SLURM
# sends SIGUSR1 to this script; it forwards the signal to the training, which saves a checkpoint
# and exits, then requeues the job. The requeued job runs this script again with the same
# arguments, and train.py resumes from the last checkpoint in OUTPUT_DIR (also when --no-resume or
# train.resume=false started the run afresh).
# The SIGUSR1 forwarding needs torchrun's --signals-to-handle (PyTorch >= 2.9; without it, a warning says that the
# job is requeued from its last periodic checkpoint instead). torchrun then waits
# --shutdown-timeout seconds for the checkpoint (PyTorch 2.14 has it); an older torchrun, without that option,
# stops the training 30 s after the signal, which a large model's checkpoint may not survive (a warning says so).

# Job name shown by squeue and used in the log file name.
#SBATCH --job-name=dinobloom
# Number of machines.
#SBATCH --nodes=1
# One task per machine: it runs torchrun, which starts one training process per GPU.
#SBATCH --ntasks-per-node=1
# GPUs per machine; torchrun starts this many training processes on each machine.
#SBATCH --gpus-per-node=8
# CPU cores per machine, shared by its 8 training processes and their data-loading workers.
#SBATCH --cpus-per-task=80
# Memory per machine; 0 = all of it.
#SBATCH --mem=0
# Wall time of one job (2 days); a requeued job gets the same again.
#SBATCH --time=2-00:00:00
# 120 s before the time limit, send SIGUSR1 to this batch script (B:), whose trap handles it.
#SBATCH --signal=B:USR1@120
# Allow requeueing (by the trap below, or by SLURM after a node failure or a preemption).
#SBATCH --requeue
# Append to the same log file after a requeue instead of overwriting it.
#SBATCH --open-mode=append
# Log file of the batch script and of all tasks (%x = job name, %j = job id).
#SBATCH --output=%x-%j.out

set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: sbatch $0 CONFIG OUTPUT_DIR [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
OUTPUT_DIR=$2
shift 2
if [[ ${SLURM_NTASKS_PER_NODE:-1} != 1 ]]; then
    # One torchrun per node starts that node's processes; tasks per GPU would each get a share of its CPUs and GPUs.
    echo "error: this script starts one torchrun per node: submit it with --ntasks-per-node=1 (and --gpus-per-node)," \
        "not --ntasks-per-node=$SLURM_NTASKS_PER_NODE; for one task per GPU run srun python dinov2/train/train.py" \
        "(README, 'Several nodes')" >&2
    exit 2
fi
TRAIN_ARGS=("$@")
if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then
    # A requeued job (by this script near the time limit, or by SLURM after a preemption) resumes, even when
    # --no-resume or train.resume=false started the run afresh: the last override wins.
    TRAIN_ARGS=()
    for arg in "$@"; do
        [[ $arg == --no-resume ]] || TRAIN_ARGS+=("$arg")
    done
    TRAIN_ARGS+=(train.resume=true)
fi

# Activate the environment that has dinobloom installed, e.g.:
# source /path/to/venv/bin/activate
export PYTHONPATH="${SLURM_SUBMIT_DIR:-$PWD}${PYTHONPATH:+:$PYTHONPATH}"

GPUS=${SLURM_GPUS_ON_NODE:-8}
# The job's first host. Not through `| head -n 1`: head exits after one line, and a scontrol still writing the
# others would die of SIGPIPE, which pipefail and set -e turn into the end of the job.
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${HOSTS%%$'\n'*}
# A port of this job's own (as dinov2.distributed derives it): two jobs sharing a node must not share a rendezvous.
# Below 32768, where Linux starts the ports it hands to outgoing connections, which could hold it.
RDZV_PORT=$((10000 + SLURM_JOB_ID % 20000))
# Since SLURM 22.05 srun no longer inherits sbatch's --cpus-per-task; without this torchrun's ranks share one CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
# torchrun waits this long (seconds) for the training processes to save their checkpoint after SIGUSR1.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-100}

checkpoint_and_requeue() {
    echo "$(date '+%F %T') SIGUSR1: near the time limit; asking the training to save a checkpoint"
    # srun forwards the signal to torchrun on every machine, torchrun to every training process;
    # train.py saves a checkpoint at the next iteration boundary and exits.
    # (srun's pid from the job table too: the signal may come before SRUN_PID=$! has run)
    local pid=${SRUN_PID:-$(jobs -p | tail -n 1)}
    if [ -n "$pid" ]; then  # (a signal before the training started has nothing to save)
        kill -USR1 "$pid" || true
        wait "$pid" || true
    fi
    # Requeue only now: requeueing a running job kills it, which would cut the checkpoint short.
    echo "$(date '+%F %T') requeueing job $SLURM_JOB_ID; it resumes from the last checkpoint in $OUTPUT_DIR"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
}
trap checkpoint_and_requeue USR1

TORCHRUN_ARGS=()
# (grep reads all of the help: with -q it could stop early, and pipefail would count torchrun's broken pipe.)
TORCHRUN_HELP=$(torchrun --help 2>/dev/null || true)
# torchrun forwards SIGUSR1 to the training processes only when told to; an older torchrun has no such option.
if grep -- "--signals-to-handle" > /dev/null <<< "$TORCHRUN_HELP"; then
    TORCHRUN_ARGS+=(--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1)
else
    echo "warning: this torchrun cannot forward SIGUSR1 (no --signals-to-handle): near the time limit the job is" \
        "requeued from its last periodic checkpoint instead of saving one first; PyTorch 2.14 has the option" >&2
fi
if grep -- "--shutdown-timeout" > /dev/null <<< "$TORCHRUN_HELP"; then
    TORCHRUN_ARGS+=(--shutdown-timeout "$SHUTDOWN_TIMEOUT")
else
    echo "warning: this torchrun has no --shutdown-timeout: it stops the training 30 s after SIGUSR1, which may" \
        "cut a large model's checkpoint short (the previous one stays); PyTorch 2.14 has the option" >&2
fi

echo "$(date '+%F %T') job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}):" \
    "$SLURM_NNODES x $GPUS processes, rendezvous $MASTER_ADDR:$RDZV_PORT"
# In the background so that bash runs the trap as soon as SIGUSR1 arrives (it waits for foreground commands).
# One torchrun per machine: each starts that machine's processes.
srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks="$SLURM_NNODES" --ntasks-per-node=1 torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$GPUS" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$RDZV_PORT" \
    ${TORCHRUN_ARGS[@]+"${TORCHRUN_ARGS[@]}"} \
    dinov2/train/train.py --config-file "$CONFIG" --output-dir "$OUTPUT_DIR" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} &
SRUN_PID=$!
wait "$SRUN_PID"
