#!/usr/bin/env bash
# Train across the nodes of a SLURM allocation: one DeepSpeed launcher per node, started by srun
# with --no_ssh and that node's --node_rank (no password-less ssh between nodes needed), each
# starting SLOTS ranks; rank 0 listens on the first node. Options after STORE and RUN go to
# `python -m brats_gan.train` unchanged:
#
#   sbatch launch/train_slurm.sh /shared/brats2020.zarr /shared/runs/paper \
#       --preset paper --steps 10000 --checkpoint-every 500
#
# Requeue-friendly: submitting, requeueing (`scontrol requeue`, preemption, node failure) or
# resubmitting the same command continues the run: the script always passes `--resume auto`, which
# continues from a loadable checkpoint, starts a run that does not exist yet, and moves the folder of a
# run killed before its first checkpoint aside to RUN.no-checkpoint-<time> and starts again. Five minutes before the time limit the job requeues itself (--signal below); a
# checkpoint is written atomically (`latest` last), so a kill at any moment loses at most the steps
# since the last one. A resumed run needs the world size it started with: keep --nodes and SLOTS.
#
# Where things must be:
# - RUN on a file system every node sees at the same path (Lustre, GPFS, NFS): every rank writes
#   its part of each checkpoint there (rank 0 the weights, each rank its random state) and reads
#   it back on resume. The generated hostfile goes to the submit directory, shared for the same reason.
# - STORE is only read (every rank reads the metadata; a store of at most 256 MiB is read once into
#   each rank's memory, a larger one is streamed, each loader worker process opening its own
#   read-only handle). Either give a path every node sees, or set STAGE_DIR to a node-local
#   directory with the same path on every node (e.g. STAGE_DIR=/local/scratch/$USER): the store is
#   then copied with rsync to STAGE_DIR on each node before the launch, and the ranks read that
#   copy (a node that already holds it only checks it; a resumed run may read its store elsewhere).
# - The brats_gan environment on every node: sbatch passes on the submitting shell's environment,
#   so activate it (e.g. `source venv/bin/activate`) before `sbatch`.
#
# Environment knobs: SLOTS (ranks per node; default the GPUs SLURM gives each node, else 1 CPU rank
# over gloo), STAGE_DIR (above), MASTER_PORT (default derived from the job id, so that jobs sharing
# a node do not collide), MASTER_ADDR (default the first node's host name).
# The #SBATCH lines below are an example: on CPU nodes drop --gpus-per-node and set SLOTS.
# DeepSpeed numbers each node's GPUs 0..SLOTS-1 (it sets CUDA_VISIBLE_DEVICES): use whole nodes, or
# a cluster whose device cgroups show each job only its own GPUs.
#
#SBATCH --job-name=brats-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
set -euo pipefail
STORE=${1:?usage: sbatch launch/train_slurm.sh STORE RUN [brats_gan.train options]}
RUN=${2:?usage: sbatch launch/train_slurm.sh STORE RUN [brats_gan.train options]}
shift 2
STORE=${STORE%/}
RUN=${RUN%/}

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
SLOTS=${SLOTS:-${SLURM_GPUS_ON_NODE:-1}}
MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
HOSTFILE=${SLURM_SUBMIT_DIR:-$PWD}/hostfile-$SLURM_JOB_ID
for node in "${NODES[@]}"; do echo "$node slots=$SLOTS"; done > "$HOSTFILE"
PER_NODE=(--nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1)
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    PER_NODE+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")  # newer srun no longer inherits it from sbatch
fi

if [[ -n ${STAGE_DIR:-} ]]; then
    LOCAL_STORE=$STAGE_DIR/$(basename "$STORE")
    echo "copying $STORE to $LOCAL_STORE on ${#NODES[@]} node(s)"
    # shellcheck disable=SC2016  # $1 and $2 expand in the task's shell, on each node
    srun "${PER_NODE[@]}" bash -c 'mkdir -p "$1" && rsync -a --delete "$2/" "$1/"' stage "$LOCAL_STORE" "$STORE"
    STORE=$LOCAL_STORE
fi

requeue() {
    echo "time limit near: requeueing job $SLURM_JOB_ID; it resumes from $RUN/checkpoints/latest"
    scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

echo "nodes: ${NODES[*]} (${SLOTS} rank(s) each), master $MASTER_ADDR:$MASTER_PORT, hostfile $HOSTFILE"
# SLURM_NODEID (this node's index in the allocation, the order of `scontrol show hostnames` and of
# the hostfile) must expand on each node, hence bash -c.
# shellcheck disable=SC2016
srun "${PER_NODE[@]}" --kill-on-bad-exit=1 \
    bash -c 'exec deepspeed --no_ssh --node_rank "$SLURM_NODEID" "$@"' node \
    --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module brats_gan.train --store "$STORE" --out "$RUN" --resume auto "$@" &
wait $!  # in the background so that the USR1 trap runs while training
