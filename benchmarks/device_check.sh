#!/usr/bin/env bash
# The GPU checks a device session owes issue 18 (and the `cuda` tests of every change since the last one), as
# one script sized for a session's 15 minutes: the `cuda`-marked tests, then benchmarks/train_step.py on the
# paper preset at micro-batches 8 and 64 in fp32, bf16 (paper_bf16.json's DeepSpeed bf16 optimizer) and
# bf16-autocast (paper_bf16_autocast.json), without and with --compile. Each part has its own time limit, so a
# slow part costs its own figures only; every log and JSON line lands in $OUT.
#
# Here, once (the device machine has torch but not DeepSpeed, Dask, Zarr, nibabel; .whl/ is git-ignored):
#   ../shared/tools/gpu-wheels.sh .whl
# Then, with the device tool: run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
# Dry run on a CPU (the cuda tests skip; the tiny preset instead of paper): PRESET=tiny bash benchmarks/device_check.sh
#
# PARTS (environment) picks what runs: "tests steps compile" by default. The cuda tests alone took 220 s for three
# tests on the H200 (2026-12-04) and are seven now: in one session, run PARTS="steps compile" and PARTS=tests as two
# calls, or give the tests their own session. Limits in seconds: CUDA_TESTS_S (420), STEP_S per train_step.py
# run (45), COMPILE_STEP_S (150: one cold compile per dtype).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
PRESET=${PRESET:-paper}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/brats_gan_torch_extensions}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
  git rev-parse --short HEAD 2>/dev/null; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

PARTS=${PARTS:-tests steps compile}
if [[ " $PARTS " == *" tests "* ]]; then
  echo "== python -m pytest -m cuda (limit ${CUDA_TESTS_S:-420} s)"
  timeout "${CUDA_TESTS_S:-420}" python3 -m pytest -m cuda -q -rA -p no:cacheprovider > "$OUT/cuda_tests.log" 2>&1
  echo "rc=$?" >> "$OUT/cuda_tests.log"
  tail -n 15 "$OUT/cuda_tests.log"
fi

for compile in "" "--compile"; do
  part=steps
  [ -n "$compile" ] && part=compile
  [[ " $PARTS " == *" $part "* ]] || continue
  for batch in 8 64; do
    limit=${STEP_S:-45}
    [ -n "$compile" ] && limit=${COMPILE_STEP_S:-150}
    echo "== train_step.py --preset $PRESET --batch-size $batch $compile (limit $limit s)"
    timeout "$limit" python3 benchmarks/train_step.py --preset "$PRESET" --batch-size "$batch" --steps 10 --warmup 2 \
      --dtype fp32 bf16 bf16-autocast $compile --json >> "$OUT/train_step.jsonl" 2>> "$OUT/train_step.log"
    echo "rc=$?" | tee -a "$OUT/train_step.log"
  done
done
[ -s "$OUT/train_step.jsonl" ] && python3 - "$OUT/train_step.jsonl" <<'SUMMARY'
import json, sys
for line in open(sys.argv[1]):
    run = json.loads(line)
    for r in run["results"]:
        print(f"{run['preset']} mb{run['batch_size']} {r['dtype']:13} {r['critic_step']:22} deepspeed "
              f"{r['deepspeed_images_per_s']:8.1f} img/s, torch {r['torch_images_per_s']:8.1f}, ratio {r['ratio']:.3f}, "
              f"MFU {r['deepspeed_mfu']}, first step {r['first_critic_step_s']}")
SUMMARY
echo "figures in $OUT"
