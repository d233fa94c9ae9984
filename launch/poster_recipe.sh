#!/usr/bin/env bash
# The poster's setting (Cepa, Brito, Sousa): BraTS 2020 subjects 001-015, 48 axial T2-FLAIR slices
# each (720 images, repeated to 3 x 256 x 256), the `paper` preset, micro-batch 8 per GPU, Adam
# lr 2e-4, beta1 0.5, L2 weight decay 1e-3 (deepspeed_configs/paper.json); then 100 generated slices,
# a grid, and the evaluation against 15 held-out subjects (016-030) that the poster did not have.
#
#   launch/poster_recipe.sh /data/MICCAI_BraTS2020_TrainingData work/poster [GPUS [TRAIN OPTIONS...]]
#   sbatch --gpus=4 launch/poster_recipe.sh /data/MICCAI_BraTS2020_TrainingData work/poster 4
#
# TRAIN OPTIONS go to brats_gan.train after the recipe's own and so win over them (e.g.
# --checkpoint-on-signal, or --preset tiny --steps 10 for a quick check). The launcher listens on a
# free port, so several recipes can share a node.
#
# Several nodes: run the preprocessing steps here (or with launch/preprocess_slurm.sh), then
#   sbatch --nodes=2 launch/train_slurm.sh work/poster/train.zarr work/poster/run $TRAIN_ARGS
# with the TRAIN_ARGS printed below. Re-running this script resumes every step that was started.
# Environment: STEPS (default 20000 generator steps), DEEPSPEED_CONFIG (default the paper's fp32
# recipe, built in; deepspeed_configs/paper_bf16.json or paper_bf16_autocast.json for bf16), AUGMENT
# (default none, as the poster).
set -euo pipefail
USAGE="usage: launch/poster_recipe.sh BRATS2020_DIR WORKDIR [GPUS [TRAIN OPTIONS...]]"
BRATS=${1:?$USAGE}
WORK=${2:?$USAGE}
GPUS=${3:-1}
shift $(($# < 3 ? $# : 3))
mkdir -p "$WORK"

brats-gan preprocess "$BRATS" --out "$WORK/train.zarr" --subjects 001-015 --modalities flair --slices 48 --resume
brats-gan preprocess "$BRATS" --out "$WORK/heldout.zarr" --subjects 016-030 --modalities flair --slices 48 --resume

# (no path relative to this script: sbatch runs a copy of it from its spool directory)
TRAIN_ARGS=(--preset paper --steps "${STEPS:-20000}" --checkpoint-every 500 --seed 0 --augment "${AUGMENT:-none}"
            ${DEEPSPEED_CONFIG:+--deepspeed-config "$DEEPSPEED_CONFIG"} "$@")
echo "train arguments: ${TRAIN_ARGS[*]}"
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
deepspeed --num_gpus "$GPUS" --master_port "$PORT" --module brats_gan.train --store "$WORK/train.zarr" \
    --out "$WORK/run" --resume auto "${TRAIN_ARGS[@]}"

brats-gan generate --checkpoint "$WORK/run" --which best --num 100 --out "$WORK/synthetic.zarr" \
    --grid "$WORK/synthetic.png" --overwrite
brats-gan evaluate --real "$WORK/heldout.zarr" --fake "$WORK/synthetic.zarr" --train "$WORK/train.zarr" \
    --report "$WORK/report"
