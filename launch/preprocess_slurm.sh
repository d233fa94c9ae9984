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

# The job owns its scheduler and workers: a free port for each (several jobs may share a node), a
# bounded wait for the scheduler to start, and both stopped when the script ends, however it ends.
rm -f "$SCHED_FILE"  # a requeued job keeps its id: never read the previous run's address
dask scheduler --scheduler-file "$SCHED_FILE" --port 0 --dashboard-address :0 &
SCHED_PID=$!
WORKERS_PID=
cleanup() {
    if [[ -n $WORKERS_PID ]]; then kill "$WORKERS_PID" 2>/dev/null || true; fi
    kill "$SCHED_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$SCHED_FILE" "$DASK_CONFIG"
}
trap cleanup EXIT
for _ in $(seq 120); do
    [[ -s $SCHED_FILE ]] && break
    kill -0 "$SCHED_PID" 2>/dev/null || { echo "error: the Dask scheduler exited; see its messages above" >&2; exit 1; }
    sleep 1
done
[[ -s $SCHED_FILE ]] || { echo "error: the Dask scheduler did not start within 120 s" >&2; exit 1; }
srun --ntasks="$SLURM_NTASKS" dask worker --scheduler-file "$SCHED_FILE" --nthreads 1 --memory-limit 3GB &
WORKERS_PID=$!

read -r ADDRESS DASHBOARD < <(python -c "import json,sys; f=json.load(open(sys.argv[1]))
print(f['address'], f.get('services', {}).get('dashboard', '?'))" "$SCHED_FILE")
echo "scheduler $ADDRESS; dashboard: ssh -L 8787:$(hostname):$DASHBOARD <login node>, then http://localhost:8787"
brats-gan preprocess "$INPUT" --out "$STORE" --scheduler "$ADDRESS" --resume --no-progress
