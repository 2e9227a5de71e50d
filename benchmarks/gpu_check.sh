#!/usr/bin/env bash
# The GPU check in one go, sized for a 10-minute lease of a GPU machine (offline; its Python image
# has torch, lightning, torchvision, timm, pytest, but not hydra-core, omegaconf or mlflow, nor
# Fashion-MNIST).
#
#   bash benchmarks/gpu_check.sh prepare     # here, in the repo root: fills the git-ignored .whl/
#                                            # (../shared/tools/device-wheels) and .gpu_kit/ (the data)
#   bash benchmarks/gpu_check.sh run         # there: device tool `run`, carry [".whl", ".gpu_kit"],
#                                            # timeout_s 600; figures land in $OUT (else ./gpu_check_out)
#
# `run` first sets up what the image lacks, then makes its first CUDA call: without a CUDA GPU it
# stops there with one line (exit 3). On a GPU it runs, logging each step under $OUT:
#   1. the GPU suite (`pytest -m gpu`: GPU defaults, data on the device, no per-step host sync);
#   2. DenseNet-BC (L=100, k=12), $EPOCHS epoch(s) on Fashion-MNIST with the GPU defaults
#      (bf16-mixed, channels_last): epoch time, train img/s, accuracy;
#   3. the study's arms (benchmarks/study_speed.py ARMS), one epoch each on the full training set,
#      $JOBS runs sharing the GPU (hydra/launcher=gpu_shared; under CUDA MPS when MPS=1 and
#      nvidia-cuda-mps-control is there);
#   4. per arm: train img/s, epoch s, fixed s per run, and the expected minutes of the study plan
#      (PLAN_SEEDS x PLAN_EPOCHS, default 5 x 30) at $JOBS runs at once (benchmarks/study_time.py);
#   5. with BENCH=1 only: the bench's DenseNet-121 ratios against torchvision and timm at 224x224.
# About 5-7 minutes on an H100-class GPU without step 5.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
PY=${PY:-python3}
FMNIST=/usr/share/datasets/fashion-mnist

if [ "$mode" = prepare ]; then
  tool=${SHARED:-../shared}/tools/device-wheels
  [ -x "$tool" ] || tool=/work/shared/tools/device-wheels
  "$tool"   # .whl/: hydra-core, omegaconf, antlr4, mlflow and what they need there (about 35 MB)
  grep -qx '/.gpu_kit/' .git/info/exclude 2>/dev/null || echo '/.gpu_kit/' >> .git/info/exclude
  rm -rf .gpu_kit && mkdir -p .gpu_kit/fashion-mnist
  for f in "$FMNIST"/*-ubyte.gz; do gunzip -c "$f" > ".gpu_kit/fashion-mnist/$(basename "$f" .gz)"; done
  # xz packs the idx files to about 2/3 of Debian's gzip, so data and wheels stay under 64 MiB.
  tar -C .gpu_kit -cJf .gpu_kit/fashion-mnist.tar.xz fashion-mnist && rm -rf .gpu_kit/fashion-mnist
  du -sh .whl .gpu_kit
  echo 'now: device run, command "bash benchmarks/gpu_check.sh run", carry [".whl", ".gpu_kit"], timeout_s 600'
  exit 0
fi
[ "$mode" = run ] || { echo "gpu_check.sh: mode '$mode' is invalid: expected prepare or run"; exit 2; }

OUT=${OUT:-$PWD/gpu_check_out}        # the summaries
WORK=${WORK:-/tmp/gpu_check_work}     # MLflow store and run folders
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c 'import hydra, mlflow' 2>/dev/null; then
  [ -d .whl ] || { echo "hydra/mlflow missing and no .whl/: run 'bash benchmarks/gpu_check.sh prepare' first"; exit 1; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if [ ! -e "$FMNIST/train-images-idx3-ubyte.gz" ] && [ ! -e "$FMNIST/train-images-idx3-ubyte" ]; then
  [ -e .gpu_kit/fashion-mnist.tar.xz ] || { echo "no Fashion-MNIST and no .gpu_kit/: run prepare first"; exit 1; }
  mkdir -p "$(dirname "$FMNIST")" && tar -C "$(dirname "$FMNIST")" -xJf .gpu_kit/fashion-mnist.tar.xz
fi

# The first CUDA call: everything after it needs the GPU.
if ! gpu=$($PY -c 'import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))' 2>/dev/null); then
  echo "gpu_check.sh: no CUDA GPU visible (torch.cuda.is_available() is false): nothing measured"
  exit 3
fi

mkdir -p "$OUT" "$WORK"
EPOCHS=${EPOCHS:-1}; JOBS=${JOBS:-4}; PLAN_SEEDS=${PLAN_SEEDS:-5}; PLAN_EPOCHS=${PLAN_EPOCHS:-30}
URI=sqlite:///$WORK/mlflow.db
ARMS=$($PY -c 'import sys; sys.path.insert(0, "benchmarks"); import study_speed; print(",".join(study_speed.ARMS))')
{ echo "gpu: $gpu"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  $PY -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)'
} | tee "$OUT/gpu.txt"

echo "== 1/4 GPU suite"
$PY -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log" || true

echo "== 2/4 DenseNet-BC (L=100, k=12) on Fashion-MNIST, GPU defaults, $EPOCHS epoch(s)"
$PY -m densenet_exp.run model=densenet_bc100_k12 optim=onecycle trainer.max_epochs="$EPOCHS" \
  trainer.enable_progress_bar=false tracking.uri="$URI" tracking.experiment=gpu_bc100 \
  hydra.run.dir="$WORK/bc100" 2>&1 | tail -4 | tee "$OUT/bc100.log" || echo "the DenseNet-BC run failed"
$PY benchmarks/study_time.py --tracking-uri "$URI" --experiment gpu_bc100 --seeds 1 --epochs 300 \
  2>&1 | tee "$OUT/bc100.md" || echo "no DenseNet-BC figures"

echo "== 3/4 the study's arms, 1 epoch each, $JOBS runs sharing the GPU${MPS:+ (MPS)}"
if [ "${MPS:-0}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=$WORK/mps CUDA_MPS_LOG_DIRECTORY=$WORK/mps
  mkdir -p "$WORK/mps" && nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
$PY -m densenet_exp.run -m experiment=study_fmnist "model=$ARMS" data.train_size=null data.val_size=5000 trainer.max_epochs=1 \
  hydra/launcher=gpu_shared hydra.launcher.n_jobs="$JOBS" tracking.uri="$URI" tracking.experiment=gpu_arms \
  hydra.sweep.dir="$WORK/arms" 2>&1 | tail -3 | tee "$OUT/arms.log" || echo "some arm failed"

echo "== 4/4 per arm, and the study plan: $PLAN_SEEDS seeds x $PLAN_EPOCHS epochs, $JOBS runs at once"
$PY benchmarks/study_time.py --tracking-uri "$URI" --experiment gpu_arms --seeds "$PLAN_SEEDS" \
  --epochs "$PLAN_EPOCHS" --jobs "$JOBS" 2>&1 | tee "$OUT/arms.md" || echo "no figures for the arms"

figures="gpu.txt pytest_gpu.log bc100.md arms.md"
if [ "${BENCH:-0}" = 1 ]; then
  figures="$figures bench.md"
  echo "== bench: DenseNet-121 train step vs torchvision and timm, 224x224, batch 32"
  $PY -m densenet_exp.bench --size 224 --batch 32 --steps 10 --warmup 3 --reference tv_densenet121 \
    --models densenet121,densenet121:fp32fast,densenet121:fast,densenet121_me:fp32fast,tv_densenet121,tv_densenet121_me,timm_densenet121,timm_densenet121:fp32fast \
    2>/dev/null | tee "$OUT/bench.md" || echo "the bench failed"
fi
echo "figures in $OUT: $figures"
