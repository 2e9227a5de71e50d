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
#      (bf16-mixed, channels_last): epoch time, train img/s, accuracy, and the expected time of a
#      300-epoch run (a plan's pilot: `python -m densenet_exp.study estimate`, densenet_exp/estimate.py);
#   3. the study's arms (benchmarks/study_speed.py ARMS) and DenseNet-BC L=28 with
#      model.impl=shared_stats (its old and new training step in the same run: arm
#      densenet_bc28_k12_shared_stats), one epoch each on the full training set,
#      $JOBS runs sharing the GPU (the exploration stage of a plan written under $WORK, run by
#      `python -m densenet_exp.study run --jobs $JOBS`; under CUDA MPS when MPS=1 and
#      nvidia-cuda-mps-control is there);
#   4. per arm: train img/s and minutes per run, and the expected hours of the study plan's
#      confirmation (PLAN_SEEDS x PLAN_EPOCHS, default 5 x 30) at $JOBS runs at once (`study estimate`);
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
ARMS=$ARMS,densenet_bc28_k12:shared_stats  # the new DenseNet step beside the old, in the same runs
{ echo "gpu: $gpu"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  $PY -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)'
} | tee "$OUT/gpu.txt"

echo "== 1/4 GPU suite"
$PY -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log" || true

# A plan (densenet_exp/plan.py) under $WORK: its exploration stage is the pilot these steps run,
# its confirmation stage what `study estimate` times from the pilot's runs.
plan() {  # NAME RECIPE EXPLORATION_OVERRIDE CONFIRMATION_SEEDS CONFIRMATION_OVERRIDE ARM...
  local name=$1 recipe=$2 pilot=$3 seeds=$4 full=$5; shift 5
  { echo "name: $name"; echo "experiment: $name"; echo "recipe: [$recipe]"
    echo "exploration:"; echo "  seeds: [0]"; echo "  arms:"
    for arm in "$@"; do echo "    ${arm/:/_}: [$(arm_overrides "$arm"), $pilot]"; done
    echo "confirmation:"; echo "  seeds: [$seeds]"; echo "  arms:"
    for arm in "$@"; do echo "    ${arm/:/_}: [$(arm_overrides "$arm"), $full]"; done
  } > "$WORK/$name.yaml"
}
arm_overrides() {  # PRESET or PRESET:IMPL (model.impl), as benchmarks/study_speed.py reads an arm;
  local preset=${1%%:*}  # the model's name is the arm's, as `study estimate` times an arm by its model's name
  echo "model=$preset$([ "$preset" = "$1" ] || echo ", +model.impl=${1#*:}, model.name=${1/:/_}")"
}
study() { (cd "$WORK" && $PY -m densenet_exp.study "$@" --tracking-uri "$URI"); }
seeds() { seq -s ', ' 100 $((99 + $1)); }

echo "== 2/4 DenseNet-BC (L=100, k=12) on Fashion-MNIST, GPU defaults, $EPOCHS epoch(s)"
plan gpu_bc100 "optim=onecycle, trainer.enable_progress_bar=false" "trainer.max_epochs=$EPOCHS" "$(seeds 1)" \
  "trainer.max_epochs=300" densenet_bc100_k12
study run "$WORK/gpu_bc100.yaml" --stage exploration --jobs 1 | tail -2 || echo "the DenseNet-BC run failed"
tail -4 "$WORK"/outputs/studies/gpu_bc100/exploration/*/stdout.log 2>/dev/null | tee "$OUT/bc100.log" || true
study estimate "$WORK/gpu_bc100.yaml" --jobs 1 2>&1 | tee "$OUT/bc100.md" || echo "no DenseNet-BC figures"

echo "== 3/4 the study's arms, 1 epoch each, $JOBS runs sharing the GPU${MPS:+ (MPS)}"
if [ "${MPS:-0}" = 1 ] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=$WORK/mps CUDA_MPS_LOG_DIRECTORY=$WORK/mps
  mkdir -p "$WORK/mps" && nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT
fi
plan gpu_arms "experiment=study_fmnist, data.train_size=null, data.val_size=5000" "trainer.max_epochs=1" \
  "$(seeds "$PLAN_SEEDS")" "trainer.max_epochs=$PLAN_EPOCHS" ${ARMS//,/ }
study run "$WORK/gpu_arms.yaml" --stage exploration --jobs "$JOBS" 2>&1 | tail -3 | tee "$OUT/arms.log" \
  || echo "some arm failed"

echo "== 4/4 per arm, and the study plan: $PLAN_SEEDS seeds x $PLAN_EPOCHS epochs, $JOBS runs at once"
study estimate "$WORK/gpu_arms.yaml" --jobs "$JOBS" 2>&1 | tee "$OUT/arms.md" || echo "no figures for the arms"

figures="gpu.txt pytest_gpu.log bc100.md arms.md"
if [ "${BENCH:-0}" = 1 ]; then
  figures="$figures bench.md"
  echo "== bench: DenseNet-121 train step vs torchvision and timm, 224x224, batch 32"
  $PY -m densenet_exp.bench --size 224 --batch 32 --steps 10 --warmup 3 --reference tv_densenet121 \
    --models densenet121,densenet121:fp32fast,densenet121:fast,densenet121_me:fp32fast,tv_densenet121,tv_densenet121_me,timm_densenet121,timm_densenet121:fp32fast \
    2>/dev/null | tee "$OUT/bench.md" || echo "the bench failed"
fi
echo "figures in $OUT: $figures"
