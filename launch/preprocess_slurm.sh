#!/usr/bin/env bash
# Preprocess a BraTS folder on a SLURM allocation: one Dask scheduler, one single-threaded worker
# per task, then `brats-gan preprocess --scheduler`. The store and the BraTS folder must be on a
# file system every node sees (Lustre, GPFS, NFS). Resubmitting the same job resumes (--resume).
#
#   sbatch launch/preprocess_slurm.sh /data/MICCAI_BraTS2020_TrainingData /scratch/$USER/brats2020.zarr
#
#SBATCH --job-name=brats-preprocess
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=16
#SBATCH --cpus-per-task=1
#SBATCH --mem-per-cpu=3G
#SBATCH --time=01:00:00
set -euo pipefail
INPUT=${1:?BraTS folder}
STORE=${2:?output store}
SCHED_FILE=${SLURM_SUBMIT_DIR:-$PWD}/dask-scheduler-$SLURM_JOB_ID.json

# The worker settings `brats-gan preprocess --workers` uses (brats_gan/cluster.py): glibc keeps each
# worker's heap instead of returning and re-faulting every 18 MB volume buffer (a third of the task
# time), and no statistical profiler. A nanny would otherwise set MALLOC_TRIM_THRESHOLD_=65536.
export DASK_CONFIG=${SLURM_SUBMIT_DIR:-$PWD}/dask-config-$SLURM_JOB_ID
mkdir -p "$DASK_CONFIG"
cat > "$DASK_CONFIG/brats-gan.yaml" <<'YAML'
distributed:
  nanny:
    pre-spawn-environ:
      MALLOC_TRIM_THRESHOLD_: 268435456
      MALLOC_MMAP_THRESHOLD_: 33554432
  worker:
    profile:
      enabled: false
YAML

dask scheduler --scheduler-file "$SCHED_FILE" --dashboard-address :8787 &
while [ ! -f "$SCHED_FILE" ]; do sleep 1; done
srun --ntasks="$SLURM_NTASKS" dask worker --scheduler-file "$SCHED_FILE" --nthreads 1 --memory-limit 3GB &

ADDRESS=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['address'])" "$SCHED_FILE")
echo "dashboard: ssh -L 8787:$(hostname):8787 <login node>, then http://localhost:8787"
brats-gan preprocess "$INPUT" --out "$STORE" --scheduler "$ADDRESS" --resume --no-progress
